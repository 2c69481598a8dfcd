"""EmbedPatches: segmentation rows -> one PatchEmbedding per patch with a valid pixel;
patches crossing raster block edges are added up across blocks first."""
from __future__ import annotations

import logging

import apache_beam as beam
import numpy as np
from shapely.geometry import Polygon

from transforms.embeddings.patches import class_fractions, merge_patch_parts
from transforms.metrics import METRICS_NAMESPACE
from transforms.timing import StageClock, timed_iter
from transforms.polygons.polygonize import crs_key, raster_transform
from transforms.types import PatchEmbedding, PatchPart, Segmentation

__all__ = ["EmbedPatches", "finish_patch"]

logger = logging.getLogger(__name__)

_SEAM = "seam"


def finish_patch(part: PatchPart, context: tuple, class_names: tuple,
                 model_handle: str) -> PatchEmbedding:
  """A patch's output row: mean feature, class shares and footprint (in the raster's
  CRS through its transform; pixel coordinates x = column, y = row without one)."""
  image_id, source, crs_wkt, crs_epsg, transform = context
  y0, y1, x0, x1 = part.box
  corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
  if transform is not None:
    a, b, c, d, e, f = transform
    corners = [(a * x + b * y + c, d * x + e * y + f) for x, y in corners]
  footprint = Polygon(corners)   # a rectangle, or a rotated raster's mapped box
  xmin, ymin, xmax, ymax = footprint.bounds
  return PatchEmbedding(
      image_id=image_id, source=source, patch_row=part.row, patch_col=part.column,
      y0=y0, x0=x0, y1=y1, x1=x1, valid_pixels=part.valid_pixels,
      embedding=(part.feature_sum / part.valid_pixels).astype(np.float32).tolist(),
      class_fractions=class_fractions(part.class_counts, class_names, part.valid_pixels),
      class_counts=None if part.class_counts is None else list(part.class_counts),
      model=model_handle, geometry=footprint.wkb,
      bbox={"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
      crs_key=crs_key(crs_wkt, crs_epsg, transform), crs_wkt=crs_wkt)


class _PatchesFn(beam.DoFn):
  """Segmentation -> PatchEmbeddings of its complete patches; parts of patches on a
  block edge go out tagged 'seam', keyed by (raster, row, column)."""

  def __init__(self, class_names: tuple):
    self._clock = StageClock("patches")
    self._class_names = tuple(class_names)
    self._patches = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "patches")

  def process(self, row: Segmentation):
    yield from timed_iter(self._clock, self._process(row))

  def _process(self, row: Segmentation):
    if not row.patches:
      return
    blocked = row.block_y is not None
    context = (row.source if blocked else row.image_id, row.source, row.crs_wkt,
               row.crs_epsg, raster_transform(row))
    for part in row.patches:
      if part.complete:
        self._patches.inc()
        yield finish_patch(part, context, self._class_names, row.model)
      else:
        yield beam.pvalue.TaggedOutput(
            _SEAM, ((row.source, part.row, part.column), (part, context, row.model)))


class _MergePatchesFn(beam.DoFn):
  """((raster, row, column), [(part, context, model)]) -> one PatchEmbedding."""

  def __init__(self, class_names: tuple):
    self._clock = StageClock("patches")
    self._class_names = tuple(class_names)
    self._patches = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "patches")

  def process(self, element):
    yield from timed_iter(self._clock, self._process(element))

  def _process(self, element):
    _, values = element
    values = sorted(values, key=lambda v: v[0].box)
    # The first block (in raster order) speaks for the raster, as for polygons.
    context = min((c for _, c, _ in values), key=lambda c: (c[4] is None, c[4] or ()))
    self._patches.inc()
    yield finish_patch(merge_patch_parts([p for p, _, _ in values]), context,
                       self._class_names, values[0][2])


class EmbedPatches(beam.PTransform):
  """PCollection[Segmentation] (rows with patch parts) -> PCollection[PatchEmbedding].
  Usage:
      patches = rows | EmbedPatches(labels.class_names)
  """

  def __init__(self, class_names):
    super().__init__()
    self._class_names = tuple(class_names)

  def expand(self, rows):
    whole, seams = rows | "Patches" >> beam.ParDo(
        _PatchesFn(self._class_names)).with_outputs(_SEAM, main="whole")
    merged = (seams
              | "GroupPatchParts" >> beam.GroupByKey()
              | "MergePatchParts" >> beam.ParDo(_MergePatchesFn(self._class_names)))
    return (whole, merged) | "AllPatches" >> beam.Flatten()
