"""Brings reviewed labels back from a labeling tool as truth masks, ready for `evaluate`
and for training.

    hrnet-beam import --from coco|labelstudio|cvat FILE --to DIR [--rows OUTPUT_PREFIX]

DIR gets masks/<stem>.png (or .tif with the source's CRS and transform, from --rows or
the source GeoTIFF itself), labels.json, and import_problems.jsonl naming any image whose
labels did not decode. Use them with:
    hrnet-beam evaluate OUTPUT_PREFIX --truth 'DIR/masks/*' --truth_labels DIR/labels.json
"""
import argparse
import sys

from transforms.evaluation.importing import import_labels
from transforms.evaluation.truth import FORMATS, TruthError
from transforms.exports.rows import ExportError


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--from", dest="fmt", required=True, choices=FORMATS,
                      help="The tool's format: coco (annotations JSON), labelstudio (its "
                           "JSON export), cvat (CVAT for images 1.1 XML, or a Segmentation "
                           "mask 1.1 directory).")
  parser.add_argument("file", help="The tool's file (local or gs://).")
  parser.add_argument("--to", required=True, help="Directory to write to (local or gs://).")
  parser.add_argument("--truth_labels", default=None,
                      help="Labels JSON to number the classes by (default: the file's own "
                           "classes, in its order).")
  parser.add_argument("--rows", default=None,
                      help="The job's --output prefix: georeferenced rows make GeoTIFF "
                           "masks with their CRS and transform.")
  args = parser.parse_args(argv)
  try:
    result = import_labels(args.fmt, args.file, args.to, args.truth_labels, args.rows)
  except (TruthError, ExportError, OSError, ValueError, KeyError) as e:
    print(f"{prog or 'hrnet-beam import'}: {args.file}: {e}", file=sys.stderr)
    return 2
  print(f"{args.fmt}: {result.images} masks ({result.geotiffs} GeoTIFF) -> "
        f"{', '.join(result.files)}")
  for problem in result.problems:
    print(f"  not imported: {problem['image']}: {problem['reason']}", file=sys.stderr)
  return 0
