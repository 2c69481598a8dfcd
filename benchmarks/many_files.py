"""Benchmark: many small inputs through the local runner (issue 18, point 3).

    python -m benchmarks.many_files [--count 20000] [--small 200] [--report r.json]

Writes COUNT small PNGs and one TFRecord of COUNT records (and the same at SMALL), runs
the job over each in its own process (the default in-process local runner, pixel-local
stand-in model, 32 px tiles: the per-input overhead is what is measured, not the
model), checks that every input ends in exactly one row or error, and reports seconds,
inputs/s and the process's peak RSS. Then it reruns the COUNT-file job with
--skip_existing into the same output directory: skipping COUNT existing rows must cost
time linear in COUNT (the report gives seconds per skipped input at both sizes).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MODES = ("files", "shard", "skip")
# The stated bound: COUNT inputs may add at most this much peak RSS to the SMALL run's
# (measured +0.28 and +0.39 GiB at 20,000; PERFORMANCE.md). Beyond it the run fails.
RSS_GROWTH_BOUND_GIB = 0.5


def _peak_rss_bytes() -> int:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def _write_inputs(directory: str, count: int) -> tuple[str, str]:
  """COUNT PNGs in directory/files and one TFRecord of COUNT records; made once."""
  import io  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files, shard = os.path.join(directory, "files"), os.path.join(directory, "one.tfrecord")
  if os.path.exists(shard):
    return f"{files}/*.png", shard
  os.makedirs(files)
  rng = np.random.default_rng(0)
  with tf.io.TFRecordWriter(shard) as writer:
    for i in range(count):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
      data = buffer.getvalue()
      with open(os.path.join(files, f"{i:06d}.png"), "wb") as f:
        f.write(data)
      feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                 "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(
                     value=[f"r{i:06d}".encode()]))}
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=feature)).SerializeToString())
  return f"{files}/*.png", shard


def run_mode(mode: str, pattern: str, output: str, model: str) -> dict:
  """One job in this process; returns its figures."""
  from pipeline.job import run  # pylint: disable=import-outside-toplevel
  flags = ["--input", pattern, "--output", output, "--model", model, "--tile_size", "32",
           "--tile_overlap", "0", "--outputs", "masks", "--progress", "off"]
  if mode == "skip":
    flags.append("--skip_existing")
  started = time.monotonic()
  summary = run(flags)
  seconds = time.monotonic() - started
  rows = 0
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  ids = []
  for path in glob.glob(f"{output.rstrip('/')}/segmentations-*-of-*.parquet"):
    ids += pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
  rows = len(ids)
  return {"mode": mode, "seconds": round(seconds, 1), "inputs": summary.inputs,
          "rows": summary.rows, "errors": summary.errors, "skipped": summary.skipped,
          "rows_on_disk": rows, "unique_rows_on_disk": len(set(ids)),
          "peak_rss_gib": round(_peak_rss_bytes() / 2**30, 2)}


def _in_process(mode: str, pattern: str, output: str, model: str) -> dict:
  command = [sys.executable, "-m", "benchmarks.many_files", "--mode", mode, "--pattern",
             pattern, "--output", output, "--model", model]
  done = subprocess.run(command, check=True, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=20000)
  parser.add_argument("--small", type=int, default=200)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--report", default=None)
  parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
  parser.add_argument("--pattern", help=argparse.SUPPRESS)
  parser.add_argument("--output", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.mode:
    print(json.dumps(run_mode(args.mode, args.pattern, args.output, args.model)))
    return 0
  from pipeline.cli import console  # pylint: disable=import-outside-toplevel
  console.setup("warning")
  from pipeline.standin import hrnet  # pylint: disable=import-outside-toplevel
  workdir = args.workdir or tempfile.mkdtemp(prefix="hrnet-beam-many-")
  model = os.path.join(workdir, "pixel_local")
  if not os.path.exists(os.path.join(model, "saved_model.pb")):
    hrnet.export_pixel_local(7, 120, model, labels=hrnet.stand_in_labels(7))
  results = []
  for count in (args.small, args.count):
    files, shard = _write_inputs(os.path.join(workdir, f"inputs-{count}"), count)
    out = os.path.join(workdir, f"out-{count}")
    for mode, pattern, output in (("files", files, f"{out}/files/"),
                                  ("shard", shard, f"{out}/shard/"),
                                  ("skip", files, f"{out}/files/")):
      result = dict(_in_process(mode, pattern, output, model), count=count)
      expected_rows = count if mode != "skip" else 0
      result["complete"] = (result["rows"] == expected_rows and result["errors"] == 0 and
                            result["rows_on_disk"] == result["unique_rows_on_disk"] == count
                            and (mode != "skip" or result["skipped"] == count))
      results.append(result)
      print(f"{count:>6} {mode:<5} {result['seconds']:>7.1f} s  "
            f"{count / result['seconds']:>7.1f} inputs/s  peak {result['peak_rss_gib']:.2f} GiB"
            f"  complete: {result['complete']}", flush=True)
  by = {(r["count"], r["mode"]): r for r in results}
  for mode in MODES:
    small, large = by[(args.small, mode)], by[(args.count, mode)]
    large["rss_growth_gib"] = round(large["peak_rss_gib"] - small["peak_rss_gib"], 2)
    large["complete"] = large["complete"] and large["rss_growth_gib"] <= RSS_GROWTH_BOUND_GIB
    print(f"{mode}: {args.count} vs {args.small} inputs: time x{large['seconds'] / small['seconds']:.1f}"
          f" (inputs x{args.count / args.small:.0f}), peak RSS "
          f"{small['peak_rss_gib']:.2f} -> {large['peak_rss_gib']:.2f} GiB (bound: +"
          f"{RSS_GROWTH_BOUND_GIB} GiB)")
  if args.report:
    with open(args.report, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
