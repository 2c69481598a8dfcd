"""Stages a model in GCS once, so that workers never download it from tfhub.dev.

    hrnet-beam stage-model --model HANDLE_OR_DIR --to gs://BUCKET/models/NAME

Resolves the TF Hub handle (or takes a local SavedModel directory), checks it loads and
has `predict` and `get_features`, and copies the directory. A destination that already
holds a complete copy is left alone unless --overwrite is given.
"""
import argparse
import logging
import os
import sys

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.inference.model import load_hrnet
from transforms.inference.sources import ModelLoadError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".hrnet_beam_staged"


def stage_model(handle: str, destination: str, overwrite: bool = False) -> str:
  """Copies the checked model to `destination`; returns what was done."""
  destination = destination.rstrip("/")
  marker = f"{destination}/{COMPLETE_MARKER}"
  if not overwrite and FileSystems.exists(marker):
    return f"{destination} already holds a staged copy (pass --overwrite to replace it)"
  model = load_hrnet(handle)
  num_classes, feature_dim, _ = model.probe()
  copied = 0
  for root, _, files in os.walk(model.local_dir):
    for name in sorted(files):
      source = os.path.join(root, name)
      target = f"{destination}/{os.path.relpath(source, model.local_dir)}"
      with open(source, "rb") as src, FileSystems.create(
          target, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        while chunk := src.read(8 << 20):
          dst.write(chunk)
      copied += 1
  # Written last: a copy interrupted halfway is never taken for a staged model.
  with FileSystems.create(marker, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(handle.encode())
  return (f"staged {handle} ({num_classes} classes, {feature_dim} feature channels, "
          f"{copied} files) at {destination}; run with --model {destination}")


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="TF Hub handle/URL or local directory.")
  parser.add_argument("--to", required=True, help="Destination, e.g. gs://BUCKET/models/NAME.")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    print(stage_model(args.model, args.to, args.overwrite))
  except ModelLoadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0

