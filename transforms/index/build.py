"""Building a FAISS index over the job's vectors, under a memory budget, with its id map
and a report (recall@10 against exact search on a sample, query latency).

The index type follows the data's size and the budget: exact search (Flat) below
EXACT_BELOW vectors; above, an inverted file (IVF) with 8-bit scalar quantisation, or
product quantisation where those codes would pass the budget.
nprobe is raised until recall@10 on the sample reaches the target. Vectors are read
from Parquet in batches; the index files live in one directory (`IndexFiles`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import tempfile
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.index.vectors import (WHITENED, VectorFiles, VectorTransform, count_rows,
                                      fit_transform, iter_batches, normalize)

logger = logging.getLogger(__name__)

EXACT_BELOW = 20_000         # vectors: exact search is fast enough and needs no training
TRAIN_PER_LIST = 64          # training vectors per inverted list (FAISS wants >= 39)
MAX_TRAIN = 256 * 1024
RECALL_TARGET = 0.95
RECALL_QUERIES = 200
K = 10
INDEX_FILE, MANIFEST_FILE, IDS_FILE, TRANSFORM_FILE = ("index.faiss", "index.json",
                                                       "ids.parquet", "transform.npz")
INDEX_FORMAT = 1


def parse_bytes(text: str) -> int:
  """'4GB', '512MB', '1.5G' or a number of bytes -> bytes (powers of 1024)."""
  units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
           "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}
  cleaned = str(text).strip().upper().replace("IB", "B")
  number = cleaned.rstrip("KMGTB")
  unit = cleaned[len(number):]
  try:
    value = float(number) * units[unit]
  except (ValueError, KeyError) as e:
    raise ValueError(f"{text!r} is not a size: write e.g. 4GB or 512MB") from e
  if value <= 0:
    raise ValueError(f"{text!r}: a size must be positive")
  return int(value)


@dataclasses.dataclass(frozen=True)
class IndexPlan:
  """What to build: FAISS's factory string and what it costs."""
  factory: str
  nlist: int            # 0 for exact search
  train_vectors: int
  estimated_bytes: int
  why: str


def plan_index(vectors: int, dim: int, max_memory: int,
               exact_below: int = EXACT_BELOW) -> IndexPlan:
  """The index for `vectors` of `dim` under `max_memory` bytes (the index in memory)."""
  flat = vectors * dim * 4
  if vectors < exact_below:
    if flat > max_memory:
      raise ValueError(f"{vectors} vectors need {flat >> 20} MB for exact search; "
                       f"--max_memory is {max_memory >> 20} MB")
    return IndexPlan("Flat", 0, 0, flat, f"exact search: fewer than {exact_below} vectors")
  nlist = 2 ** round(math.log2(4 * math.sqrt(vectors)))
  nlist = max(64, min(nlist, vectors // TRAIN_PER_LIST))
  train = min(vectors, max(nlist * TRAIN_PER_LIST, 50_000), MAX_TRAIN)
  lists = nlist * dim * 4 + vectors * 8          # centroids and the ids in the lists
  sq8 = lists + vectors * dim
  # Measured on 1M clustered 720-d vectors (PERFORMANCE.md): IVF4096,SQ8 reached recall@10
  # 0.99 at nprobe 8; re-ranking on the full vectors gained 0.01 for 4x the memory.
  if sq8 <= max_memory:
    return IndexPlan(f"IVF{nlist},SQ8", nlist, train, sq8,
                     f"inverted file ({nlist} lists) with 8-bit scalar codes: "
                     f"{exact_below} vectors or more")
  for m in sorted((m for m in range(1, dim + 1) if dim % m == 0 and m <= 256), reverse=True):
    pq_bytes = lists + vectors * m
    if pq_bytes <= max_memory:
      return IndexPlan(f"IVF{nlist},PQ{m}x8", nlist, train, pq_bytes,
                       f"inverted file with product quantisation ({m} bytes a vector): "
                       "8-bit codes would pass the budget")
  raise ValueError(f"{vectors} vectors do not fit {max_memory >> 20} MB even at one byte "
                   "each: raise --max_memory")


def _set_nprobe(index, nprobe: int) -> None:
  import faiss  # pylint: disable=import-outside-toplevel
  ivf = faiss.extract_index_ivf(index)
  ivf.nprobe = nprobe


def _search_params(nprobe: Optional[int], selector=None):
  """SearchParameters: nprobe for an inverted file, an id selector, or None."""
  import faiss  # pylint: disable=import-outside-toplevel
  if nprobe:
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if selector is not None:
      params.sel = selector
    return params
  if selector is not None:
    return faiss.SearchParameters(sel=selector)
  return None


@dataclasses.dataclass
class Report:
  vectors: int = 0
  skipped_no_valid_pixels: int = 0
  index_type: str = ""
  why: str = ""
  nprobe: int = 0
  index_bytes: int = 0
  max_memory_bytes: int = 0
  normalization: str = ""
  recall_at_10: Optional[float] = None
  recall_queries: int = 0
  latency_ms_p50: Optional[float] = None
  latency_ms_p99: Optional[float] = None
  build_seconds: float = 0.0
  peak_rss_mb: float = 0.0
  appended_files: int = 0

  def table(self) -> str:
    lines = [
        ("vectors", f"{self.vectors:,}" + (f" ({self.skipped_no_valid_pixels} without a "
                                           "valid pixel left out)"
                                           if self.skipped_no_valid_pixels else "")),
        ("index type", f"{self.index_type}" + (f", nprobe {self.nprobe}" if self.nprobe
                                               else "")),
        ("why", self.why),
        ("index size", f"{self.index_bytes / 2**20:,.1f} MB (budget "
                       f"{self.max_memory_bytes / 2**20:,.0f} MB)"),
        ("normalisation", self.normalization),
        ("recall@10", "exact search" if self.index_type == "Flat" else
         f"{self.recall_at_10:.4f} against exact search, {self.recall_queries} sample "
         "queries"),
        ("query latency", f"p50 {self.latency_ms_p50:.2f} ms, p99 {self.latency_ms_p99:.2f} "
                          "ms (one query at a time)"),
        ("build", f"{self.build_seconds:.1f} s, peak memory {self.peak_rss_mb:,.0f} MB"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sample_positions(total: int, size: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(total, size=min(size, total), replace=False))


def _gather(files: VectorFiles, positions: np.ndarray, paths=None) -> np.ndarray:
  """The vectors of the rows at these sorted positions (among all rows, in file order),
  less rows without a vector; copies, so no batch stays alive behind them."""
  out, start = [], 0
  for _, vectors, _, kept in iter_batches(files, paths):
    end = start + len(kept)
    inside = positions[(positions >= start) & (positions < end)] - start
    inside = inside[kept[inside]]
    if len(inside):   # a row's place among the batch's kept rows
      out.append(vectors[np.cumsum(kept)[inside] - 1])
    start = end
    if start > positions[-1]:
      break
  return np.concatenate(out) if out else np.zeros((0, files.dim), np.float32)


class _ExactTopK:
  """Exact top-k inner products of a few queries, merged batch by batch."""

  def __init__(self, queries: np.ndarray, k: int):
    self.queries = queries
    self.k = k
    self.scores = np.full((len(queries), k), -np.inf, np.float32)
    self.ids = np.full((len(queries), k), -1, np.int64)

  def add(self, vectors: np.ndarray, first_id: int) -> None:
    if not len(vectors) or not len(self.queries):
      return
    scores = self.queries @ vectors.T
    ids = np.arange(first_id, first_id + len(vectors))[None].repeat(len(self.queries), 0)
    scores = np.concatenate([self.scores, scores], axis=1)
    ids = np.concatenate([self.ids, ids], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
    self.scores = np.take_along_axis(scores, order, 1)
    self.ids = np.take_along_axis(ids, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean share of the true k nearest found among the k returned."""
  hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, np.count_nonzero(t >= 0))
          for f, t in zip(found, truth)]
  return float(np.mean(hits)) if hits else 1.0


def tune_and_measure(index, plan_nlist: int, queries: np.ndarray, truth: np.ndarray,
                     target: float = RECALL_TARGET) -> tuple:
  """(nprobe, recall@10, p50 ms, p99 ms): twice the smallest power-of-two nprobe that
  reaches the target on the sample (a margin for queries unlike the sample's), then
  single-query latency. Exact search: nprobe 0, recall measured all the same."""
  import faiss  # pylint: disable=import-outside-toplevel

  def recall_at(nprobe):
    if nprobe:
      _set_nprobe(index, nprobe)
    return recall_at_k(index.search(queries, K)[1], truth) if len(queries) else 1.0

  nprobe = 0
  if plan_nlist:
    for nprobe in [2 ** i for i in range(0, int(math.log2(plan_nlist)) + 1)]:
      if recall_at(nprobe) >= target:
        break
    nprobe = min(plan_nlist, 2 * nprobe)
  recall = recall_at(nprobe)
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  latencies = []
  try:
    for query in queries[:RECALL_QUERIES]:
      start = time.perf_counter()
      index.search(query[None], K)
      latencies.append((time.perf_counter() - start) * 1000)
  finally:
    faiss.omp_set_num_threads(threads)
  p50, p99 = (np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0))
  return nprobe, recall, float(p50), float(p99)


class IndexFiles:
  """An index directory (local or gs://): index.faiss, index.json (manifest and report),
  ids.parquet (what each id is) and transform.npz (the normalisation)."""

  def __init__(self, directory: str):
    self.directory = directory.rstrip("/")

  def path(self, name: str) -> str:
    return f"{self.directory}/{name}"

  def exists(self) -> bool:
    return FileSystems.exists(self.path(MANIFEST_FILE))

  def read_manifest(self) -> dict:
    with FileSystems.open(self.path(MANIFEST_FILE)) as f:
      return json.loads(f.read().decode())

  def read_index(self):
    import faiss  # pylint: disable=import-outside-toplevel
    with FileSystems.open(self.path(INDEX_FILE)) as f:
      data = np.frombuffer(f.read(), np.uint8)
    return faiss.deserialize_index(data)

  def read_transform(self) -> VectorTransform:
    with FileSystems.open(self.path(TRANSFORM_FILE)) as f:
      return VectorTransform.from_bytes(f.read())

  def read_ids(self) -> pa.Table:
    with FileSystems.open(self.path(IDS_FILE)) as f:
      return pq.read_table(pa.BufferReader(f.read()))

  def write(self, index, manifest: dict, ids: pa.Table, transform: VectorTransform) -> None:
    """Writes every file, the manifest last: a reader never sees a half-written index."""
    import faiss  # pylint: disable=import-outside-toplevel
    if "://" not in self.directory:
      os.makedirs(self.directory, exist_ok=True)
    _write_bytes(self.path(INDEX_FILE), faiss.serialize_index(index).tobytes())
    _write_bytes(self.path(TRANSFORM_FILE), transform.to_bytes())
    sink = pa.BufferOutputStream()
    pq.write_table(ids, sink, compression="zstd")
    _write_bytes(self.path(IDS_FILE), sink.getvalue().to_pybytes())
    _write_bytes(self.path(MANIFEST_FILE), json.dumps(manifest, indent=1).encode())


def _write_bytes(path: str, data: bytes) -> None:
  if "://" not in path:
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", delete=False) as f:
      f.write(data)
    os.replace(f.name, path)
    return
  with FileSystems.create(path) as f:
    f.write(data)


def _ids_table(tables: list, first_id: int) -> pa.Table:
  table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
  return table.add_column(0, "id", pa.array(
      np.arange(first_id, first_id + table.num_rows, dtype=np.int64)))


def build_index(files: VectorFiles, max_memory: int, normalization: str = WHITENED,
                source_prefix: str = "", seed: int = 0,
                exact_below: int = EXACT_BELOW) -> tuple:
  """(faiss index, manifest dict, ids Table, VectorTransform, Report) for all vectors."""
  import faiss  # pylint: disable=import-outside-toplevel
  started = time.perf_counter()
  # Rows counted from the files' footers: rows without a vector (no valid pixel) are
  # few, and are only left out of the sample, not worth a pass over every vector.
  rows = count_rows(files.files)
  sample = _gather(files, _sample_positions(rows, max(min(rows, MAX_TRAIN), RECALL_QUERIES),
                                            seed))
  if not len(sample):
    raise ValueError("no vector to index: every row lacks a valid pixel")
  transform = fit_transform(sample, normalization)
  plan = plan_index(rows, transform.output_dim, max_memory, exact_below)
  sample = normalize(sample, transform)
  index = faiss.index_factory(transform.output_dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
  if plan.nlist:
    index.train(sample[:plan.train_vectors])
  rng = np.random.default_rng(seed + 1)
  queries = sample[rng.choice(len(sample), size=min(RECALL_QUERIES, len(sample)),
                              replace=False)]
  del sample
  exact = _ExactTopK(queries, K)
  tables, next_id, skipped = [], 0, 0
  for _, vectors, table, kept in iter_batches(files, with_ids=True):
    skipped += int((~kept).sum())
    vectors = normalize(vectors, transform)
    exact.add(vectors, next_id)
    index.add(vectors)
    tables.append(table)
    next_id += len(vectors)
  if not index.ntotal:
    raise ValueError("no vector to index: every row lacks a valid pixel")
  ids = _ids_table(tables, 0)
  report = Report(vectors=index.ntotal, skipped_no_valid_pixels=skipped,
                  index_type=plan.factory, why=plan.why, max_memory_bytes=max_memory,
                  normalization=transform.describe())
  _finish_report(report, index, plan.nlist, queries, exact.ids, started)
  manifest = _manifest(files, plan, transform, source_prefix, report, queries_seed=seed)
  return index, manifest, ids, transform, report


def _finish_report(report: Report, index, nlist: int, queries, truth, started) -> None:
  import faiss  # pylint: disable=import-outside-toplevel
  nprobe, recall, p50, p99 = tune_and_measure(index, nlist, queries, truth)
  report.nprobe = nprobe
  report.recall_at_10 = recall
  report.recall_queries = len(queries)
  report.latency_ms_p50, report.latency_ms_p99 = p50, p99
  report.index_bytes = len(faiss.serialize_index(index))
  report.build_seconds = time.perf_counter() - started
  report.peak_rss_mb = _peak_rss_mb()


def _manifest(files: VectorFiles, plan: IndexPlan, transform: VectorTransform,
              source_prefix: str, report: Report, queries_seed: int) -> dict:
  import faiss  # pylint: disable=import-outside-toplevel
  return {
      "format": INDEX_FORMAT,
      "level": files.level,
      "source_prefix": source_prefix,
      "files": list(files.files),
      "dim": files.dim,
      "model": files.model,
      "class_names": list(files.class_names),
      "patch_size": files.patch_size,
      "job_metadata": files.metadata,
      "factory": plan.factory,
      "nlist": plan.nlist,
      "nprobe": report.nprobe,
      "normalization": transform.normalization,
      "normalization_note": transform.describe(),
      "index_dim": transform.output_dim,
      "faiss_version": faiss.__version__,
      "seed": queries_seed,
      "report": dataclasses.asdict(report),
  }


def append_index(index_files: IndexFiles, files: VectorFiles, new_paths: list) -> tuple:
  """Adds the vectors of new_paths to a built index without retraining (nor refitting
  the transform); recall and latency are measured again on all vectors. Returns (index,
  manifest, ids, VectorTransform, Report)."""
  started = time.perf_counter()
  manifest = index_files.read_manifest()
  index = index_files.read_index()
  transform = index_files.read_transform()
  ids = index_files.read_ids()
  tables, next_id, skipped = [ids], index.ntotal, 0
  for _, vectors, table, kept in iter_batches(files, new_paths, with_ids=True):
    skipped += int((~kept).sum())
    index.add(normalize(vectors, transform))
    tables.append(_ids_table([table], next_id))
    next_id += len(vectors)
  ids = pa.concat_tables(tables, promote_options="default")
  all_files = VectorFiles(files.level, tuple(manifest["files"]) + tuple(new_paths), files.dim,
                          files.model, files.class_names, files.patch_size, files.metadata)
  # Recall is measured against exact search over every vector now indexed.
  queries = normalize(_gather(all_files, _sample_positions(
      count_rows(all_files.files), RECALL_QUERIES, manifest.get("seed", 0) + 2)), transform)
  exact = _ExactTopK(queries, K)
  first = 0
  for _, vectors, _, _ in iter_batches(all_files):
    exact.add(normalize(vectors, transform), first)
    first += len(vectors)
  previous = manifest["report"]
  report = Report(vectors=index.ntotal,
                  skipped_no_valid_pixels=previous["skipped_no_valid_pixels"] + skipped,
                  index_type=manifest["factory"], why=previous["why"],
                  max_memory_bytes=previous["max_memory_bytes"],
                  normalization=transform.describe(),
                  appended_files=previous.get("appended_files", 0) + len(new_paths))
  _finish_report(report, index, manifest["nlist"], queries, exact.ids, started)
  manifest = dict(manifest, files=list(all_files.files), nprobe=report.nprobe,
                  report=dataclasses.asdict(report))
  return index, manifest, ids, transform, report

