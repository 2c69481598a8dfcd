"""RunInference on tiles: the ModelHandler that batches tiles, calls the loaded model at a
fixed shape, pools features where the model runs, and splits and retries failed groups.

Beam's stock TFModelHandlerTensor cannot serve these models: Keras 3's load_model
rejects them (apache/beam#30616) and it calls `model(batch)`, which they do not define.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler

from transforms.config import InferenceConfig, ModelConfig
from transforms.embeddings.patches import patch_slots, tile_patch_weights
from transforms.inference.confidence import QA_SUMS
from transforms.inference.loaded import LoadedModel, TileOutputs
from transforms.inference.model import FEATURE_STRIDE, load_hrnet
from transforms.metrics import METRICS_NAMESPACE, MODEL_COPY_PREFIX
from transforms.timing import StageClock
from transforms.tiling.channels import map_channels, to_unit_float
from transforms.tiling.grid import cell_weight_map, own_box_in_tile
from transforms.types import NODATA_CLASS, Tile, TileResult

logger = logging.getLogger(__name__)


def _is_out_of_memory(error: Exception) -> bool:
  name = type(error).__name__
  return name == "ResourceExhaustedError" or "out of memory" in str(error).lower()


class HRNetModelHandler(ModelHandler[Tile, TileResult, LoadedModel]):
  """RunInference handler: batches of Tiles in, one TileResult per tile out.

  The model is always called with the same batch shape (`model_batch_size` tiles, a
  partial group padded with blank tiles): convolution kernels are chosen by batch size
  and give other last bits for other sizes, so this makes rows independent of how Beam
  grouped the tiles, of the worker count and of the order tiles arrive in.

  Feature maps never leave TensorFlow: each tile's features are pooled over its owned
  box (its valid pixels) by weights applied where the model runs, so 720 sums come back
  instead of a 47 MB map per 512x512 tile at W48. A group that fails is split and
  retried, so only tiles that fail on their own are reported as failed. After an
  out-of-memory error the call size is halved and stays there.
  """

  def __init__(self, model: ModelConfig, inference: InferenceConfig):
    share = inference.share_model_across_processes or inference.model_copies is not None
    super().__init__(min_batch_size=inference.min_batch_size,
                     max_batch_size=inference.max_batch_size,
                     large_model=share,
                     model_copies=inference.model_copies if share else None)
    self._model_config = model
    self._inference = inference
    self._call_size = inference.model_batch_size
    # A shared model is called through Beam's RPC, which pickles every argument: callers
    # send the tiles' own pixels (8-bit RGB: a quarter of float32's bytes), and the model's
    # process scales and maps them (LoadedModel.infer_pixel_tiles, the same bytes).
    self._ships_pixels = share
    self._metrics = None

  def load_model(self) -> LoadedModel:
    return load_hrnet(self._model_config.handle, self._model_config.cache_dir,
                      self._inference.require_gpu, self._model_config.precision,
                      self._model_config.precision_fallback,
                      (self._inference.intra_op_threads, self._inference.inter_op_threads))

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE

  def get_num_bytes(self, batch: Sequence[Tile]) -> int:
    return sum(tile.pixels.nbytes for tile in batch)

  def _counters(self):
    if self._metrics is None:
      self._metrics = {
          "tiles_failed": beam.metrics.Metrics.counter(METRICS_NAMESPACE, "tiles_failed"),
          "oom_backoffs": beam.metrics.Metrics.counter(METRICS_NAMESPACE, "oom_backoffs"),
          "inferred": beam.metrics.Metrics.counter(METRICS_NAMESPACE, "tiles_inferred"),
          "nodata": beam.metrics.Metrics.counter(METRICS_NAMESPACE, "tiles_nodata_skipped"),
          "copies": {},   # load id -> its counter (metrics.MODEL_COPY_PREFIX)
          "tile_outputs": StageClock("tile_outputs"), "model": StageClock("model")}
    return self._metrics

  def run_inference(self, batch: Sequence[Tile], model: LoadedModel,
                    inference_args: Optional[dict[str, Any]] = None) -> Iterable[TileResult]:
    counters = self._counters()
    load_id = model.load_id()
    if load_id not in counters["copies"]:
      counters["copies"][load_id] = beam.metrics.Metrics.counter(
          METRICS_NAMESPACE, MODEL_COPY_PREFIX + load_id)
    counters["copies"][load_id].inc(len(batch))
    with counters["tile_outputs"]:   # the model's calls inside are counted apart
      results = self._infer_or_split(list(batch), model)
    counters["tiles_failed"].inc(sum(1 for r in results if r.error is not None))
    return results

  def _infer_or_split(self, tiles: list, model: LoadedModel) -> list:
    shapes = list(dict.fromkeys((t.spec.height, t.spec.width) for t in tiles))
    if len(shapes) > 1:   # one model call per tile shape; results in the batch's order
      results = {}
      for shape in shapes:
        group = [i for i, t in enumerate(tiles) if (t.spec.height, t.spec.width) == shape]
        for i, result in zip(group, self._infer_or_split([tiles[i] for i in group], model)):
          results[i] = result
      return [results[i] for i in range(len(tiles))]
    if len(tiles) > self._call_size:
      results = []
      while tiles:
        group, tiles = tiles[:self._call_size], tiles[self._call_size:]
        results.extend(self._infer_or_split(group, model))
      return results
    try:
      return self._infer(tiles, model)
    except Exception as e:  # pylint: disable=broad-except
      if _is_out_of_memory(e) and self._call_size > 1:
        self._call_size //= 2
        self._counters()["oom_backoffs"].inc()
        logger.warning("Out of memory with %d tiles per model call; calling with %d from "
                       "now on (rows computed after this differ in the last bits of their "
                       "features from rows computed at the larger size)",
                       self._call_size * 2, self._call_size)
        return self._infer_or_split(tiles, model)
      if len(tiles) == 1:
        reason = f"{type(e).__name__}: {e}".strip()
        logger.warning("Inference failed for %s tile %d: %s", tiles[0].image.source,
                       tiles[0].spec.index, reason)
        return [TileResult(tiles[0].image, tiles[0].spec, error=reason[:2000],
                           precision=model.precision())]
      middle = len(tiles) // 2
      return (self._infer_or_split(tiles[:middle], model) +
              self._infer_or_split(tiles[middle:], model))

  def _infer(self, tiles: list, model: LoadedModel) -> list:
    """Model outputs for the tiles' owned boxes; tiles whose owned box is all nodata are
    answered without the model, and nodata pixels get NODATA_CLASS and no feature weight."""
    boxes = [own_box_in_tile(tile.spec) for tile in tiles]
    valid_own = [None if tile.valid is None else tile.valid[y0:y1, x0:x1]
                 for tile, (y0, y1, x0, x1) in zip(tiles, boxes)]
    needed = [i for i, valid in enumerate(valid_own) if valid is None or valid.any()]
    outputs = TileOutputs()
    patch_size = self._inference.patch_size if self._inference.want_features else None
    patch_keys, patch_counts = {}, None
    if needed:
      # Every call has the same shape for a tile shape: `call_size` tiles, padded.
      height, width = tiles[0].spec.height, tiles[0].spec.width
      cells = (height // FEATURE_STRIDE, width // FEATURE_STRIDE)
      kinds = {(tiles[i].pixels.dtype, tiles[i].pixels.shape) for i in needed}
      ship_pixels = self._ships_pixels and len(kinds) == 1
      if ship_pixels:   # one dtype and band count in the call: the pixels as they are
        dtype, shape = next(iter(kinds))
        images = np.zeros((self._call_size, *shape), dtype)
      else:
        images = np.zeros((self._call_size, height, width, 3), np.float32)
      weights = np.zeros((self._call_size, *cells), np.float32)
      pixel_weights = np.zeros((self._call_size, height, width),
                               np.uint8 if ship_pixels else np.float32)   # 0 or 1
      patch_weights = None
      if patch_size:
        patch_weights = np.zeros((self._call_size, patch_slots(height, width, patch_size),
                                  *cells), np.float32)
      for slot, i in enumerate(needed):
        if patch_size:
          patch_keys[i], patch_weights[slot] = tile_patch_weights(
              tiles[i].image, tiles[i].spec, patch_size, FEATURE_STRIDE, tiles[i].valid)
        images[slot] = tiles[i].pixels if ship_pixels else map_channels(
            to_unit_float(tiles[i].pixels), self._model_config.channel_mapping)
        weights[slot] = cell_weight_map(boxes[i], FEATURE_STRIDE, cells, tiles[i].valid)
        y0, y1, x0, x1 = boxes[i]
        pixel_weights[slot, y0:y1, x0:x1] = 1 if valid_own[i] is None else valid_own[i]
      arguments = (self._inference.want_masks, self._inference.want_features, weights,
                   pixel_weights, self._inference.confidence_threshold,
                   self._inference.ignore_below, self._inference.augmentation,
                   self._inference.want_confidence, patch_weights)
      with self._counters()["model"]:
        if ship_pixels:
          outputs = model.infer_pixel_tiles(images, self._model_config.channel_mapping,
                                            *arguments)
        else:
          outputs = model.infer_tiles(images, *arguments)
      if patch_size:
        patch_counts = patch_weights.sum(axis=(2, 3))
    counters = self._counters()
    counters["inferred"].inc(len(needed))
    counters["nodata"].inc(len(tiles) - len(needed))
    slot_of = {i: slot for slot, i in enumerate(needed)}
    precision = model.precision()
    results = []
    for i, tile in enumerate(tiles):
      box, valid, slot = boxes[i], valid_own[i], slot_of.get(i)
      y0, y1, x0, x1 = box
      ids = feature_sum = qa = class_confidence = confidence = pseudo = None
      patches = {}
      if slot is not None and outputs.patch_features is not None:
        keys = patch_keys[i]
        patches = dict(patch_keys=tuple(keys), patch_counts=patch_counts[slot, :len(keys)],
                       patch_sums=outputs.patch_features[slot, :len(keys)].astype(np.float64))
      want_maps = self._inference.want_confidence, self._inference.ignore_below is not None
      if slot is None:  # nothing but nodata here: the model is not asked
        if self._inference.want_masks:
          ids = np.full((y1 - y0, x1 - x0), NODATA_CLASS, np.uint8)
          qa = np.zeros(len(QA_SUMS))
          class_confidence = np.zeros(self._model_config.num_classes)
          confidence = np.zeros_like(ids) if want_maps[0] else None
          pseudo = ids if want_maps[1] else None
        if self._inference.want_features:
          feature_sum = np.zeros(self._model_config.feature_dim, np.float64)
      else:
        if outputs.class_ids is not None:
          ids = np.array(outputs.class_ids[slot, y0:y1, x0:x1])
          qa = outputs.qa_sums[slot]
          class_confidence = outputs.class_confidence_sums[slot]
          if want_maps[0]:
            confidence = np.array(outputs.confidence[slot, y0:y1, x0:x1])
          if want_maps[1]:
            pseudo = np.array(outputs.pseudo_labels[slot, y0:y1, x0:x1])
          if valid is not None:
            ids[~valid] = NODATA_CLASS
            if confidence is not None:
              confidence[~valid] = 0
            if pseudo is not None:
              pseudo[~valid] = NODATA_CLASS
        if outputs.features is not None:
          feature_sum = outputs.features[slot].astype(np.float64)
      results.append(TileResult(
          tile.image, tile.spec, class_ids=ids, feature_sum=feature_sum, precision=precision,
          counted_pixels=None if valid is None else int(np.count_nonzero(valid)),
          qa_sums=qa, class_confidence_sums=class_confidence, confidence=confidence,
          pseudo_labels=pseudo, **patches))
    return results
