"""Benchmark: `hrnet-beam index` on one million 720-dimensional patch embeddings under a
4 GB budget: build time, index size, recall@10 against exact search, query latency.

    python -m benchmarks.index_scale [--vectors 1000000] [--max_memory 4GB]
                                     [--report bench-report-index.json]

The vectors are synthetic but shaped like CNN embeddings: a mixture of 2000 clusters in
a 48-dimensional latent space, mapped to 720 dimensions by a fixed random matrix, with
noise, made non-negative (ReLU-like, as HRNet's features are) and written as the job's
patch files (GeoParquet columns, fixed-size float32 vectors, class fractions), so the
index reads them through the same code as a job's output. Independent, identically
distributed Gaussian vectors would be the wrong test: they have no neighbours to find.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM, LATENT, CLUSTERS = 720, 48, 2000
ROWS_PER_FILE = 100_000
CLASS_NAMES = ["clutter", "impervious_surfaces", "building", "low_vegetation", "tree", "car"]


def cpu_description() -> str:
  flags = set()
  model = platform.processor()
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
  wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
  return f"{model}, {os.cpu_count()} cores, {' '.join(wanted)}"


def write_vectors(directory: str, total: int, seed: int = 0, name: str = "synthetic",
                  rows_per_file: int = ROWS_PER_FILE) -> list:
  """Synthetic patch files of `total` vectors; returns their paths. The clusters depend
  on the seed's first draw only, so files written with other names share them."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(CLUSTERS, LATENT)).astype(np.float32)
  mixing = (rng.normal(size=(LATENT, DIM)) / np.sqrt(LATENT)).astype(np.float32)
  schema = pa.schema([
      pa.field("image_id", pa.string(), nullable=False),
      pa.field("source", pa.string(), nullable=False),
      pa.field("patch_row", pa.int32(), nullable=False),
      pa.field("patch_col", pa.int32(), nullable=False),
      pa.field("y0", pa.int32(), nullable=False), pa.field("x0", pa.int32(), nullable=False),
      pa.field("y1", pa.int32(), nullable=False), pa.field("x1", pa.int32(), nullable=False),
      pa.field("valid_pixels", pa.int64(), nullable=False),
      pa.field("embedding", pa.list_(pa.float32(), DIM), nullable=False),
      pa.field("class_fractions", pa.struct([pa.field(n, pa.float32()) for n in CLASS_NAMES])),
  ], metadata={"hrnet_beam.model": "synthetic", "hrnet_beam.patch_size": "256",
               "hrnet_beam.class_names": json.dumps(CLASS_NAMES),
               "hrnet_beam.feature_dim": str(DIM)})
  paths = []
  rng = np.random.default_rng([seed, len(name)])
  for start in range(0, total, rows_per_file):
    count = min(rows_per_file, total - start)
    cluster = rng.integers(0, CLUSTERS, count)
    latent = centres[cluster] + 0.5 * rng.normal(size=(count, LATENT)).astype(np.float32)
    vectors = latent @ mixing + 0.05 * rng.normal(size=(count, DIM)).astype(np.float32)
    vectors = np.maximum(vectors + 0.5, 0).astype(np.float32)
    fractions = rng.dirichlet(np.ones(len(CLASS_NAMES)), count).astype(np.float32)
    ids = np.arange(start, start + count)
    table = pa.table({
        "image_id": [f"gs://bucket/{name}-{i // 64:06d}.tif" for i in ids],
        "source": [f"gs://bucket/{name}-{i // 64:06d}.tif" for i in ids],
        "patch_row": (ids % 64 // 8).astype(np.int32), "patch_col": (ids % 8).astype(np.int32),
        "y0": (ids % 64 // 8 * 256).astype(np.int32), "x0": (ids % 8 * 256).astype(np.int32),
        "y1": (ids % 64 // 8 * 256 + 256).astype(np.int32),
        "x1": (ids % 8 * 256 + 256).astype(np.int32),
        "valid_pixels": np.full(count, 65536, np.int64),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        "class_fractions": pa.StructArray.from_arrays(
            [pa.array(fractions[:, i]) for i in range(len(CLASS_NAMES))], CLASS_NAMES),
    }, schema=schema)
    path = os.path.join(directory, f"patches-{name}-{start // rows_per_file:05d}-of-"
                                   f"{-(-total // rows_per_file):05d}.parquet")
    pq.write_table(table, path, compression="zstd", row_group_size=8192)
    paths.append(path)
  return paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vectors", type=int, default=1_000_000)
  parser.add_argument("--max_memory", default="4GB")
  parser.add_argument("--report", default="bench-report-index.json")
  parser.add_argument("--workdir", default=None, help="Keep the vectors here (default: a "
                                                      "temporary directory).")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or scratch
    vectors_dir = os.path.join(workdir, "vectors")
    os.makedirs(vectors_dir, exist_ok=True)
    started = time.perf_counter()
    if not os.path.exists(os.path.join(vectors_dir, "DONE")):
      write_vectors(vectors_dir, args.vectors)
      open(os.path.join(vectors_dir, "DONE"), "w", encoding="utf-8").close()
    generated = time.perf_counter() - started
    # The index is built by the command itself, in its own process (its own peak memory).
    index_dir = os.path.join(workdir, "index")
    command = [os.path.join(os.path.dirname(sys.executable), "hrnet-beam"), "index", vectors_dir + "/", "--level", "patch", "--to", index_dir,
               "--max_memory", args.max_memory, "--json"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode:
      print(result.stderr)
      return result.returncode
    report = json.loads(result.stdout)
  out = {"cpu": cpu_description(), "vectors": args.vectors, "dim": DIM,
         "max_memory": args.max_memory, "generate_s": round(generated, 1),
         "index_command_s": round(elapsed, 1), "report": report,
         "targets": {"recall_at_10": ">= 0.95", "latency_ms_p50": "<= 10"},
         "met": bool(report["recall_at_10"] >= 0.95 and report["latency_ms_p50"] <= 10)}
  print(json.dumps(out, indent=1))
  with open(args.report, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  return 0 if out["met"] else 1


if __name__ == "__main__":
  raise SystemExit(main())
