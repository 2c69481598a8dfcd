"""Tiling, inference through RunInference, and stitching tile results into one row per image."""
from __future__ import annotations

import logging

import numpy as np
import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.window import GlobalWindows

from transforms.budget import ErrorBudget
from transforms.config import GRID_FIT, InferenceConfig, ModelConfig, TilingConfig
from transforms.embeddings.patches import add_patch_sums, class_fractions, image_patches
from transforms.inference.confidence import image_qa
from transforms.inference.handler import HRNetModelHandler
from transforms.metrics import METRICS_NAMESPACE
from transforms.pngs import encode_png
from transforms.timing import StageClock, timed_iter
from transforms.progress import ProgressConfig, ProgressReporter
from transforms.types import NODATA_CLASS
from transforms.tiling.grid import cut_tile, cut_valid, stitch_mask, tile_grid
from transforms.types import (ErrorRecord, ImageInfo, ImageRecord, Segmentation, Tile,
                              TileResult)

__all__ = ["SegmentImages"]

logger = logging.getLogger(__name__)

ERRORS = "errors"


def assemble_segmentation(image: ImageInfo, parts: list[TileResult], model: ModelConfig,
                          inference: InferenceConfig) -> Segmentation:
  """One row from all of an image's tile results (none failed)."""
  num_classes = model.num_classes
  mask_png = class_counts = pooled = fractions = mask = patches = None
  counted = sum((p.spec.own_y1 - p.spec.own_y0) * (p.spec.own_x1 - p.spec.own_x0)
                if p.counted_pixels is None else p.counted_pixels for p in parts)
  qa = {"augmentation": inference.augmentation.describe(), "engine": model.engine}
  if inference.want_masks:
    mask = stitch_mask(image.height, image.width, [(p.spec, p.class_ids) for p in parts])
    counts = np.bincount(mask.ravel(), minlength=NODATA_CLASS + 1)
    if counts[num_classes:NODATA_CLASS].any():
      raise ValueError(f"mask has class id {np.flatnonzero(counts[num_classes:])[0] + num_classes}"
                       f" but the model has {num_classes}")
    # Kept with their arrays: polygons and GeoTIFFs fused after the stitch need no decode.
    mask_png = encode_png(mask, keep=True)
    class_counts = counts[:num_classes].astype(np.int64).tolist()
    fractions = class_fractions(class_counts, model.labels.class_names, counted)
    qa.update(image_qa(np.sum([p.qa_sums for p in parts], axis=0),
                       np.sum([p.class_confidence_sums for p in parts], axis=0),
                       counts[:num_classes], counted))
    if inference.want_confidence:
      qa["confidence_png"] = encode_png(stitch_mask(
          image.height, image.width, [(p.spec, p.confidence) for p in parts]), keep=True)
    if inference.ignore_below is not None:
      qa["pseudo_label_png"] = encode_png(stitch_mask(
          image.height, image.width, [(p.spec, p.pseudo_labels) for p in parts]))
  if inference.want_features:
    if counted:
      total = np.sum([p.feature_sum for p in parts], axis=0)
      pooled = (total / counted).astype(np.float32).tolist()
    else:   # no valid pixel: no mean; NaN keeps the vector column free of nulls
      pooled = [float("nan")] * model.feature_dim
    if inference.patch_size:
      totals = {}
      for part in parts:
        if part.patch_keys:
          add_patch_sums(totals, part.patch_keys, part.patch_counts, part.patch_sums)
      patches = tuple(image_patches(image, totals, inference.patch_size, mask, num_classes))
  # Tiles of one image could meet models of different precision on a mixed fleet.
  precision = "+".join(sorted({p.precision for p in parts}))
  geo = image.geo
  return Segmentation(image.image_id, image.source, image.height, image.width, mask_png,
                      class_counts, pooled, model.handle, precision, valid_pixels=counted,
                      crs_wkt=geo.crs_wkt if geo else None,
                      crs_epsg=geo.crs_epsg if geo else None,
                      transform=list(geo.transform) if geo else None,
                      block_y=image.block[0] if image.block else None,
                      block_x=image.block[1] if image.block else None,
                      class_fractions=fractions, patches=patches, **qa)


class _TileFn(beam.DoFn):
  """ImageRecord -> its Tiles, all of one shape (the handler stacks tiles by shape)."""

  def __init__(self, config: TilingConfig):
    self._clock = StageClock("tiling")
    self._config = config
    self._tiles = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "tiles")

  def process(self, record: ImageRecord):
    yield from timed_iter(self._clock, self._process(record))

  def _process(self, record: ImageRecord):
    height, width = record.pixels.shape[:2]
    specs = tile_grid(height, width, self._config.tile_size, self._config.tile_overlap,
                      fit=self._config.grid == GRID_FIT)
    info = ImageInfo(record.image_id, record.source, height, width, len(specs), record.geo,
                     record.block)
    self._tiles.inc(len(specs))
    for spec in specs:
      valid = None if record.valid is None else cut_valid(record.valid, spec)
      yield Tile(info, spec, cut_tile(record.pixels, spec), valid)


class _StitchFn(beam.DoFn):
  """TileResults -> one Segmentation per image, or an ErrorRecord if any tile failed.

  All tiles of an image are produced and inferred within one bundle (no shuffle
  between tiling and here), so results are gathered per bundle instead of through
  a GroupByKey that would hold every mask of the job at once.
  """

  def __init__(self, model: ModelConfig, inference: InferenceConfig,
               progress: ProgressConfig):
    self._model = model
    self._inference = inference
    self._progress_config = progress
    self._rows = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "rows")
    self._errors = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "inference_errors")
    self._clock = StageClock("stitch")
    self._pending = {}
    self._progress = None
    self._budget = None

  def setup(self):
    self._progress = ProgressReporter(self._progress_config, "segment")
    self._budget = ErrorBudget(self._inference.max_error_fraction, "inference")

  def start_bundle(self):
    self._pending = {}

  def process(self, result: TileResult):
    parts = self._pending.setdefault(result.image.image_id, {})
    parts[result.spec.index] = result
    if len(parts) == result.image.num_tiles:
      del self._pending[result.image.image_id]
      with self._clock:
        output = self._finish(result.image, list(parts.values()))
      self._budget.record(failed=isinstance(output, beam.pvalue.TaggedOutput))
      yield output

  def _finish(self, image: ImageInfo, parts: list[TileResult]):
    failed = [p for p in parts if p.error is not None]
    if failed:
      self._errors.inc()
      self._progress.add(done=1, errors=1, tiles=len(parts))
      reason = f"{len(failed)} of {image.num_tiles} tiles failed; first: {failed[0].error}"
      return beam.pvalue.TaggedOutput(
          ERRORS, ErrorRecord(image.image_id, image.source, "inference", reason))
    try:
      row = assemble_segmentation(image, sorted(parts, key=lambda p: p.spec.index),
                                  self._model, self._inference)
    except Exception as e:  # pylint: disable=broad-except
      self._errors.inc()
      self._progress.add(done=1, errors=1, tiles=len(parts))
      return beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
          image.image_id, image.source, "stitch", f"{type(e).__name__}: {e}"))
    self._rows.inc()
    self._progress.add(done=1, tiles=len(parts))
    return row

  def finish_bundle(self):
    for image_id, parts in self._pending.items():
      image = next(iter(parts.values())).image
      self._errors.inc()
      self._progress.add(done=1, errors=1, tiles=len(parts))
      yield beam.pvalue.TaggedOutput(ERRORS, GlobalWindows.windowed_value(ErrorRecord(
          image_id, image.source, "stitch",
          f"only {len(parts)} of {image.num_tiles} tiles reached the stitching step")))
    self._pending = {}
    self._progress.flush()

  def teardown(self):
    if self._progress is not None:
      self._progress.flush()


class SegmentImages(beam.PTransform):
  """PCollection[ImageRecord] -> (PCollection[Segmentation], PCollection[ErrorRecord]).

  Cuts images into tiles, runs the model through RunInference with HRNetModelHandler,
  and stitches each image's tile results into one row. Usage:
      rows, errors = images | SegmentImages(tiling, model, inference)
  """

  def __init__(self, tiling: TilingConfig, model: ModelConfig, inference: InferenceConfig,
               progress: ProgressConfig = ProgressConfig()):
    super().__init__()
    self._tiling = tiling
    self._model = model
    self._inference = inference
    self._progress = progress

  def expand(self, images):
    handler = HRNetModelHandler(self._model, self._inference)
    stitched = (
        images
        | "Tile" >> beam.ParDo(_TileFn(self._tiling))
        | "Segment" >> RunInference(handler)
        | "Stitch" >> beam.ParDo(_StitchFn(self._model, self._inference, self._progress)).with_outputs(
            ERRORS, main="rows"))
    return stitched.rows, stitched[ERRORS]
