"""Benchmark: the pipeline against the bare model loop and a naive script, in one run.

    python -m benchmarks.run [--quick] [--report bench-report.json]

Generates its own aerial-looking images, exports the stand-in model once, then measures
on the same inputs, each mode in its own process (so peak RSS is its own):
- limit: pre-decoded, pre-tiled tiles through the fused function, no I/O, at the best
  model batch size tried;
- pipeline: this project end to end on the local runner, files to Parquet;
- naive: hub.load, then per image predict and get_features on the whole image, and
  pandas.DataFrame.to_parquet;
- pipeline_tta_flip: the pipeline with --tta flip (two model passes per tile);
- pipeline once started: the pipeline's tiles/s with its start-up (imports, model load
  and compilation, the runner) subtracted, from a second run on the first quarter of
  the images; the limit's timed loop excludes its start-up too.
With --precisions bfloat16 (the default) or float16, limit and pipeline run again at that
precision where the hardware has it, beside float32, with the agreement measured by
hrnet-beam compare-precision; where it lacks it, the report says why instead. With
--openvino float32,bfloat16,int8 (the default), the model is optimized at each and
limit and pipeline run on the OpenVINO engine, against the TensorFlow float32 limit;
their agreement is measured on the trained demo model (W48's random weights tie).
Full mode uses HRNetV2-W48 (for people: tens of minutes on 2 cores); --quick uses a
reduced W8 on small images (a couple of minutes, for CI).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TILE, OVERLAP = 512, 64
MODES = ("limit", "pipeline", "naive", "pipeline_tta_flip")
SUBSET_MODE = "pipeline_quarter"   # the pipeline on the first quarter of the images
STATIC_SUFFIX = "-static"   # --openvino int8-static: optimized with --static_shapes


def _peak_rss_bytes() -> int:
  """This process's own peak RSS. (ru_maxrss survives fork and exec on Linux, so a child
  would report its parent's peak, here the W48 export's.)"""
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# The instruction sets that decide what runs fast (PERFORMANCE.md names them per figure).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
               "amx_int8")


def machine(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """The CPU this run measured: model name, family and model, logical CPUs, and which of
  SPEED_FLAGS it has (read as the precision checks read them)."""
  from transforms.inference.precision import cpu_flags  # pylint: disable=import-outside-toplevel
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    text = ""
  fields = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  flags = cpu_flags(text)
  return {"cpu": fields.get("model name", "unknown"), "family": fields.get("cpu family"),
          "model": fields.get("model"), "logical_cpus": os.cpu_count(),
          "flags": [flag for flag in SPEED_FLAGS if flag in flags]}


def _images(directory: str, quick: bool, count: int, big: int) -> list:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from pipeline.standin.scenes import generate_scene  # pylint: disable=import-outside-toplevel
  sizes = ([(512, 512)] * 4 + [(1100, 1100)] if quick else
           [(1024, 1024)] * count + [(3000, 3000)] * big)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, (height, width) in enumerate(sizes):
    path = os.path.join(directory, f"image_{i:03d}.png")
    if not os.path.exists(path):
      Image.fromarray(generate_scene(height, width, 9000 + i)[0]).save(path)
    paths.append(path)
  return paths


def _model(directory: str, quick: bool) -> str:
  from pipeline.standin import hrnet  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, "model-w8-reduced" if quick else "model-w48")
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    spec = hrnet.HRNetSpec.reduced(8, 7) if quick else hrnet.HRNetSpec(48, 7)
    hrnet.export_hrnet(spec, path)
  return path


def mode_limit(model: str, images: list, precision: str = "float32") -> dict:
  """The bare model loop: the job's tiles (its grid) decoded and cut beforehand, stacked
  by shape; only inference timed."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from transforms.reading.decode import decode_image  # pylint: disable=import-outside-toplevel
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  from transforms.tiling.channels import to_unit_float
  from transforms.tiling.grid import cut_tile, tile_grid  # pylint: disable=import-outside-toplevel
  by_shape = {}
  for path in images:
    with open(path, "rb") as f:
      pixels = decode_image(f.read(), 10**9)
    for spec in tile_grid(*pixels.shape[:2], TILE, OVERLAP):
      by_shape.setdefault((spec.height, spec.width), []).append(
          to_unit_float(cut_tile(pixels, spec)))
  stacks = [np.stack(tiles) for tiles in by_shape.values()]
  del by_shape
  model = load_hrnet(model, precision=precision, precision_fallback="fail")
  best = None
  for batch in (1, 2):
    for stack in stacks:
      model.infer(stack[:batch], True, True)  # trace outside the timing
    started = time.perf_counter()
    for stack in stacks:
      for start in range(0, len(stack), batch):
        model.infer(stack[start:start + batch], True, True)
    seconds = time.perf_counter() - started
    if best is None or seconds < best["seconds"]:
      best = {"seconds": seconds, "batch_size": batch}
  return {**best, "tiles": sum(len(s) for s in stacks), "images": len(images),
          "tile_shapes": sorted({s.shape[1:3] for s in stacks}),
          "ran_at": model.precision(), "engine": model.engine}


def mode_pipeline(model: str, images: list, workdir: str, precision: str = "float32",
                  tta: str = "none", first: int | None = None) -> dict:
  from pipeline.job import run  # pylint: disable=import-outside-toplevel
  directory = os.path.dirname(images[0])
  if first is not None:   # a subset, to subtract the start-up (steady_state)
    subset = os.path.join(workdir, f"pipeline-in-first-{first}")
    os.makedirs(subset, exist_ok=True)
    for path in sorted(images)[:first]:
      link = os.path.join(subset, os.path.basename(path))
      if not os.path.exists(link):
        os.symlink(path, link)
    directory, images = subset, sorted(images)[:first]
  started = time.perf_counter()
  summary = run(["--input", os.path.join(directory, "*.png"), "--output",
                 os.path.join(workdir, f"pipeline-out-{tta}-{first or 'all'}", "rows"),
                 "--model", model,
                 "--tile_size", str(TILE), "--tile_overlap", str(OVERLAP),
                 "--precision", precision, "--precision_fallback", "fail", "--tta", tta,
                 "--progress", "off"])
  seconds = time.perf_counter() - started
  assert summary.rows == len(images), summary
  return {"seconds": seconds, "tiles": summary.metrics["tiles"], "images": summary.rows}


def steady_state(whole: dict, part: dict) -> float:
  """Tiles/s of the pipeline once started: the extra tiles of the whole run over the
  extra seconds, so the start-up both runs pay (imports, model load and compilation,
  the runner) cancels out. The limit's loop excludes its start-up too."""
  return (whole["tiles"] - part["tiles"]) / (whole["seconds"] - part["seconds"])


def mode_naive(model: str, images: list, workdir: str) -> dict:
  """What a user writes by hand: whole images, two model calls, pandas to Parquet."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import pandas as pd
  import tensorflow as tf
  import tensorflow_hub as hub
  from PIL import Image
  started = time.perf_counter()
  module = hub.load(model)
  records = []
  for path in images:
    image = tf.constant(np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255)
    predictions = module.predict(image)
    features = module.get_features(image)
    mask = np.argmax(predictions.numpy()[0], axis=-1).astype(np.uint8)
    records.append({"image": path, "mask": mask.tobytes(), "height": mask.shape[0],
                    "width": mask.shape[1],
                    "features": features.numpy()[0].mean(axis=(0, 1)).tolist()})
  pd.DataFrame(records).to_parquet(os.path.join(workdir, "naive.parquet"))
  return {"seconds": time.perf_counter() - started, "images": len(images)}


def _run_mode(mode: str, args, precision: str = "float32", model: str | None = None) -> dict:
  command = [sys.executable, "-m", "benchmarks.run", "--mode", mode, "--workdir",
             args.workdir, "--count", str(args.count), "--big", str(args.big),
             "--precision", precision] + (["--quick"] if args.quick else []) + (
                 ["--model", model] if model else [])
  output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def _precisions(args, model: str, images: list, float32_results: dict) -> dict:
  """Limit and pipeline at each lower precision, against the float32 limit, with the
  agreement beside them; or why this machine cannot run it."""
  # pylint: disable=import-outside-toplevel
  from pipeline.cli import compare_precision
  from transforms.inference.precision import (gpu_compute_capabilities, read_cpu_flags,
                                    unsupported_reason)
  reports = {}
  limit32 = float32_results["limit"]["tiles_per_s"]
  for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
    reason = unsupported_reason(precision, read_cpu_flags(), gpu_compute_capabilities())
    if reason is not None:
      reports[precision] = {"unsupported": reason}
      print(f"{precision}: not measured on this machine: {reason}")
      continue
    limit = _run_mode("limit", args, precision)
    pipeline = _run_mode("pipeline", args, precision)
    tiles = compare_precision.model_tiles([images[0]], TILE, OVERLAP, 8, "rgb")
    agreement = compare_precision.compare(model, precision, tiles, None)
    entry = {
        "limit_tiles_per_s": limit["tiles"] / limit["seconds"],
        "pipeline_tiles_per_s": pipeline["tiles"] / pipeline["seconds"],
        "pipeline_peak_rss_bytes": pipeline["peak_rss_bytes"],
        "agreement": {k: agreement[k] for k in ("pixel_agreement", "feature_cosine_mean",
                                                "feature_cosine_min", "iou_per_class")},
    }
    entry["limit_over_float32_limit"] = entry["limit_tiles_per_s"] / limit32
    entry["pipeline_over_float32_limit"] = entry["pipeline_tiles_per_s"] / limit32
    reports[precision] = entry
    print(f"{precision:10}limit {entry['limit_tiles_per_s']:.2f} tiles/s "
          f"(x{entry['limit_over_float32_limit']:.2f} float32 limit), pipeline "
          f"{entry['pipeline_tiles_per_s']:.2f} tiles/s "
          f"(x{entry['pipeline_over_float32_limit']:.2f}); argmax agreement "
          f"{agreement['pixel_agreement']:.2%}, feature cosine "
          f"{agreement['feature_cosine_mean']:.5f}")
  return reports


def _demo_agreement(precision: str, workdir: str, static_shapes: bool = False) -> dict:
  """The trained demo model optimized at `precision` against its TensorFlow float32, on
  tiles of held-out synthetic scenes (random-weight models tie too often to judge)."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from pipeline.cli.optimize import optimize
  from pipeline.standin.scenes import generate_scene
  directory = os.path.join(workdir, "demo-scenes")
  os.makedirs(directory, exist_ok=True)
  for i in range(6):   # calibration scenes first, held-out ones (seeds < 100) last
    seed = 200 + i if i < 4 else 11 + i
    path = os.path.join(directory, f"{i}.png")
    if not os.path.exists(path):
      Image.fromarray(generate_scene(512, 512, seed)[0]).save(path)
  demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "models", "demo")
  report = optimize(demo, precision, [os.path.join(directory, "*.png")],
                    os.path.join(workdir, f"demo-openvino-{precision}"
                                 f"{STATIC_SUFFIX if static_shapes else ''}"), 256, 64,
                    calibration_tiles=16, holdout_tiles=8, static_shapes=static_shapes)
  return {k: report[k] for k in ("pixel_agreement", "feature_cosine_mean",
                                 "feature_cosine_min", "iou_per_class", "ran_at")}


def _openvino(args, model: str, images: list, float32_results: dict) -> dict:
  """Limit and pipeline on the OpenVINO engine at each precision, against the TensorFlow
  float32 limit of this run; agreement measured on the trained demo model."""
  # pylint: disable=import-outside-toplevel
  import logging
  import nncf
  from pipeline.cli.optimize import optimize
  nncf.set_log_level(logging.ERROR)
  reports = {}
  limit32 = float32_results["limit"]["tiles_per_s"]
  from transforms.inference.openvino_engine import BFLOAT16, bf16_unsupported_reason
  from transforms.inference.precision import read_cpu_flags
  for name in [p.strip() for p in args.openvino.split(",") if p.strip()]:
    precision = name.removesuffix(STATIC_SUFFIX)
    static = name != precision
    reason = bf16_unsupported_reason(read_cpu_flags()) if precision == BFLOAT16 else None
    if reason is not None:
      reports[name] = {"unsupported": reason}
      print(f"openvino {name}: not measured on this machine: {reason}")
      continue
    directory = os.path.join(args.workdir, f"openvino-{name}-"
                             f"{'quick' if args.quick else 'w48'}")
    started = time.perf_counter()
    # Speed only on this random-weight model: the quick bias correction is enough.
    optimize(model, precision, images, directory, TILE, OVERLAP,
             calibration_tiles=4 if args.quick else 16, holdout_tiles=1,
             fast_bias_correction=True, static_shapes=static)
    optimize_seconds = time.perf_counter() - started
    limit = _run_mode("limit", args, model=directory)
    pipeline = _run_mode("pipeline", args, model=directory)
    part = _run_mode(SUBSET_MODE, args, model=directory)
    entry = {
        "ran_at": limit.get("ran_at"),
        "optimize_seconds": optimize_seconds,
        "limit_tiles_per_s": limit["tiles"] / limit["seconds"],
        "pipeline_tiles_per_s": pipeline["tiles"] / pipeline["seconds"],
        "pipeline_images_per_s": pipeline["images"] / pipeline["seconds"],
        "pipeline_peak_rss_bytes": pipeline["peak_rss_bytes"],
        "pipeline_steady_tiles_per_s": steady_state(pipeline, part),
        "demo_model_agreement": _demo_agreement(precision, args.workdir, static),
    }
    entry["pipeline_steady_over_tensorflow_float32_limit"] = (
        entry["pipeline_steady_tiles_per_s"] / limit32)
    entry["limit_over_tensorflow_float32_limit"] = entry["limit_tiles_per_s"] / limit32
    entry["pipeline_over_tensorflow_float32_limit"] = entry["pipeline_tiles_per_s"] / limit32
    reports[name] = entry
    agreement = entry["demo_model_agreement"]
    print(f"openvino {name:12} limit {entry['limit_tiles_per_s']:.2f} tiles/s "
          f"(x{entry['limit_over_tensorflow_float32_limit']:.2f} TF float32 limit), pipeline "
          f"{entry['pipeline_tiles_per_s']:.2f} tiles/s "
          f"(x{entry['pipeline_over_tensorflow_float32_limit']:.2f}; once started "
          f"{entry['pipeline_steady_tiles_per_s']:.2f}, "
          f"x{entry['pipeline_steady_over_tensorflow_float32_limit']:.2f}); demo model: "
          f"argmax agreement {agreement['pixel_agreement']:.2%}, pooled cosine min "
          f"{agreement['feature_cosine_min']:.6f}")
  return reports


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--report", default="bench-report.json")
  parser.add_argument("--count", type=int, default=24, help="1024x1024 images (full mode)")
  parser.add_argument("--big", type=int, default=2, help="3000x3000 images (full mode)")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "hrnet-beam-bench"))
  parser.add_argument("--precisions", default="bfloat16",
                      help="Comma-separated precisions measured beside float32 ('' for none)")
  parser.add_argument("--mode", choices=MODES + (SUBSET_MODE,), default=None,
                      help=argparse.SUPPRESS)  # one measurement, in a child process
  parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--modes", default=",".join(MODES + (SUBSET_MODE,)),
                      help="TensorFlow float32 modes to run (comma-separated; 'limit' alone "
                           "is the baseline the engine columns need)")
  parser.add_argument("--openvino", default="float32,bfloat16,int8,int8-static",
                      help="OpenVINO precisions measured beside TensorFlow ('' for none); "
                           "-static: the model optimized with --static_shapes")
  args = parser.parse_args(argv)
  if not args.mode:   # the children's stderr goes through the parent's filter
    from pipeline.cli import console  # pylint: disable=import-outside-toplevel
    console.setup("warning")
  images = _images(os.path.join(args.workdir, "images-quick" if args.quick else
                                f"images-{args.count}-{args.big}"),
                   args.quick, args.count, args.big)
  model = args.model or _model(args.workdir, args.quick)
  if args.mode:
    result = {"limit": lambda: mode_limit(model, images, args.precision),
              "pipeline": lambda: mode_pipeline(model, images, args.workdir, args.precision),
              "naive": lambda: mode_naive(model, images, args.workdir),
              "pipeline_tta_flip": lambda: mode_pipeline(model, images, args.workdir,
                                                         args.precision, "flip"),
              SUBSET_MODE: lambda: mode_pipeline(model, images, args.workdir, args.precision,
                                                 first=max(1, len(images) // 4)),
              }[args.mode]()
    result["peak_rss_bytes"] = _peak_rss_bytes()
    print(json.dumps(result))
    return 0
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  unknown = sorted(set(modes) - set(MODES + (SUBSET_MODE,)))
  if unknown or "limit" not in modes:
    parser.error(f"--modes: {', '.join(unknown) or 'limit missing'}; choose from "
                 f"{', '.join(MODES + (SUBSET_MODE,))}, limit included")
  results = {mode: _run_mode(mode, args) for mode in MODES + (SUBSET_MODE,) if mode in modes}
  for result in results.values():
    result["images_per_s"] = result["images"] / result["seconds"]
    if "tiles" in result:
      result["tiles_per_s"] = result["tiles"] / result["seconds"]
  report = {
      "machine": machine(),
      "mode": "quick (reduced W8)" if args.quick else "full (W48)",
      "images": [len(images), "quick set" if args.quick else f"{args.count} x 1024^2 + "
                 f"{args.big} x 3000^2"],
      "tile_size": TILE, "tile_overlap": OVERLAP, "results": results,
  }
  cpu = report["machine"]
  print(f"CPU: {cpu['cpu']} (family {cpu['family']}, model {cpu['model']}), "
        f"{cpu['logical_cpus']} logical CPUs; flags: {' '.join(cpu['flags']) or 'none'} "
        f"(of {', '.join(SPEED_FLAGS)})")
  print(f"{'mode':10}{'seconds':>10}{'tiles/s':>10}{'images/s':>10}{'peak RSS':>12}")
  for mode, result in results.items():
    tiles = f"{result['tiles_per_s']:.2f}" if "tiles_per_s" in result else "-"
    print(f"{mode:10}{result['seconds']:>10.1f}{tiles:>10}{result['images_per_s']:>10.2f}"
          f"{result['peak_rss_bytes'] / 2**30:>10.2f} GiB")
  if set(MODES + (SUBSET_MODE,)) <= set(results):    # the ratios between TensorFlow modes
    report.update({
        "pipeline_over_limit": results["pipeline"]["tiles_per_s"] /
                               results["limit"]["tiles_per_s"],
        "pipeline_steady_tiles_per_s": steady_state(results["pipeline"],
                                                    results[SUBSET_MODE]),
        "pipeline_over_naive": results["pipeline"]["images_per_s"] /
                               results["naive"]["images_per_s"],
        "pipeline_peak_rss_bytes": results["pipeline"]["peak_rss_bytes"],
        # Two model passes per tile: the cost of --tta flip against no augmentation.
        "tta_flip_over_pipeline": results["pipeline_tta_flip"]["tiles_per_s"] /
                                  results["pipeline"]["tiles_per_s"],
    })
    report["pipeline_steady_over_limit"] = (report["pipeline_steady_tiles_per_s"] /
                                           results["limit"]["tiles_per_s"])
    print(f"pipeline once started: {report['pipeline_steady_tiles_per_s']:.2f} tiles/s "
          f"(x{report['pipeline_steady_over_limit']:.2f} limit; start-up subtracted with a "
          "run on the first quarter of the images)")
    print(f"pipeline/limit (tiles/s): {report['pipeline_over_limit']:.2f}   "
          f"pipeline/naive (images/s): {report['pipeline_over_naive']:.2f}   "
          f"--tta flip/pipeline: {report['tta_flip_over_pipeline']:.2f}")
  report["precisions"] = _precisions(args, model, images, results)
  report["openvino"] = _openvino(args, model, images, results)
  with open(args.report, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(f"Report: {args.report}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
