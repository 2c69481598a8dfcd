"""Exports a job's masks to a labeling tool: COCO, Label Studio or CVAT.

    hrnet-beam export --format coco|labelstudio|cvat OUTPUT_PREFIX --to DIR

Streams through the rows (local or gs://, both ways): one mask in memory at a time.
"""
import argparse
import sys

from transforms.exports import (CocoWriter, CvatMaskWriter, LabelStudioWriter, export_rows,
                                row_files)
from transforms.exports.rows import MASK, PSEUDO, ExportError, output_info

FORMATS = {
    "coco": "annotations.json: one RLE annotation per class present in each image",
    "labelstudio": "tasks.json (predictions as brush RLE) and label_config.xml",
    "cvat": "Segmentation mask 1.1: labelmap.txt, SegmentationClass/*.png, ImageSets/",
}


def writer_for(fmt: str, to: str, url_prefix=None):
  if fmt == "coco":
    return CocoWriter(to)
  if fmt == "labelstudio":
    return LabelStudioWriter(to, url_prefix)
  return CvatMaskWriter(to)


def export(output: str, fmt: str, to: str, which: str = MASK, url_prefix=None,
           log_every: int = 1000) -> dict:
  """Writes the export; returns {'images': n, 'blocks_skipped': n, 'files': [...]}."""
  info = output_info(row_files(output))
  writer = writer_for(fmt, to, url_prefix)
  writer.start(info)
  skipped = {}
  count = 0
  for row in export_rows(info, which, skipped):
    writer.add(row)
    count += 1
    if count % log_every == 0:
      print(f"hrnet-beam export: {count} images", file=sys.stderr, flush=True)
  files = writer.finish()
  return {"images": count, "blocks_skipped": skipped.get("blocks", 0), "files": files}


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="formats:\n" + "\n".join(
                                       f"  {k:<12} {v}" for k, v in FORMATS.items()))
  parser.add_argument("output", help="The job's --output prefix or output directory "
                                     "(local or gs://).")
  parser.add_argument("--format", required=True, choices=sorted(FORMATS))
  parser.add_argument("--to", required=True, help="Directory to write to (local or gs://).")
  parser.add_argument("--mask", choices=(MASK, PSEUDO), default=MASK,
                      help="'mask': the model's classes; 'pseudo': the pseudo-labels of a "
                           "job run with --ignore_below (ignored pixels left unlabelled).")
  parser.add_argument("--url_prefix", default=None,
                      help="labelstudio: prefix for each image's path under the inputs' "
                           "common directory (e.g. '/data/local-files/?d=images/'); "
                           "default: the source URI as it is.")
  args = parser.parse_args(argv)
  try:
    result = export(args.output, args.format, args.to, args.mask, args.url_prefix)
  except ExportError as e:
    print(f"{prog or 'hrnet-beam export'}: {e}", file=sys.stderr)
    return 2
  print(f"{args.format}: {result['images']} images -> {', '.join(result['files'])}")
  if result["blocks_skipped"]:
    print(f"  {result['blocks_skipped']} rows were blocks of rasters too big to open whole: "
          "annotation tools cannot show them; use the job's --polygons_output for those")
  return 0
