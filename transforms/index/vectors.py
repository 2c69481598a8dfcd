"""Reading the job's vectors from its Parquet files in batches, and normalising them as
the index and its queries do: PCA-whitened (or centred) by a transform fitted on a
sample, then L2-normalised, so inner product is the cosine of the transformed vectors."""
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
WHITENED, CENTERED, PLAIN = "whitened", "centered", "plain"
NORMALIZATIONS = (WHITENED, CENTERED, PLAIN)
MAX_WHITENED_DIMS = 128
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
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()
            if k.startswith(b"hrnet_beam.")}
    size = _vector_size(field, meta)
    if size is None:
      raise IndexInputError(f"{path}: {column} holds no vectors (type {field.type}): the "
                            "job ran without 'features' in --outputs")
    if first is None:
      first = (size, meta)
    elif (size, meta.get("hrnet_beam.model")) != (first[0], first[1].get("hrnet_beam.model")):
      raise IndexInputError(f"{path} holds vectors of another model or size "
                            f"({meta.get('hrnet_beam.model')}, {size}) than "
                            f"{paths[0]} ({first[1].get('hrnet_beam.model')}, {first[0]})")
  dim, meta = first
  patch_size = meta.get("hrnet_beam.patch_size")
  return VectorFiles(level, tuple(paths), dim, meta.get("hrnet_beam.model", ""),
                     tuple(json.loads(meta.get("hrnet_beam.class_names", "[]"))),
                     int(patch_size) if patch_size else None, meta)


def _vector_size(field: pa.Field, meta: dict) -> Optional[int]:
  """The vectors' size: a fixed-size list's, or for files written before vector columns
  (list<float>) the feature_dim their metadata gives when features were computed."""
  if pa.types.is_fixed_size_list(field.type):
    return field.type.list_size
  outputs = meta.get("hrnet_beam.outputs", "features").split(",")
  if pa.types.is_list(field.type) and "features" in outputs and meta.get(
      "hrnet_beam.feature_dim"):
    return int(meta["hrnet_beam.feature_dim"])
  return None


def _as_matrix(column, dim: int) -> np.ndarray:
  """(rows, dim) float32 of a vector column; NaN rows where a list<float> row is null."""
  if pa.types.is_fixed_size_list(column.type):
    return column.flatten().to_numpy(zero_copy_only=False).astype(
        np.float32, copy=False).reshape(-1, dim)
  whole = np.asarray(column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
                     == dim)
  matrix = np.full((len(column), dim), np.nan, np.float32)
  matrix[whole] = column.filter(pa.array(whole)).flatten().to_numpy(
      zero_copy_only=False).reshape(-1, dim)
  return matrix


def count_rows(paths) -> int:
  return sum(_open(path).metadata.num_rows for path in paths)


def iter_batches(files: VectorFiles, paths=None, with_ids: bool = False
                 ) -> Iterator[tuple]:
  """(path, vectors (n, dim) float32, id columns as a pyarrow Table or None, kept) per
  batch, in file order. Rows without a vector (non-finite: an image without a valid
  pixel) are left out of vectors and ids; kept (rows,) bool says which rows stayed."""
  for path in (paths or files.files):
    handle = _open(path)
    names = handle.schema_arrow.names
    columns = [files.column] + ([c for c in _ID_COLUMNS[files.level] if c in names]
                                if with_ids else [])
    for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=columns):
      vectors = _as_matrix(batch.column(0), files.dim)
      kept = np.isfinite(vectors).all(axis=1)
      table = None
      if with_ids:
        table = pa.Table.from_batches([batch]).drop_columns([files.column]).filter(
            pa.array(kept))
      yield path, np.ascontiguousarray(vectors[kept]), table, kept


@dataclasses.dataclass(frozen=True)
class VectorTransform:
  """x -> ((x - mean) @ projection) / scale, then L2-normalised. projection (dim, k) and
  scale (k,) are the sample's principal axes and their standard deviations (PCA
  whitening); None for centring or plain cosine."""
  normalization: str
  mean: np.ndarray
  projection: Optional[np.ndarray] = None
  scale: Optional[np.ndarray] = None

  @property
  def output_dim(self) -> int:
    return len(self.mean) if self.projection is None else self.projection.shape[1]

  def describe(self) -> str:
    if self.normalization == WHITENED:
      return (f"PCA-whitened to {self.output_dim} dimensions (principal axes and their "
              "spread fitted on a sample of the indexed vectors), then L2-normalised; "
              "scores are inner products = cosine similarity of the whitened vectors")
    if self.normalization == CENTERED:
      return ("centred on the mean of a sample of the indexed vectors, then L2-normalised; "
              "scores are inner products = cosine similarity of the centred vectors")
    return "L2-normalised; scores are inner products = cosine similarity"

  def to_bytes(self) -> bytes:
    import io  # pylint: disable=import-outside-toplevel
    buffer = io.BytesIO()
    arrays = {"mean": self.mean}
    if self.projection is not None:
      arrays.update(projection=self.projection, scale=self.scale)
    np.savez(buffer, normalization=np.array(self.normalization), **arrays)
    return buffer.getvalue()

  @classmethod
  def from_bytes(cls, data: bytes) -> "VectorTransform":
    import io  # pylint: disable=import-outside-toplevel
    arrays = np.load(io.BytesIO(data))
    return cls(str(arrays["normalization"]), arrays["mean"],
               arrays["projection"] if "projection" in arrays else None,
               arrays["scale"] if "scale" in arrays else None)


def whitened_dims(dim: int, sample_size: int) -> int:
  """Components kept by PCA whitening: whitening as many axes as there are sample
  vectors amplifies noise (measured on the demo model's patches: 32-64 of 108 found
  the twin first for 81-87%, 107 of 108 for 0%), so at most half the sample, and
  MAX_WHITENED_DIMS."""
  return max(1, min(dim, MAX_WHITENED_DIMS, sample_size // 2))


def fit_transform(sample: np.ndarray, normalization: str) -> VectorTransform:
  """The transform for this normalisation, fitted on a sample (n, dim)."""
  dim = sample.shape[1]
  if normalization == PLAIN:
    return VectorTransform(PLAIN, np.zeros(dim, np.float32))
  mean = sample.mean(axis=0, dtype=np.float64)
  if normalization == CENTERED:
    return VectorTransform(CENTERED, mean.astype(np.float32))
  keep = whitened_dims(dim, len(sample))
  # The covariance (dim x dim) in chunks: memory stays small for a large sample.
  covariance = np.zeros((dim, dim))
  for start in range(0, len(sample), 16384):
    chunk = sample[start:start + 16384].astype(np.float64) - mean
    covariance += chunk.T @ chunk
  covariance /= max(1, len(sample) - 1)
  variances, axes = np.linalg.eigh(covariance)
  order = np.argsort(variances)[::-1][:keep]
  spread = np.sqrt(np.maximum(variances[order], 0))
  spread = np.where(spread > 0, spread, 1.0)
  return VectorTransform(WHITENED, mean.astype(np.float32),
                         np.ascontiguousarray(axes[:, order], np.float32),
                         spread.astype(np.float32))


def normalize(vectors: np.ndarray, transform: VectorTransform) -> np.ndarray:
  """The transform applied, then L2-normalised, float32; a zero vector stays zero."""
  out = np.asarray(vectors, np.float32) - transform.mean
  if transform.projection is not None:
    out = (out @ transform.projection) / transform.scale
  norms = np.linalg.norm(out, axis=1, keepdims=True)
  return np.ascontiguousarray(out / np.where(norms == 0, 1, norms), np.float32)


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
