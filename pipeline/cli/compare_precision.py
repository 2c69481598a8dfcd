"""Measures what a lower --precision changes before a job uses it: speed and agreement.

    hrnet-beam compare-precision --model M --input 'images/*.png' --precision bfloat16

Runs the same tiles through the model at float32 and at the chosen precision, each in its
own process (the graph rewrite is process-wide), and reports the speed ratio, the share
of pixels whose class agrees, the IoU of each class between the two, and the cosine
between pooled feature vectors. Exits 2 when this machine cannot run the precision:
float32 run twice would report a perfect agreement that means nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNSUPPORTED = 0, 2


def pixel_agreement(reference: np.ndarray, other: np.ndarray) -> float:
  """Share of pixels with the same class id."""
  if reference.shape != other.shape:
    raise ValueError(f"shapes differ: {reference.shape} vs {other.shape}")
  return float(np.mean(reference == other))


def iou_per_class(reference: np.ndarray, other: np.ndarray, num_classes: int) -> list:
  """IoU of each class's pixels in the two masks; None for a class present in neither."""
  ious = []
  for class_id in range(num_classes):
    in_reference, in_other = reference == class_id, other == class_id
    union = np.count_nonzero(in_reference | in_other)
    ious.append(None if union == 0 else
                np.count_nonzero(in_reference & in_other) / union)
  return ious


def cosine_similarities(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
  """Row-wise cosine between two (N, D) sets of vectors (1.0 where both are zero)."""
  reference = reference.astype(np.float64)
  other = other.astype(np.float64)
  dot = np.sum(reference * other, axis=1)
  norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
  both_zero = norms == 0
  return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))


def agreement_report(reference_ids: np.ndarray, other_ids: np.ndarray,
                     reference_features: np.ndarray, other_features: np.ndarray,
                     class_names: list) -> dict:
  cosines = cosine_similarities(reference_features, other_features)
  ious = iou_per_class(reference_ids, other_ids, len(class_names))
  return {
      "pixel_agreement": pixel_agreement(reference_ids, other_ids),
      "iou_per_class": dict(zip(class_names, ious)),
      "feature_cosine_mean": float(np.mean(cosines)),
      "feature_cosine_min": float(np.min(cosines)),
  }


def model_tiles(patterns: list, tile_size: int, overlap: int, max_tiles: int,
                channel_mapping: str) -> np.ndarray:
  """Up to max_tiles model-ready tiles (float32, mapped channels) of the matched images."""
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystems import FileSystems
  from transforms.reading.decode import DecodeError, decode_image
  from transforms.tiling.channels import map_channels, to_unit_float
  from transforms.tiling.grid import cut_tile, tile_grid
  paths = sorted(m.path for result in FileSystems.match(patterns) for m in result.metadata_list)
  if not paths:
    raise SystemExit(f"--input {patterns} matches no file")
  tiles = []
  for path in paths:
    try:
      with FileSystems.open(path) as f:
        pixels = decode_image(f.read(), 10**9)
    except DecodeError as e:   # a bad file among the images is skipped, as the job does
      logger.warning("Skipping %s: %s", path, e)
      continue
    # Full-size tiles: one shape to stack, and the speed of the --tile_size call.
    for spec in tile_grid(*pixels.shape[:2], tile_size, overlap, fit=False):
      tiles.append(map_channels(to_unit_float(cut_tile(pixels, spec)),
                                channel_mapping))
      if len(tiles) == max_tiles:
        return np.stack(tiles)
  return np.stack(tiles)


def _worker(model_handle: str, precision: str, tiles_path: str, result_path: str,
            fallback: str = "fail") -> None:
  """One precision in this process: class ids, tile-mean features and seconds per tile,
  and the precision that really ran (`fallback` float32: where the CPU lacks it)."""
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  tiles = np.load(tiles_path)
  model = load_hrnet(model_handle, precision=precision, precision_fallback=fallback)
  model.infer(tiles[:1], True, True)  # trace and rewrite outside the timing
  ids, features = [], []
  started = time.perf_counter()
  for tile in tiles:
    tile_ids, tile_features = model.infer(tile[None], True, True)
    ids.append(tile_ids[0])
    features.append(tile_features[0].mean(axis=(0, 1), dtype=np.float64))
  seconds = time.perf_counter() - started
  np.savez(result_path, ids=np.stack(ids), features=np.stack(features),
           seconds_per_tile=seconds / len(tiles), precision=model.precision(),
           engine=model.engine)


def _run_worker(model: str, precision: str, tiles_path: str, workdir: str,
                name: str, fallback: str = "fail") -> dict:
  result_path = os.path.join(workdir, f"{name}.npz")
  subprocess.run([sys.executable, "-m", "pipeline.cli.compare_precision", "--model", model,
                  "--precision", precision, "--worker_tiles", tiles_path,
                  "--worker_result", result_path, "--worker_fallback", fallback], check=True)
  with np.load(result_path) as data:
    return {key: data[key] for key in data.files}


def _optimized_precision(local_dir: str) -> str:
  """The precision an optimized model was made for (its manifest's)."""
  from transforms.inference.openvino_engine import read_manifest  # pylint: disable=import-outside-toplevel
  return str(read_manifest(local_dir)["precision"])


def compare(model: str, precision: str, tiles: np.ndarray, class_names: list | None,
            other_model: str | None = None) -> dict:
  """Runs float32 and `precision` on the same tiles in two processes and compares them;
  with other_model (an optimized model), TensorFlow float32 of `model` against it. An
  optimized bfloat16 model on a CPU without bfloat16 runs float32 (as the job would):
  the report's `ran_at` says so.

  Without class names (or with too few), classes are named by index up to the largest id
  seen.
  """
  with tempfile.TemporaryDirectory() as workdir:
    tiles_path = os.path.join(workdir, "tiles.npy")
    np.save(tiles_path, tiles)
    reference = _run_worker(model, "float32", tiles_path, workdir, "reference")
    other = _run_worker(other_model or model, "float32" if other_model else precision,
                        tiles_path, workdir, "other", "float32" if other_model else "fail")
  seen = int(max(reference["ids"].max(), other["ids"].max())) + 1
  if class_names is None or seen > len(class_names):  # names that do not fit are not used
    class_names = [f"class_{i}" for i in range(seen)]
  report = agreement_report(reference["ids"], other["ids"], reference["features"],
                            other["features"], class_names)
  report.update({
      "engine": str(other["engine"]),
      "precision": _optimized_precision(other_model) if other_model else precision,
      "ran_at": str(other["precision"]), "tiles": int(len(tiles)), "tile_size": int(tiles.shape[1]),
      "float32_seconds_per_tile": float(reference["seconds_per_tile"]),
      "seconds_per_tile": float(other["seconds_per_tile"]),
      "speedup_over_float32": float(reference["seconds_per_tile"] /
                                    other["seconds_per_tile"]),
  })
  return report


def print_report(report: dict) -> None:
  engine = "" if report.get("engine", "tensorflow") == "tensorflow" else "OpenVINO "
  ran_at = report.get("ran_at", report["precision"])
  fell_back = "" if ran_at == report["precision"] else (
      f" (ran at {ran_at} here: this CPU lacks {report['precision']}; measure again on a "
      "worker that has it)")
  print(f"{engine}{report['precision']} vs TensorFlow float32 on {report['tiles']} tiles of "
        f"{report['tile_size']}px{fell_back}: {report['seconds_per_tile']:.3f} s/tile vs "
        f"{report['float32_seconds_per_tile']:.3f} (x{report['speedup_over_float32']:.2f})")
  print(f"pixel argmax agreement {report['pixel_agreement']:.4%}; pooled-feature cosine "
        f"mean {report['feature_cosine_mean']:.6f}, min {report['feature_cosine_min']:.6f}")
  for name, iou in report["iou_per_class"].items():
    print(f"  IoU {name:24} {'-' if iou is None else f'{iou:.4f}'}")


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="SavedModel directory, gs:// or hub handle")
  parser.add_argument("--input", action="append", help="Image file pattern; repeatable")
  parser.add_argument("--precision", default="bfloat16",
                      choices=("float32", "bfloat16", "float16"),
                      help="float32 compares float32 with itself: a determinism check")
  parser.add_argument("--tile_size", type=int, default=512)
  parser.add_argument("--tile_overlap", type=int, default=64)
  parser.add_argument("--max_tiles", type=int, default=16)
  parser.add_argument("--channel_mapping", default=None,
                      help="Default: the model's labels file, else rgb (as the job does)")
  parser.add_argument("--report", default=None, help="Also write the report as JSON here")
  parser.add_argument("--worker_tiles", help=argparse.SUPPRESS)
  parser.add_argument("--worker_result", help=argparse.SUPPRESS)
  parser.add_argument("--worker_fallback", default="fail", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker_tiles:
    _worker(args.model, args.precision, args.worker_tiles, args.worker_result,
            args.worker_fallback)
    return EXIT_OK
  # pylint: disable=import-outside-toplevel
  from transforms import labels as labels_lib
  from transforms.inference.sources import resolve_model_dir
  from transforms.inference.precision import (gpu_compute_capabilities, read_cpu_flags,
                                    unsupported_reason)
  from transforms.tiling.channels import parse_channel_mapping
  if not args.input:
    parser.error("--input is required")
  reason = unsupported_reason(args.precision, read_cpu_flags(), gpu_compute_capabilities())
  if reason is not None:
    print(f"error: --precision {args.precision} cannot run on this machine: {reason}",
          file=sys.stderr)
    return EXIT_UNSUPPORTED
  model_dir = resolve_model_dir(args.model)
  labels = labels_lib.model_labels(args.model, model_dir)
  mapping = parse_channel_mapping(args.channel_mapping or
                                  (labels.channel_mapping if labels else None) or "rgb")
  tiles = model_tiles(args.input, args.tile_size, args.tile_overlap, args.max_tiles, mapping)
  report = compare(args.model, args.precision, tiles,
                   list(labels.class_names) if labels else None)
  print_report(report)
  if args.report:
    with open(args.report, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
