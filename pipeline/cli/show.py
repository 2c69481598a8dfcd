"""Prints what a job wrote: one line per row, then the errors.

    hrnet-beam show OUTPUT [--errors ERRORS_PREFIX]
"""
import argparse
import glob
import json
import sys

import numpy as np
import pyarrow.parquet as pq

from pipeline.job.outputs import ERRORS_NAME, is_directory
from transforms.exports.rows import row_files
from transforms.pngs import decode_png


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("output", help="The job's --output: a prefix, or an output directory "
                                      "(ending in /) whose runs are all shown.")
  parser.add_argument("--errors", default=None,
                      help="Errors prefix; default <output>-errors, or <output>/errors for a "
                           "directory.")
  args = parser.parse_args(argv)
  files = row_files(args.output)
  if not files:
    print(f"no Parquet files at {args.output}-*-of-*.parquet or "
          f"{args.output.rstrip('/')}/segmentations-*-of-*.parquet", file=sys.stderr)
    return 1
  metadata = pq.read_schema(files[0]).metadata or {}
  names = json.loads(metadata.get(b"hrnet_beam.class_names", b"[]"))
  print(f"Parquet output: {', '.join(files)}")
  print(f"model: {metadata.get(b'hrnet_beam.model', b'?').decode()}  "
        f"feature_dim: {metadata.get(b'hrnet_beam.feature_dim', b'?').decode()}")
  threshold = metadata.get(b"hrnet_beam.confidence_threshold", b"?").decode()
  scores = metadata.get(b"hrnet_beam.scores", b"").decode()
  if scores:
    print(f"scores: {scores}  augmentation: "
          f"{metadata.get(b'hrnet_beam.augmentation', b'none').decode()}")
  note = metadata.get(b"hrnet_beam.labels_note", b"").decode()
  if note:
    print(f"labels: {note}")
  for file in files:
    for row in pq.read_table(file).to_pylist():
      line = f"  {row['image_id']}: {row['width']}x{row['height']}"
      if row["mask_png"] is not None:
        mask = decode_png(row["mask_png"])
        counts = np.asarray(row["class_counts"])
        top = np.argsort(counts)[::-1][:3]
        share = ", ".join(f"{names[i] if i < len(names) else i} {counts[i] / mask.size:.0%}"
                          for i in top)
        line += f", mask {mask.shape[1]}x{mask.shape[0]}, most pixels: {share}"
      if row["pooled_features"] is not None:
        line += f", {len(row['pooled_features'])} pooled features"
      if row.get("mean_confidence") is not None:
        line += (f"\n    QA: confidence {row['mean_confidence']:.3f}, margin "
                 f"{row['mean_margin']:.3f}, entropy {row['mean_entropy']:.3f}, "
                 f"{row['low_confidence_fraction']:.1%} below {threshold}; by class: " +
                 ", ".join(f"{names[i] if i < len(names) else i} {c:.2f}"
                           for i, c in enumerate(row["class_mean_confidence"]) if c is not None))
      print(line)
  errors_prefix = args.errors or (f"{args.output.rstrip('/')}/{ERRORS_NAME}"
                                   if is_directory(args.output) else f"{args.output}-errors")
  for file in sorted(glob.glob(f"{errors_prefix}-*.jsonl")):
    print(f"Errors: {file}")
    with open(file, encoding="utf-8") as f:
      for line in f:
        error = json.loads(line)
        print(f"  {error['source']} ({error['stage']}): {error['reason']}")
  return 0

