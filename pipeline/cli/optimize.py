"""Optimizes a model for the OpenVINO engine: float32, bfloat16 or int8 IR, and how far
it strays from TensorFlow float32 on your own images.

    hrnet-beam optimize --model HANDLE --precision int8 --calibration 'images/*.png' --to DIR

Converts the model's one-pass function to OpenVINO IR (any batch and tile size), for
int8 calibrates NNCF's post-training quantization on tiles cut from the calibration
images by the job's own decoding and tiling (the classifier head stays float), writes
the IR, the labels and a manifest to DIR (local or gs://), then measures the result
against TensorFlow float32 on tiles not used for calibration: pixel agreement, IoU per
class, pooled-feature cosine and speed. Pass DIR to `hrnet-beam run --model`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

EXIT_OK, EXIT_CONFIG = 0, 2
REPORT_FILE = "agreement.json"


def _copy_tree(local: str, to: str) -> None:
  """The optimized model's files to a local directory or gs:// (any Beam filesystem)."""
  if "://" not in to:
    os.makedirs(to, exist_ok=True)
    for name in os.listdir(local):
      shutil.copy2(os.path.join(local, name), os.path.join(to, name))
    return
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  for name in sorted(os.listdir(local)):
    with open(os.path.join(local, name), "rb") as src, FileSystems.create(
        f"{to.rstrip('/')}/{name}", compression_type=CompressionTypes.UNCOMPRESSED) as dst:
      shutil.copyfileobj(src, dst, 8 << 20)


def optimize(model: str, precision: str, calibration: list, to: str, tile_size: int = 512,
             tile_overlap: int = 64, calibration_tiles: int = 32, holdout_tiles: int = 8,
             channel_mapping: str | None = None, labels_file: str | None = None,
             keep_head: bool = True, fast_bias_correction: bool = False,
             static_shapes: bool = False) -> dict:
  """Writes the optimized model to `to`; returns the agreement report."""
  # pylint: disable=import-outside-toplevel
  from pipeline.cli.compare_precision import compare, model_tiles
  from transforms import labels as labels_lib
  from transforms.inference import optimize as library
  from transforms.inference.model import load_hrnet
  from transforms.inference.openvino_engine import INT8
  from transforms.tiling.channels import parse_channel_mapping
  source = load_hrnet(model)
  num_classes, feature_dim, _ = source.probe()
  labels, _ = labels_lib.labels_for_model(model, source.local_dir, num_classes, labels_file)
  mapping = parse_channel_mapping(channel_mapping or labels.channel_mapping or "rgb")
  wanted = (calibration_tiles if precision == INT8 else 0) + holdout_tiles
  tiles = model_tiles(calibration, tile_size, tile_overlap, wanted, mapping)
  if len(tiles) < wanted:
    raise ValueError(f"--calibration matched {len(tiles)} tiles of {tile_size} px; "
                     f"{wanted} needed ({calibration_tiles} to calibrate, {holdout_tiles} to "
                     "measure): add images or lower --calibration_tiles")
  # Held-out tiles come last (later images): none of them is seen by the calibration.
  calibrate, holdout = tiles[:len(tiles) - holdout_tiles], tiles[len(tiles) - holdout_tiles:]
  converted = library.convert(source)
  kept = None
  if precision == INT8:
    kept = library.head_operations(converted) if keep_head else []
    converted = library.quantize(converted, calibrate, keep_head, fast_bias_correction)
  info = {"num_classes": num_classes, "feature_dim": feature_dim,
          "scores_kind": source.scores_kind, "channel_mapping": mapping,
          "labels": labels.name, "one_pass": source.single_pass or "two passes",
          "tile_size": tile_size, "tile_overlap": tile_overlap}
  calibration_info = None if precision != INT8 else {
      "patterns": list(calibration), "tiles": int(len(calibrate)), "tile_size": tile_size,
      "preset": "MIXED", "bias_correction": "fast" if fast_bias_correction else "full"}
  data = library.manifest(model, library.content_hash(source.local_dir), precision, info,
                          calibration_info, kept, static_shapes)
  with tempfile.TemporaryDirectory() as local:
    library.save(converted, local, data)
    with open(os.path.join(local, labels_lib.MODEL_LABELS_FILE), "w", encoding="utf-8") as f:
      json.dump(labels.to_json(), f, indent=2)
    report = compare(model, "float32", holdout, list(labels.class_names), other_model=local)
    report["held_out_tiles"] = int(len(holdout))
    with open(os.path.join(local, REPORT_FILE), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    _copy_tree(local, to)
  return report


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="SavedModel directory, gs:// directory or TF Hub handle")
  parser.add_argument("--precision", required=True, choices=("float32", "bfloat16", "int8"))
  parser.add_argument("--calibration", action="append", required=True,
                      help="Image pattern (local or gs://), repeatable: int8 is calibrated on "
                           "tiles cut from these, and every precision is measured on tiles "
                           "of the last images, not used for calibration.")
  parser.add_argument("--to", required=True, help="Output directory, local or gs://.")
  parser.add_argument("--tile_size", type=int, default=512)
  parser.add_argument("--tile_overlap", type=int, default=64)
  parser.add_argument("--calibration_tiles", type=int, default=32)
  parser.add_argument("--holdout_tiles", type=int, default=8)
  parser.add_argument("--channel_mapping", default=None,
                      help="Default: the model's labels file, else rgb (as the job does).")
  parser.add_argument("--labels_file", default=None)
  parser.add_argument("--quantize_head", action="store_true",
                      help="int8: quantize the classifier head too (by default it stays "
                           "float: cheap, and the layer where int8 flips classes).")
  parser.add_argument("--fast_bias_correction", action="store_true",
                      help="int8: NNCF's fast bias correction (quicker to optimize, features "
                           "a little further from float32).")
  parser.add_argument("--static_shapes", action="store_true",
                      help="The job compiles the backbone once per tile shape instead of "
                           "once for any size: the W48 int8 job 9.6%% faster on an AMD EPYC "
                           "Zen 4, the model alone 3.5%% on an AVX2-only Zen 3 at 512 px "
                           "(PERFORMANCE.md); each compilation (2.5-3 s at W48; about 70 MB "
                           "on disk) is kept in --model_cache_dir and paid once per machine. "
                           "Suits buckets of few image sizes. Rows differ from the same "
                           "model's without it (other kernels), never from run to run; the "
                           "manifest records the choice.")
  args = parser.parse_args(argv)
  import nncf  # pylint: disable=import-outside-toplevel
  nncf.set_log_level(logging.ERROR)
  try:
    report = optimize(args.model, args.precision, args.calibration, args.to, args.tile_size,
                      args.tile_overlap, args.calibration_tiles, args.holdout_tiles,
                      args.channel_mapping, args.labels_file, not args.quantize_head,
                      args.fast_bias_correction, args.static_shapes)
  except (ValueError, OSError) as e:
    print(f"{prog or 'hrnet-beam optimize'}: {e}", file=sys.stderr)
    return EXIT_CONFIG
  from pipeline.cli.compare_precision import print_report  # pylint: disable=import-outside-toplevel
  print(f"OpenVINO {args.precision} model written to {args.to}; against TensorFlow float32 "
        f"on {report['held_out_tiles']} held-out tiles:")
  print_report(report)
  return EXIT_OK
