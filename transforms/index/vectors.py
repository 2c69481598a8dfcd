"""Reading the job's vectors from its Parquet files in batches, and normalising them as
the index and its queries do: centred on a mean fitted on a sample, then L2-normalised,
so inner product is the cosine of the centred vectors."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

LEVEL_IMAGE, LEVEL_PATCH = "image", "patch"
LEVELS = (LEVEL_IMAGE, LEVEL_PATCH)
CENTERED, PLAIN = "centered", "plain"
NORMALIZATIONS = (CENTERED, PLAIN)
VECTOR_COLUMN = {LEVEL_IMAGE: "pooled_features", LEVEL_PATCH: "embedding"}
BATCH_ROWS = 8192

# What each id of the index points to: the columns kept beside it (ids.parquet).
_ID_COLUMNS = {
    LEVEL_IMAGE: ["image_id", "source", "height", "width", "valid_pixels",
                  "class_fractions"],
    LEVEL_PATCH: ["image_id", "source", "patch_row", "patch_col", "y0", "x0", "y1", "x1",
                  "valid_pixels", "class_fractions"],
}


class IndexInputError(ValueError):
  """Files that cannot be indexed; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class VectorFiles:
  """The Parquet files of one output prefix at one level, and what their metadata says."""
  level: str
  files: tuple
  dim: int
  model: str
  class_names: tuple
  patch_size: Optional[int]
  metadata: dict          # the first file's hrnet_beam.* metadata

  @property
  def column(self) -> str:
    return VECTOR_COLUMN[self.level]


def _open(path: str) -> pq.ParquetFile:
  return pq.ParquetFile(pa.PythonFile(FileSystems.open(path), mode="r"))


def output_files(prefix: str, level: str) -> list:
  """The job's Parquet files for a level: rows (`<prefix>-*-of-*.parquet`) for images,
  the patch files of the prefix (or of `<dir>/patches` for a directory) for patches."""
  if level == LEVEL_IMAGE:
    from transforms.exports.rows import ExportError, row_files  # pylint: disable=import-outside-toplevel
    try:
      return row_files(prefix)
    except ExportError as e:
      raise IndexInputError(str(e)) from e
  prefix = prefix.rstrip("/")
  patterns = [f"{prefix}-*-of-*.parquet", f"{prefix}/patches-*-of-*.parquet"]
  found = set()
  for result in FileSystems.match(patterns):
    found.update(m.path for m in result.metadata_list)
  return sorted(found)


def describe_files(paths: list, level: str) -> VectorFiles:
  """Checks the files hold vectors of one model and size at this level."""
  if not paths:
    raise IndexInputError(f"no Parquet files of {level} vectors found")
  column = VECTOR_COLUMN[level]
  first = None
  for path in paths:
    schema = _open(path).schema_arrow
    if column not in schema.names:
      hint = (" (patch files: run the job with --patch_output, then --level patch)"
              if level == LEVEL_PATCH else "")
      raise IndexInputError(f"{path} has no {column} column{hint}")
    field = schema.field(column)
    if not pa.types.is_fixed_size_list(field.type):
      raise IndexInputError(f"{path}: {column} holds no vectors (type {field.type}): the "
                            "job ran without 'features' in --outputs")
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()
            if k.startswith(b"hrnet_beam.")}
    if first is None:
      first = (field.type.list_size, meta)
    elif (field.type.list_size, meta.get("hrnet_beam.model")) != (
        first[0], first[1].get("hrnet_beam.model")):
      raise IndexInputError(f"{path} holds vectors of another model or size "
                            f"({meta.get('hrnet_beam.model')}, {field.type.list_size}) than "
                            f"{paths[0]} ({first[1].get('hrnet_beam.model')}, {first[0]})")
  dim, meta = first
  patch_size = meta.get("hrnet_beam.patch_size")
  return VectorFiles(level, tuple(paths), dim, meta.get("hrnet_beam.model", ""),
                     tuple(json.loads(meta.get("hrnet_beam.class_names", "[]"))),
                     int(patch_size) if patch_size else None, meta)


def count_rows(paths) -> int:
  return sum(_open(path).metadata.num_rows for path in paths)


def iter_batches(files: VectorFiles, paths=None, with_ids: bool = False
                 ) -> Iterator[tuple]:
  """(path, vectors (n, dim) float32, id columns as a pyarrow Table or None) per batch,
  in file order; rows with a non-finite vector (an image without a valid pixel) are
  left out here and counted by the caller from `kept`."""
  for path in (paths or files.files):
    handle = _open(path)
    names = handle.schema_arrow.names
    columns = [files.column] + ([c for c in _ID_COLUMNS[files.level] if c in names]
                                if with_ids else [])
    for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=columns):
      vectors = batch.column(0).flatten().to_numpy(zero_copy_only=False).astype(
          np.float32, copy=False).reshape(-1, files.dim)
      kept = np.isfinite(vectors).all(axis=1)
      table = None
      if with_ids:
        table = pa.Table.from_batches([batch]).drop_columns([files.column]).filter(
            pa.array(kept))
      yield path, np.ascontiguousarray(vectors[kept]), table, int((~kept).sum())


def fit_mean(sample: np.ndarray, normalization: str) -> np.ndarray:
  """The vector subtracted before L2 normalisation: the sample's mean, or zeros."""
  if normalization == PLAIN:
    return np.zeros(sample.shape[1], np.float32)
  return sample.astype(np.float64).mean(axis=0).astype(np.float32)


def normalize(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
  """(vectors - mean) / its L2 norm, float32; a zero vector stays zero."""
  centred = np.asarray(vectors, np.float32) - mean
  norms = np.linalg.norm(centred, axis=1, keepdims=True)
  return np.ascontiguousarray(centred / np.where(norms == 0, 1, norms), np.float32)


def read_vector(files: VectorFiles, path: str, image_id: str,
                patch: Optional[tuple] = None) -> Optional[np.ndarray]:
  """One stored vector: an image's pooled features, or a patch's embedding."""
  import pyarrow.compute as pc  # pylint: disable=import-outside-toplevel
  table = _open(path).read(columns=[files.column, *(
      ["image_id"] if files.level == LEVEL_IMAGE else ["image_id", "patch_row", "patch_col"])])
  keep = pc.equal(table.column("image_id"), image_id)
  if patch is not None:
    keep = pc.and_(keep, pc.and_(pc.equal(table.column("patch_row"), patch[0]),
                                 pc.equal(table.column("patch_col"), patch[1])))
  found = table.filter(keep)
  if not found.num_rows:
    return None
  return np.asarray(found.column(files.column)[0].as_py(), np.float32)
