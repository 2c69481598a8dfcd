"""Searching a built index: nearest images or patches of a vector, with filters on class
fractions applied inside the search (FAISS's id selector), so k results come back when
k rows match. Used by `hrnet-beam search` and `hrnet-beam serve`."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import numpy as np
import pyarrow as pa

from transforms.index.build import IndexFiles, _search_params, _set_nprobe
from transforms.index.filters import FilterError, evaluate, fraction_matrix, parse_where
from transforms.index.vectors import (LEVEL_PATCH, VECTOR_COLUMN, VectorFiles, normalize,
                                      read_vector)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int
  id: int
  score: float                  # inner product of the normalised vectors: cosine
  image_id: str
  source: str
  patch: Optional[tuple]        # (row, column) at patch level
  box: Optional[tuple]          # (y0, x0, y1, x1) at patch level
  class_fractions: Optional[dict]
  valid_pixels: int

  def as_json(self) -> dict:
    return dataclasses.asdict(self)


class Searcher:
  """An index loaded once; thread-compatible for reads (FAISS searches are const)."""

  def __init__(self, directory: str):
    files = IndexFiles(directory)
    if not files.exists():
      raise FileNotFoundError(f"{directory} holds no index (index.json): build one with "
                              "hrnet-beam index OUTPUT --to DIR")
    self.directory = directory
    self.manifest = files.read_manifest()
    self.index = files.read_index()
    self.transform = files.read_transform()
    self.ids = files.read_ids()
    self.class_names = tuple(self.manifest["class_names"])
    self.level = self.manifest["level"]
    if self.manifest.get("nprobe"):
      _set_nprobe(self.index, self.manifest["nprobe"])
    self._columns = {name: self.ids.column(name).to_numpy(zero_copy_only=False)
                     for name in ("image_id", "source")}
    self._fractions = fraction_matrix(self.ids, self.class_names)
    self._position = None

  @property
  def has_fractions(self) -> bool:
    return bool(self._fractions.size) and bool(np.isfinite(self._fractions).any())

  def vector_files(self) -> VectorFiles:
    m = self.manifest
    return VectorFiles(m["level"], tuple(m["files"]), m["dim"], m["model"],
                       tuple(m["class_names"]), m.get("patch_size"), m.get("job_metadata", {}))

  def row_of(self, image_id: str, patch: Optional[tuple] = None) -> int:
    """The id of an image (or of one of its patches); KeyError if it is not indexed."""
    if self._position is None:
      keys = self._columns["image_id"]
      if self.level == LEVEL_PATCH:
        rows = self.ids.column("patch_row").to_numpy()
        cols = self.ids.column("patch_col").to_numpy()
        self._position = {(k, int(r), int(c)): i for i, (k, r, c) in
                          enumerate(zip(keys, rows, cols))}
      else:
        self._position = {(k,): i for i, k in enumerate(keys)}
    key = (image_id,) if self.level != LEVEL_PATCH else (image_id, *patch)
    if key not in self._position:
      raise KeyError(f"{image_id}{' patch ' + str(patch) if patch else ''} is not in "
                     f"the index")
    return self._position[key]

  def stored_vector(self, row: int) -> np.ndarray:
    """A row's vector as the job wrote it (read from its Parquet file)."""
    table = self.ids.slice(row, 1).to_pylist()[0]
    patch = (table["patch_row"], table["patch_col"]) if self.level == LEVEL_PATCH else None
    files = self.vector_files()
    for path in files.files:
      vector = read_vector(files, path, table["image_id"], patch)
      if vector is not None:
        return vector
    raise KeyError(f"the vector of {table['image_id']} is no longer in "
                   f"{VECTOR_COLUMN[self.level]} of the indexed files")

  def matching(self, where: str) -> Optional[np.ndarray]:
    """(rows,) bool of the rows passing the filter; None without a filter."""
    clauses = parse_where(where, self.class_names)
    if not clauses:
      return None
    if not self.has_fractions:
      raise FilterError("--where needs class fractions, and these rows have none: the job "
                        "ran without masks")
    return evaluate(clauses, self._fractions)

  def search(self, vector: np.ndarray, k: int = 10, where: str = "",
             exclude: Optional[int] = None) -> list:
    """The k nearest rows to a raw vector (normalised here as the index's were)."""
    import faiss  # pylint: disable=import-outside-toplevel
    query = normalize(np.asarray(vector, np.float32)[None], self.transform)
    keep = self.matching(where)
    if exclude is not None:
      keep = np.ones(self.index.ntotal, bool) if keep is None else keep.copy()
      keep[exclude] = False
    available = self.index.ntotal if keep is None else int(keep.sum())
    want = min(k, available)
    if want == 0:
      return []
    selector = None
    if keep is not None:
      selector = faiss.IDSelectorBatch(np.flatnonzero(keep).astype(np.int64))
    nprobe = self.manifest.get("nprobe") or 0
    nlist = self.manifest.get("nlist") or 0
    if nlist and keep is not None:
      # The probed lists hold matches in proportion to the filter's share: probe that
      # many times more lists, so the matches scanned stay what nprobe scans unfiltered.
      nprobe = min(nlist, math.ceil(nprobe * self.index.ntotal / max(1, available)))
    while True:
      params = _search_params(nprobe, selector)
      scores, found = self.index.search(query, want, params=params)
      got = int((found[0] >= 0).sum())
      # The probed lists can still hold fewer than k matches: probe more.
      if got >= want or not nlist or nprobe >= nlist:
        break
      nprobe = min(nlist, nprobe * 4)
    return [self._hit(rank, int(i), float(s)) for rank, (i, s) in
            enumerate(zip(found[0], scores[0]), start=1) if i >= 0]

  def _hit(self, rank: int, row: int, score: float) -> Hit:
    record = self.ids.slice(row, 1).to_pylist()[0]
    patch = box = None
    if self.level == LEVEL_PATCH:
      patch = (record["patch_row"], record["patch_col"])
      box = (record["y0"], record["x0"], record["y1"], record["x1"])
    return Hit(rank, row, score, record["image_id"], record["source"], patch, box,
               record.get("class_fractions"), record.get("valid_pixels") or 0)

  def rows(self, where: str = "", offset: int = 0, limit: int = 50) -> tuple:
    """(total matching, [record dicts]) for browsing, in id order."""
    keep = self.matching(where)
    positions = (np.arange(self.ids.num_rows) if keep is None else np.flatnonzero(keep))
    chosen = positions[offset:offset + limit]
    records = self.ids.take(pa.array(chosen, pa.int64())).to_pylist() if len(chosen) else []
    return len(positions), records
