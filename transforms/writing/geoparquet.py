"""Writing polygons and patch embeddings as GeoParquet 1.1: WKB geometry, `geo` metadata
with the CRS as PROJJSON, and a bbox covering column so readers skip row groups by extent.

A GeoParquet column has one CRS, so rows go to one file set per CRS:
`<prefix>-<crs key>-<run id>-SSSSS-of-NNNNN.parquet` (crs key: epsgNNNN, crsHASH,
nocrs, or pixels for plain images, whose coordinates are (column, row)).
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes

from transforms.timing import StageClock
from transforms.config import PolygonConfig
from transforms.polygons.polygonize import PIXELS
from transforms.writing.parquet import fractions_type, vector_field

__all__ = ["WritePatches", "WritePolygons", "patch_schema", "polygon_schema", "geo_metadata"]

logger = logging.getLogger(__name__)

GEOPARQUET_VERSION = "1.1.0"
ROW_GROUP_ROWS = 8192   # polygons per row group: the unit a bbox filter can skip

_BBOX = pa.struct([pa.field("xmin", pa.float64()), pa.field("ymin", pa.float64()),
                   pa.field("xmax", pa.float64()), pa.field("ymax", pa.float64())])
_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("class_id", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("area_px", pa.int64(), nullable=False),
    pa.field("area_m2", pa.float64()),
    pa.field("mean_confidence", pa.float32()),
    pa.field("geometry", pa.binary(), nullable=False),
    pa.field("bbox", _BBOX, nullable=False),
]


def _coordinates_note(crs_key: str) -> str:
  return ("pixels of the source image: x = column, y = row, origin at the top-left "
          "corner, y down" if crs_key == PIXELS else
          "the source raster's CRS (geo metadata); nocrs: georeferenced without a CRS")


def polygon_schema(model_handle: str, class_names, config: PolygonConfig,
                   crs_key: str) -> pa.Schema:
  """The polygons' schema; the `geo` key is added when a file opens (with its CRS)."""
  coordinates = _coordinates_note(crs_key)
  return pa.schema(_FIELDS, metadata={
      "hrnet_beam.model": model_handle,
      "hrnet_beam.class_names": json.dumps(list(class_names)),
      "hrnet_beam.coordinates": coordinates,
      "hrnet_beam.min_polygon_area_px": str(config.min_area_px),
      "hrnet_beam.simplify_tolerance_px": str(config.simplify_px),
      "hrnet_beam.denoise_px": str(config.denoise_px),
      "hrnet_beam.polygon_note": "one polygon per 4-connected region of one class of the "
                                 "stitched mask; nodata never becomes a polygon; regions "
                                 "of a raster read by blocks are merged across blocks "
                                 "(image_id is then the raster's URI); area_px counts "
                                 "the region's pixels before simplification; "
                                 "mean_confidence is its pixels' mean max probability",
  })


def geo_metadata(crs_wkt: Optional[str], crs_key: str, geometry_types=("Polygon",)) -> dict:
  """GeoParquet 1.1 file metadata. crs null means 'undefined' in the spec: pixel
  coordinates, or a raster without a CRS."""
  crs = None
  if crs_wkt and crs_key != PIXELS:
    from pyproj import CRS  # pylint: disable=import-outside-toplevel
    crs = CRS.from_wkt(crs_wkt).to_json_dict()
  column = {"encoding": "WKB", "geometry_types": list(geometry_types), "crs": crs,
            "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                                  "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}}
  return {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
          "columns": {"geometry": column}}


def patch_schema(model, class_names, patch_size: int, crs_key: str) -> pa.Schema:
  """The patch embeddings' schema (model: the job's ModelConfig)."""
  fields = [
      pa.field("image_id", pa.string(), nullable=False),
      pa.field("source", pa.string(), nullable=False),
      pa.field("patch_row", pa.int32(), nullable=False),
      pa.field("patch_col", pa.int32(), nullable=False),
      pa.field("y0", pa.int32(), nullable=False),
      pa.field("x0", pa.int32(), nullable=False),
      pa.field("y1", pa.int32(), nullable=False),
      pa.field("x1", pa.int32(), nullable=False),
      pa.field("valid_pixels", pa.int64(), nullable=False),
      vector_field("embedding", model, "mean of the 1/4-resolution features over the "
                   "patch's valid pixels"),
      pa.field("class_fractions", fractions_type(class_names)),
      pa.field("class_counts", pa.list_(pa.int64())),
      pa.field("model", pa.string(), nullable=False),
      pa.field("geometry", pa.binary(), nullable=False),
      pa.field("bbox", _BBOX, nullable=False),
  ]
  return pa.schema(fields, metadata={
      "hrnet_beam.model": model.handle,
      "hrnet_beam.engine": model.engine,
      "hrnet_beam.feature_dim": str(model.feature_dim),
      "hrnet_beam.class_names": json.dumps(list(class_names)),
      "hrnet_beam.patch_size": str(patch_size),
      "hrnet_beam.coordinates": _coordinates_note(crs_key),
      "hrnet_beam.patch_note": "one row per cell of a patch_size grid aligned to the "
                               "image's (raster's) top-left corner, with at least one "
                               "valid pixel; y0, x0, y1, x1: its pixel box (half-open, "
                               "smaller at the right and bottom edges); embedding: mean "
                               "feature over its valid pixels, exact across tile seams "
                               "and raster blocks; class_fractions: shares of its valid "
                               "pixels (null without masks); geometry: its footprint",
  })


class _GeoParquetSink(fileio.FileSink):
  """Buffers records into row groups. The writer opens at the first record, which
  names the file's CRS (all of a destination's records share it); the footer is
  written at flush, which WriteToFiles calls once, just before it closes the file."""

  def __init__(self, schema: pa.Schema, geometry_types=("Polygon",)):
    self._schema = schema
    self._columns = schema.names
    self._geometry_types = list(geometry_types)
    self._fh = None
    self._writer = None
    self._rows: list = []
    self._clock = StageClock("write")

  def create_metadata(self, destination, full_file_name):
    return fileio.FileMetadata(mime_type="application/vnd.apache.parquet",
                               compression_type=CompressionTypes.UNCOMPRESSED)

  def open(self, fh):
    self._fh, self._writer, self._rows = fh, None, []

  def write(self, record):
    with self._clock:
      self._write(record)

  def _write(self, record):
    """record: a PatchEmbedding, a PolygonFeature or a PolygonBatch of them."""
    if self._writer is None:
      # `geo` goes in the Arrow schema's metadata, which is what GeoPandas and DuckDB read.
      schema = self._schema.with_metadata({
          **self._schema.metadata,
          b"geo": json.dumps(geo_metadata(record.crs_wkt, record.crs_key,
                                          self._geometry_types)).encode()})
      self._schema = schema
      self._writer = pq.ParquetWriter(pa.PythonFile(self._fh, mode="w"), schema,
                                      compression="zstd")
    # A PolygonBatch brings many rows; row groups break where they did one row at a time.
    for row in getattr(record, "features", (record,)):
      self._rows.append(row)
      if len(self._rows) >= ROW_GROUP_ROWS:
        self._write_rows()

  def _write_rows(self):
    if self._rows:
      columns = {name: [getattr(r, name) for r in self._rows] for name in self._columns}
      self._writer.write_table(pa.table(columns, schema=self._schema),
                               row_group_size=ROW_GROUP_ROWS)
      self._rows = []

  def flush(self):
    if self._writer is None:
      return
    with self._clock:
      self._write_rows()
      self._writer.close()
    self._writer = None


def _write_geoparquet(records, file_path_prefix: str, run_id: str, make_schema):
  prefix = file_path_prefix.rstrip("/")
  directory, stem = prefix.rsplit("/", 1) if "/" in prefix else (".", prefix)

  def naming(window, pane, shard_index, total_shards, compression, destination):
    del window, pane, compression
    return (f"{stem}-{destination}-{run_id}-{shard_index or 0:05d}-of-"
            f"{total_shards or 1:05d}.parquet")

  return records | "WriteGeoParquet" >> fileio.WriteToFiles(
      path=directory, file_naming=naming, destination=lambda record: record.crs_key,
      sink=lambda destination: _GeoParquetSink(make_schema(destination)),
      max_writers_per_bundle=4)


class WritePatches(beam.PTransform):
  """PCollection[PatchEmbedding] -> GeoParquet files, one set per CRS, named like the
  polygons'. Usage:
      patches | WritePatches("out/patches", run_id, model_config, class_names, 256)
  """

  def __init__(self, file_path_prefix: str, run_id: str, model, class_names,
               patch_size: int):
    super().__init__()
    self._prefix = file_path_prefix
    self._run_id = run_id
    self._model = model
    self._class_names = tuple(class_names)
    self._patch_size = patch_size

  def expand(self, patches):
    model, names, size = self._model, self._class_names, self._patch_size
    return _write_geoparquet(patches, self._prefix, self._run_id,
                             lambda key: patch_schema(model, names, size, key))


class WritePolygons(beam.PTransform):
  """PCollection[PolygonBatch] -> GeoParquet files, one set per CRS. The run id in
  each name keeps earlier runs' files (--skip_existing) beside this run's. Usage:
      polygons | WritePolygons("out/polygons", run_id, handle, class_names, config)
  """

  def __init__(self, file_path_prefix: str, run_id: str, model_handle: str, class_names,
               config: PolygonConfig):
    super().__init__()
    self._prefix = file_path_prefix
    self._run_id = run_id
    self._model_handle = model_handle
    self._class_names = tuple(class_names)
    self._config = config

  def expand(self, polygons):
    handle, names, config = self._model_handle, self._class_names, self._config
    return _write_geoparquet(polygons, self._prefix, self._run_id,
                             lambda key: polygon_schema(handle, names, config, key))
