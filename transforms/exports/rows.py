"""Reading a job's Parquet rows for export, one row group at a time (local or gs://), and
naming each image the way annotation tools match files: its path under the inputs'
common directory."""
from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from typing import Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.pngs import decode_png
from transforms.types import NODATA_CLASS

ROWS_NAME = "segmentations"   # an output directory's rows: segmentations-<run>-...
MASK = "mask"                 # which mask to export: the model's argmax ...
PSEUDO = "pseudo"             # ... or the pseudo-label (low-confidence pixels ignored)
_BATCH_ROWS = 16              # rows decoded at once: masks are a few MB each


class ExportError(ValueError):
  """Rows that cannot be exported as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class OutputInfo:
  files: tuple
  class_names: tuple
  palette: tuple
  model: str
  ignore_value: Optional[int]   # the pseudo-labels' ignore value, where they have one


@dataclasses.dataclass(frozen=True)
class ExportRow:
  image_id: str
  source: str
  name: str                 # path under the inputs' common directory, no extension
  file_name: str            # the same with the source's extension (or .png)
  height: int
  width: int
  mask: np.ndarray          # (H, W) uint8 class ids; NODATA_CLASS and ignore: unlabelled
  mean_confidence: Optional[float]
  class_mean_confidence: Optional[list]


def row_files(output: str) -> list[str]:
  """The Parquet files of a job's --output prefix (or of an output directory's runs)."""
  patterns = ([f"{output.rstrip('/')}/{ROWS_NAME}-*-of-*.parquet"] if output.endswith("/")
              else [f"{output}-*-of-*.parquet", f"{output}/{ROWS_NAME}-*-of-*.parquet"])
  for pattern in patterns:
    try:
      found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # pylint: disable=broad-except  # no such directory
      found = []
    if found:
      return found
  raise ExportError(f"no Parquet rows at {patterns[0]}: give the job's --output")


def _open(path: str):
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def output_info(files: list[str]) -> OutputInfo:
  with _open(files[0]) as f:
    metadata = pq.read_schema(f).metadata or {}
  if b"hrnet_beam.class_names" not in metadata:
    raise ExportError(f"{files[0]} was not written by hrnet-beam (no class names)")
  ignore = metadata.get(b"hrnet_beam.ignore_value", b"").decode()
  return OutputInfo(tuple(files), tuple(json.loads(metadata[b"hrnet_beam.class_names"])),
                    tuple(tuple(c) for c in json.loads(metadata[b"hrnet_beam.palette"])),
                    metadata.get(b"hrnet_beam.model", b"").decode(),
                    int(ignore) if ignore else None)


def _batches(files, columns):
  for path in files:
    with _open(path) as f:
      for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def _split(source: str) -> tuple[str, str]:
  """(file URI, key within it): a shard record's id is '<shard URI>#<key>'."""
  return tuple(source.split("#", 1)) if "#" in source else (source, "")


def _common_directory(prefix: Optional[str], path: str) -> str:
  """The deepest directory holding both `prefix` (a directory, or None) and `path`."""
  directory = posixpath.dirname(path)
  if prefix is None:
    return directory
  while prefix and not (directory + "/").startswith(prefix + "/"):
    prefix = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
  return prefix


def _names(image_id: str, root: str) -> tuple[str, str]:
  """(name without extension, file name) of an image id under the common root."""
  path, key = _split(image_id)
  relative = path[len(root):].lstrip("/") if root else path
  if key:   # a record inside a shard: the shard's path, then its key
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "record"
    relative = f"{relative}/{stem}"
  base, dot, extension = relative.rpartition(".")
  has_extension = dot and "/" not in extension and not key
  return (base if has_extension else relative,
          relative if has_extension else f"{relative}.png")


def export_rows(info: OutputInfo, which: str = MASK,
                skipped: Optional[dict] = None) -> Iterator[ExportRow]:
  """Each exportable row once, in file order, with its mask decoded.

  Blocks of rasters too big to decode whole are not images an annotation tool can open:
  they are skipped (counted in skipped['blocks']); --polygons_output serves them.
  """
  skipped = {} if skipped is None else skipped
  root, skipped["blocks"] = None, 0
  for row in _batches(info.files, ["image_id", "block_y"]):   # names need the common root
    if row["block_y"] is None:
      root = _common_directory(root, _split(row["image_id"])[0])
    else:
      skipped["blocks"] += 1
  if root is None:
    return
  column = "mask_png" if which == MASK else "pseudo_label_png"
  seen = set()
  columns = ["image_id", "source", "height", "width", column, "block_y", "mean_confidence",
             "class_mean_confidence"]
  for row in _batches(info.files, columns):
    if row["block_y"] is not None or row["image_id"] in seen:
      continue
    seen.add(row["image_id"])
    if row[column] is None:
      raise ExportError(
          f"{row['image_id']} has no {column}: " +
          ("run the job with masks in --outputs" if which == MASK else
           "run the job with --ignore_below to have pseudo-labels"))
    mask = decode_png(row[column])
    if which == PSEUDO and info.ignore_value is not None:
      mask = np.where(mask == info.ignore_value, NODATA_CLASS, mask).astype(np.uint8)
    name, file_name = _names(row["image_id"], root)
    yield ExportRow(row["image_id"], row["source"], name, file_name, row["height"],
                    row["width"], mask, row["mean_confidence"], row["class_mean_confidence"])


def create(path: str, mime_type: str = "application/octet-stream"):
  """A writable file, local or gs://, its directories made as needed."""
  return FileSystems.create(path, mime_type=mime_type,
                            compression_type=CompressionTypes.UNCOMPRESSED)
