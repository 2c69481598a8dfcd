"""PolygonizeMasks: segmentation rows -> one polygon per region of one class, in the
raster's CRS; regions of a raster read by blocks are merged across block edges."""
from __future__ import annotations

import hashlib
import logging
from typing import Optional

import apache_beam as beam

from transforms.config import PolygonConfig
from transforms.metrics import METRICS_NAMESPACE
from transforms.pngs import decode_png
from transforms.timing import StageClock, timed_iter
from transforms.polygons.vectorize import (finish, merge_parts, metres_per_unit, polygonize,
                                          preload)
from transforms.types import PolygonBatch, PolygonFeature, PolygonPart, Segmentation

__all__ = ["PolygonizeMasks", "crs_key"]

logger = logging.getLogger(__name__)

_SEAM = "seam"
PIXELS = "pixels"   # the crs_key of plain images: coordinates are (column, row)


def crs_key(crs_wkt: Optional[str], crs_epsg: Optional[int], transform) -> str:
  """Names the file set a polygon goes to; GeoParquet holds one CRS per column."""
  if transform is None:
    return PIXELS
  if crs_epsg:
    return f"epsg{crs_epsg}"
  if crs_wkt:
    return "crs" + hashlib.sha1(crs_wkt.encode()).hexdigest()[:10]
  return "nocrs"


def raster_transform(row: Segmentation) -> Optional[tuple]:
  """The whole raster's transform (a block row carries its block's own)."""
  if row.transform is None:
    return None
  a, b, c, d, e, f = row.transform[:6]
  y, x = row.block_y or 0, row.block_x or 0
  return (a, b, c - a * x - b * y, d, e, f - d * x - e * y)


def _batch(parts: list[PolygonPart], context: tuple, config: PolygonConfig,
           class_names: tuple, traced: bool = False) -> PolygonBatch:
  """Final parts -> one PolygonBatch of their PolygonFeatures (those that survive);
  traced: polygonize's own parts, not merged (see finish)."""
  image_id, source, crs_wkt, crs_epsg, transform = context
  key = crs_key(crs_wkt, crs_epsg, transform)
  done = finish(parts, config, transform, metres_per_unit(crs_wkt) if transform else None,
                traced)
  features = []
  for part, final in zip(parts, done):
    if final is None:
      continue
    x0, y0, x1, y1 = final.bounds
    features.append(PolygonFeature(
        image_id=image_id, source=source, class_id=part.class_id,
        class_name=class_names[part.class_id], area_px=part.pixels, area_m2=final.area_m2,
        mean_confidence=(None if part.confidence_sum is None or not part.pixels
                         else part.confidence_sum / part.pixels),
        geometry=final.wkb, bbox={"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1},
        crs_key=key, crs_wkt=crs_wkt))
  return PolygonBatch(crs_key=key, crs_wkt=crs_wkt, features=tuple(features))


class _PolygonizeFn(beam.DoFn):
  """Segmentation -> a PolygonBatch of its polygons; parts on a block edge go out
  tagged 'seam', keyed by (raster, class), to be merged with their neighbours'. A row whose polygons fail
  keeps its Parquet row: the failure is logged and counted (polygons_failed)."""

  def __init__(self, config: PolygonConfig, class_names: tuple):
    self._clock = StageClock("polygons")
    self._config = config
    self._class_names = tuple(class_names)
    self._polygons = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "polygons")
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "polygons_failed")

  def setup(self):
    preload()

  def process(self, row: Segmentation):
    yield from timed_iter(self._clock, self._process(row))

  def _process(self, row: Segmentation):
    if row.mask_png is None:
      return
    try:
      blocked = row.block_y is not None
      transform = raster_transform(row)
      context = (row.source if blocked else row.image_id, row.source, row.crs_wkt,
                 row.crs_epsg, transform)
      parts = polygonize(
          decode_png(row.mask_png), decode_png(row.confidence_png), self._config,
          offset=(row.block_y or 0, row.block_x or 0),
          seams=(bool(row.block_y), blocked, bool(row.block_x), blocked))
      seams = [((row.source, part.class_id), (part, context)) for part in parts
               if part.on_seam]
      batch = _batch([part for part in parts if not part.on_seam], context, self._config,
                     self._class_names, traced=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed.inc()
      logger.warning("Polygons of %s not written: %s: %s", row.image_id, type(e).__name__, e)
      return
    self._polygons.inc(len(batch.features))
    if batch.features:
      yield batch
    for seam in seams:
      yield beam.pvalue.TaggedOutput(_SEAM, seam)


class _MergeSeamsFn(beam.DoFn):
  """((raster, class), [(part, context)]) -> the merged regions as one PolygonBatch."""

  def __init__(self, config: PolygonConfig, class_names: tuple):
    self._clock = StageClock("polygons")
    self._config = config
    self._class_names = tuple(class_names)
    self._polygons = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "polygons")
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "polygons_failed")

  def setup(self):
    preload()

  def process(self, element):
    yield from timed_iter(self._clock, self._process(element))

  def _process(self, element):
    (source, _), values = element
    values = list(values)
    # Blocks' transforms differ from the raster's in their last bits at most: the
    # first block (in raster order) speaks for the raster, so the output is reproducible.
    context = min((c for _, c in values), key=lambda c: (c[4] is None, c[4] or ()))
    try:
      merged = merge_parts([part for part, _ in values])
      batch = _batch(merged, context, self._config, self._class_names)
    except Exception as e:  # pylint: disable=broad-except
      self._failed.inc()
      logger.warning("Polygons across blocks of %s not merged: %s: %s", source,
                     type(e).__name__, e)
      return
    self._polygons.inc(len(batch.features))
    if batch.features:
      yield batch


class PolygonizeMasks(beam.PTransform):
  """PCollection[Segmentation] -> PCollection[PolygonBatch], a batch per row (and per
  merged raster class) rather than an element per polygon. Usage:
      polygons = rows | PolygonizeMasks(PolygonConfig(min_area_px=16), labels.class_names)
  """

  def __init__(self, config: PolygonConfig, class_names):
    super().__init__()
    self._config = config
    self._class_names = tuple(class_names)

  def expand(self, rows):
    polygons, seams = (
        rows | "Polygonize" >> beam.ParDo(
            _PolygonizeFn(self._config, self._class_names)).with_outputs(_SEAM, main="whole"))
    merged = (seams
              | "GroupSeams" >> beam.GroupByKey()
              | "MergeSeams" >> beam.ParDo(_MergeSeamsFn(self._config, self._class_names)))
    return (polygons, merged) | "AllPolygons" >> beam.Flatten()
