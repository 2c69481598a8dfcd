"""Reviewed labels from a labeling tool's file written as truth masks: one PNG per image
(a GeoTIFF with the source's CRS and transform where the source is georeferenced) under
masks/, named by the source's stem, and labels.json naming their class ids, so that
`evaluate --truth 'DIR/masks/*' --truth_labels DIR/labels.json` and training read them.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional


from transforms.evaluation.truth import (UNLABELLED, decode_tool_file, match_key,
                                         tool_classes, tool_colours)
from transforms.exports.rows import create
from transforms.labels import LabelSet, generic_labels, read_labels
from transforms.pngs import encode_png
from transforms.types import GeoReference

MASKS = "masks"
LABELS = "labels.json"
PROBLEMS = "import_problems.jsonl"


@dataclasses.dataclass(frozen=True)
class ImportResult:
  images: int
  geotiffs: int
  problems: list
  files: list


def _labels(fmt: str, path: str, truth_labels: Optional[str]) -> LabelSet:
  if truth_labels:
    return read_labels(truth_labels)
  names = tool_classes(fmt, path)
  fallback = generic_labels(max(1, len(names))).palette
  colours = tool_colours(fmt, path)
  palette = tuple(tuple(c) if c else fallback[i] for i, c in enumerate(colours))
  return LabelSet(f"imported from {fmt}", names, palette,
                  f"classes of {path}; mask value {UNLABELLED} = unlabelled")


def geo_from_rows(output: str) -> dict:
  """{stem: GeoReference} of a job's georeferenced rows."""
  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  from transforms.exports.rows import row_files
  found = {}
  for path in row_files(output):
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for batch in pq.ParquetFile(f).iter_batches(
          columns=["image_id", "crs_wkt", "crs_epsg", "transform", "block_y"]):
        for row in batch.to_pylist():
          if row["transform"] and row["block_y"] is None:
            found[match_key(row["image_id"])] = GeoReference(
                row["crs_wkt"], row["crs_epsg"], tuple(row["transform"]))
  return found


def _geo_from_source(image_id: Optional[str]) -> Optional[GeoReference]:
  if not image_id or not image_id.lower().endswith((".tif", ".tiff")):
    return None
  try:
    import rasterio  # pylint: disable=import-outside-toplevel
    from transforms.reading.geotiff import georeference  # pylint: disable=import-outside-toplevel
    with rasterio.open(image_id) as dataset:
      return georeference(dataset)
  except Exception:  # pylint: disable=broad-except  # not readable here: a PNG then
    return None


def import_labels(fmt: str, path: str, to: str, truth_labels: Optional[str] = None,
                  rows: Optional[str] = None) -> ImportResult:
  """Writes each image's reviewed mask under `to`; images whose labels do not decode
  are listed in import_problems.jsonl (and returned), the rest written."""
  from transforms.writing.geotiff import mask_geotiff_bytes  # pylint: disable=import-outside-toplevel
  to = to.rstrip("/")
  labels = _labels(fmt, path, truth_labels)
  geo = geo_from_rows(rows) if rows else {}
  written, problems, count, geotiffs = set(), [], 0, 0
  for item in decode_tool_file(fmt, path, labels.class_names):
    stem = match_key(item.image_id or item.name)
    if item.mask is None:
      problems.append({"image": item.name, "image_id": item.image_id, "reason": item.error})
      continue
    if stem in written:
      problems.append({"image": item.name, "image_id": item.image_id,
                       "reason": f"another image has the stem {stem!r}; not written"})
      continue
    written.add(stem)
    reference = geo.get(stem) or _geo_from_source(item.image_id)
    if reference is not None:
      data, name = mask_geotiff_bytes(item.mask, reference, labels.palette), f"{stem}.tif"
      geotiffs += 1
    else:
      data, name = encode_png(item.mask), f"{stem}.png"
    with create(f"{to}/{MASKS}/{name}", "image/tiff" if name.endswith(".tif")
                else "image/png") as f:
      f.write(data)
    count += 1
  with create(f"{to}/{LABELS}", "application/json") as f:
    f.write(json.dumps(labels.to_json(), indent=1).encode())
  files = [f"{to}/{MASKS}/", f"{to}/{LABELS}"]
  if problems:
    with create(f"{to}/{PROBLEMS}", "application/json") as f:
      f.write("".join(json.dumps(p) + "\n" for p in problems).encode())
    files.append(f"{to}/{PROBLEMS}")
  return ImportResult(count, geotiffs, problems, files)
