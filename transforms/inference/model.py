"""What a loaded model can do: one call for masks and (pooled) features, its probe, and the
load-and-inspect steps the job runs before launch and each worker runs once."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Optional

import numpy as np

from transforms.inference.devices import prepare_devices
from transforms.augmentation import Augmentation, scaled_side
from transforms.inference.confidence import IGNORE_VALUE, LOGITS, scores_kind
from transforms.inference.head import probe_module
from transforms.inference.loaded import LoadedModel, TileOutputs
from transforms.inference.openvino_engine import (BLOB_CACHE, ENGINE_TENSORFLOW,
                                                  OpenVinoHRNet, effective_precision,
                                                  is_optimized_dir, read_manifest)
from transforms.inference.precision import FLOAT32, PrecisionUnsupportedError, apply_precision
from transforms.inference.sources import (DEFAULT_CACHE_DIR, STAGING_HELP, ModelLoadError,
                                          resolve_model_dir)

logger = logging.getLogger(__name__)

FEATURE_STRIDE = 4   # HRNet features are at 1/4 of the input (checked by inspect_model)
FUSED_FUNCTION = "predict_with_features"  # the stand-ins' one-pass function; hub models lack it


def pool_patches(features, patch_weights):
  """(B, slots, F) sums of the features under each patch's weight map (TensorFlow)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.einsum("bshw,bhwf->bsf", patch_weights, features)


class LoadedHRNet(LoadedModel):
  """A loaded HRNet SavedModel with one call that returns what was asked for.

  Masks come back as uint8 class ids (argmax inside TensorFlow: 1 byte per pixel
  leaves the graph instead of 4 per class). The backbone runs once for masks and
  features with a fused function, or with the model's own head found among its
  variables (head.py); otherwise `predict` and `get_features` run separately.
  `single_pass` says which one-pass path is used, None for two passes.
  """

  def __init__(self, module: Any, handle: str, local_dir: str, precision: str = FLOAT32):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    super().__init__(handle, local_dir, precision)
    self.engine = ENGINE_TENSORFLOW
    missing = [n for n in ("predict", "get_features") if not hasattr(module, n)]
    if missing:
      raise ModelLoadError(f"{handle} has no {' or '.join(missing)} function: not an HRNet "
                           "segmentation SavedModel")
    self._module = module
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32)]

    def class_ids(scores):
      return tf.cast(tf.argmax(scores, axis=-1), tf.uint8)

    fused = getattr(module, FUSED_FUNCTION, None)
    self.has_fused_function = fused is not None
    probe = probe_module(module, search_head=fused is None)
    if fused is not None:
      self.single_pass = f"the model's fused function {FUSED_FUNCTION}"
      def scores_and_features(images):
        out = fused(images)
        return out["predictions"], out["features"]
    else:
      search = probe.search
      if search.head is not None:
        self.single_pass = search.reason
        head = search.head
        def scores_and_features(images):
          features = module.get_features(images)
          return head(features, tf.shape(images)[1:3]), features
      else:
        self.single_pass = None
        logger.warning("Masks and features need two backbone passes per tile with %s: %s",
                       handle, search.reason)
        def scores_and_features(images):
          return module.predict(images), module.get_features(images)

    def both(images):
      scores, features = scores_and_features(images)
      return class_ids(scores), features
    self._both = tf.function(both, input_signature=spec)
    weights_spec = [tf.TensorSpec([None, None, None, 3], tf.float32),
                    tf.TensorSpec([None, None, None], tf.float32)]

    def pool(features, weights):
      # Pixel-weighted sums per image: 720 numbers leave the device instead of the map.
      return tf.einsum("bhw,bhwf->bf", weights, features)

    def both_pooled(images, weights):
      ids, features = both(images)
      return ids, pool(features, weights)
    self._both_pooled = tf.function(both_pooled, input_signature=weights_spec)
    self._features_pooled = tf.function(
        lambda images, weights: pool(module.get_features(images), weights),
        input_signature=weights_spec)

    def features_and_patches(images, weights, patch_weights):
      features = module.get_features(images)
      return pool(features, weights), pool_patches(features, patch_weights)
    self._features_and_patches = tf.function(features_and_patches, input_signature=[
        *weights_spec, tf.TensorSpec([None, None, None, None], tf.float32)])
    self._masks = tf.function(lambda images: class_ids(module.predict(images)),
                              input_signature=spec)
    self._features = tf.function(module.get_features, input_signature=spec)
    self._build_tile_functions(tf, scores_and_features, probe.scores)

  def _build_tile_functions(self, tf, scores_and_features, probe_scores) -> None:
    """The job's model calls: probabilities (softmax only if predict gives logits, averaged
    over the test-time augmentation's passes), then per pixel the class id, confidence and
    pseudo-label, and per tile the QA sums over `pixel_weights` and the features pooled by
    `cell_weights`; only these leave TF. One traced function per augmentation and need."""
    self.scores_kind = scores_kind(probe_scores)
    softmax = self.scores_kind == LOGITS
    self._scores_and_features = scores_and_features
    self._softmax = softmax
    self._tile_functions = {}

  def _tile_function(self, augmentation: Augmentation, want_features: bool,
                     want_confidence: bool, want_pseudo: bool, shape: tuple,
                     want_patches: bool = False):
    # Rescaled passes need the tile's sides when traced: one function per input shape.
    # Otherwise one function serves every shape the grid picks: each trace of a large
    # model costs seconds (W48: about 10 s a shape on 2 vCPU, PERFORMANCE.md).
    generic = augmentation.scales == (1.0,)
    key = (augmentation, want_features, want_confidence, want_pseudo,
           None if generic else shape, want_patches)
    if key in self._tile_functions:
      return self._tile_functions[key]
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    module, softmax = self._module, self._softmax
    scores_and_features = self._scores_and_features

    def probabilities_of(scores):
      return tf.nn.softmax(scores) if softmax else scores

    def averaged(images):
      """Mean probabilities over the passes, and the features of the tile as it is."""
      size = tf.shape(images)[1:3]
      height, width = images.shape[1], images.shape[2]
      total, features = None, None
      for scale in augmentation.scales:
        scaled = images
        if scale != 1.0:
          scaled = tf.image.resize(images, (scaled_side(height, scale),
                                            scaled_side(width, scale)), "bilinear")
        for flipped in ((False, True) if augmentation.flip else (False,)):
          batch = tf.reverse(scaled, axis=[2]) if flipped else scaled
          if want_features and scale == 1.0 and not flipped:
            scores, features = scores_and_features(batch)
          else:
            scores = module.predict(batch)
          probabilities = probabilities_of(scores)
          if flipped:
            probabilities = tf.reverse(probabilities, axis=[2])
          if scale != 1.0:
            probabilities = tf.image.resize(probabilities, size, "bilinear")
          total = probabilities if total is None else total + probabilities
      return total / float(augmentation.passes), features

    def summaries(probabilities, pixel_weights, threshold, ignore_below):
      classes = tf.shape(probabilities)[-1]
      # Top-1 and top-2 without tf.math.top_k (2.5x slower on CPU for a few classes):
      # a tie for the top makes the second best equal to the best.
      confidence = tf.reduce_max(probabilities, axis=-1)
      is_top = probabilities >= confidence[..., None]
      second = tf.where(tf.reduce_sum(tf.cast(is_top, tf.int32), axis=-1) >= 2, confidence,
                        tf.reduce_max(tf.where(is_top, tf.zeros_like(probabilities),
                                               probabilities), axis=-1))
      margin = confidence - second
      entropy = -tf.reduce_sum(tf.math.xlogy(probabilities, probabilities), axis=-1) / (
          tf.math.log(tf.cast(classes, tf.float32)))
      ids = tf.argmax(probabilities, axis=-1)
      weights = tf.cast(pixel_weights, tf.float64)
      per_pixel = tf.cast(tf.stack([confidence, margin, entropy,
                                    tf.cast(confidence < threshold, tf.float32)], -1),
                          tf.float64)
      qa = tf.einsum("bhw,bhwq->bq", weights, per_pixel)
      class_confidence = tf.einsum("bhw,bhwc->bc", weights * tf.cast(confidence, tf.float64),
                                   tf.one_hot(ids, classes, dtype=tf.float64))
      ids = tf.cast(ids, tf.uint8)
      unused = tf.zeros([0], tf.uint8)   # maps not asked for are not computed
      pseudo = (tf.where(confidence < ignore_below, tf.constant(IGNORE_VALUE, tf.uint8), ids)
                if want_pseudo else unused)
      confidence_8bit = (tf.cast(tf.round(confidence * 255.0), tf.uint8) if want_confidence
                         else unused)
      return ids, confidence_8bit, pseudo, qa, class_confidence

    def signature(*ranks):
      """Shape-generic inputs: images, then each argument's rank (0 for a scalar)."""
      return [tf.TensorSpec([None, None, None, 3], tf.float32)] + [
          tf.TensorSpec([None] * rank, tf.float32) for rank in ranks]

    def traced(function, *ranks):
      return tf.function(function, input_signature=signature(*ranks) if generic else None)

    if want_patches:
      def with_patches(images, cell_weights, pixel_weights, threshold, ignore_below,
                       patch_weights):
        probabilities, features = averaged(images)
        return (*summaries(probabilities, pixel_weights, threshold, ignore_below),
                tf.einsum("bhw,bhwf->bf", cell_weights, features),
                pool_patches(features, patch_weights))
      function = traced(with_patches, 3, 3, 0, 0, 4)
    elif want_features:
      def with_features(images, cell_weights, pixel_weights, threshold, ignore_below):
        probabilities, features = averaged(images)
        return (*summaries(probabilities, pixel_weights, threshold, ignore_below),
                tf.einsum("bhw,bhwf->bf", cell_weights, features))
      function = traced(with_features, 3, 3, 0, 0)
    else:
      def masks_only(images, pixel_weights, threshold, ignore_below):
        return summaries(averaged(images)[0], pixel_weights, threshold, ignore_below)
      function = traced(masks_only, 3, 0, 0)
    self._tile_functions[key] = function
    return function

  def infer_tiles(self, images: np.ndarray, want_masks: bool, want_features: bool,
                  cell_weights: np.ndarray, pixel_weights: np.ndarray,
                  threshold: float = 0.5, ignore_below: float | None = None,
                  augmentation: Augmentation = Augmentation(),
                  want_confidence: bool = True,
                  patch_weights: Optional[np.ndarray] = None) -> TileOutputs:
    """The job's call: (B, H, W, 3) float32 tiles -> TileOutputs. pixel_weights (B, H, W)
    select the pixels the QA sums count, cell_weights (B, H/4, W/4) pool the features,
    patch_weights (B, slots, H/4, W/4), with features, pool them per patch."""
    if images.dtype != np.float32:
      raise TypeError(f"images must be float32 in [0, 1], got {images.dtype}")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    ignore = tf.constant(-1.0 if ignore_below is None else ignore_below, tf.float32)
    threshold = tf.constant(threshold, tf.float32)
    want_patches = want_features and patch_weights is not None
    if not want_masks:
      if want_patches:
        pooled, patches = self._features_and_patches(
            images, np.asarray(cell_weights, np.float32),
            np.asarray(patch_weights, np.float32))
        return TileOutputs(features=pooled.numpy(), patch_features=patches.numpy())
      return TileOutputs(features=self._features_pooled(
          images, np.asarray(cell_weights, np.float32)).numpy())
    pixel_weights = np.asarray(pixel_weights, np.float32)
    function = self._tile_function(augmentation, want_features, want_confidence,
                                   ignore_below is not None, images.shape, want_patches)
    patch_features = None
    if want_patches:
      *maps, features, patch_features = function(
          images, np.asarray(cell_weights, np.float32), pixel_weights, threshold, ignore,
          np.asarray(patch_weights, np.float32))
      features, patch_features = features.numpy(), patch_features.numpy()
    elif want_features:
      *maps, features = function(images, np.asarray(cell_weights, np.float32), pixel_weights,
                                 threshold, ignore)
      features = features.numpy()
    else:
      maps, features = function(images, pixel_weights, threshold, ignore), None
    ids, confidence, pseudo, qa, class_confidence = (m.numpy() for m in maps)
    return TileOutputs(ids, confidence if want_confidence else None,
                       pseudo if ignore_below is not None else None, qa, class_confidence,
                       features, patch_features)

  def one_pass_function(self):
    """A tf.function: images (B, H, W, 3) -> {'scores', 'features'}, one backbone pass
    where the model allows it: what `hrnet-beam optimize` converts."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    scores_and_features = self._scores_and_features

    def one_pass(images):
      scores, features = scores_and_features(images)
      return {"scores": scores, "features": features}
    return tf.function(one_pass, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.float32)])

  def infer(self, images: np.ndarray, want_masks: bool, want_features: bool,
            cell_weights: Optional[np.ndarray] = None
            ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """images (B, H, W, 3) float32 in [0, 1] -> (class ids (B,H,W) uint8, features).

    Features are the maps (B, H/4, W/4, F), or with cell_weights (B, H/4, W/4) their
    weighted sums (B, F), computed where the model runs.
    """
    if images.dtype != np.float32:
      # A float32 signature casts uint8 without scaling: never let that happen silently.
      raise TypeError(f"images must be float32 in [0, 1], got {images.dtype}")
    if want_features and cell_weights is not None:
      weights = np.asarray(cell_weights, np.float32)
      if want_masks:
        ids, sums = self._both_pooled(images, weights)
        return ids.numpy(), sums.numpy()
      return None, self._features_pooled(images, weights).numpy()
    if want_masks and want_features:
      ids, features = self._both(images)
      return ids.numpy(), features.numpy()
    if want_masks:
      return self._masks(images).numpy(), None
    return None, self._features(images).numpy()

  def probe(self, size: int = 64) -> tuple[int, int, int]:
    """(num_classes, feature_dim, feature cells) from one small all-zero image."""
    images = np.zeros((1, size, size, 3), np.float32)
    scores = self._module.predict(images)
    features = self._module.get_features(images)
    if scores.shape[1:3] != (size, size):
      raise ModelLoadError(f"{self.handle}: predict returned {tuple(scores.shape)} for a "
                           f"{size}x{size} image; expected (1, {size}, {size}, classes)")
    return int(scores.shape[-1]), int(features.shape[-1]), int(features.shape[1])


# A model loaded by the pre-launch check, kept for a worker running in the same process
# (the local runner, in memory) so it is not loaded twice; see keep_for_local_worker.
_PRELOADED: dict = {}


def release_preloaded() -> None:
  _PRELOADED.clear()


def load_hrnet(handle: str, cache_dir: str = DEFAULT_CACHE_DIR, require_gpu: bool = False,
               precision: str = FLOAT32, precision_fallback: str = "float32",
               threads: tuple = (0, 0)) -> LoadedModel:
  """Loads the model or raises ModelLoadError naming it, the cause and how to stage it:
  a LoadedHRNet (TensorFlow) for a SavedModel, an OpenVinoHRNet for an optimized model.

  The precision is switched on before the model's functions are first traced; a
  precision the hardware lacks raises PrecisionUnsupportedError or falls back to float32.
  """
  preloaded = _PRELOADED.pop((handle, cache_dir, precision, precision_fallback), None)
  if preloaded is not None:
    if preloaded.engine == ENGINE_TENSORFLOW:   # this worker's check, before any call
      prepare_devices(require_gpu, *threads)
    elif require_gpu:
      raise ModelLoadError(_OPTIMIZED_ON_GPU.format(handle=handle))
    logger.info("Using the model %s loaded by the pre-launch check", handle)
    return preloaded
  try:
    local_dir = resolve_model_dir(handle, cache_dir)
    started = time.monotonic()
    if is_optimized_dir(local_dir):
      model = _load_optimized(handle, local_dir, precision, precision_fallback, threads,
                              require_gpu, os.path.join(cache_dir, BLOB_CACHE))
    else:
      prepare_devices(require_gpu, *threads)
      choice = apply_precision(precision, precision_fallback)
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      module = tf.saved_model.load(local_dir)
      model = LoadedHRNet(module, handle, local_dir, choice.effective)
  except PrecisionUnsupportedError:
    raise
  except ModelLoadError as e:
    raise ModelLoadError(f"Cannot load model {handle!r}: {e}. {STAGING_HELP}") from e
  except Exception as e:  # network, tarball and SavedModel errors come in many types
    raise ModelLoadError(
        f"Cannot load model {handle!r}: {type(e).__name__}: {e}. {STAGING_HELP}") from e
  logger.info("Loaded model %s from %s in %.1f s (one backbone pass for masks and features: "
              "%s; precision: %s)", handle, local_dir, time.monotonic() - started,
              model.single_pass or "no", model.runs_at)
  return model


_OPTIMIZED_ON_GPU = ("{handle} is an optimized model, which runs on the CPU (OpenVINO): drop "
                     "--require_gpu and the worker accelerator, or run the SavedModel")


def _load_optimized(handle: str, local_dir: str, precision: str, fallback: str,
                    threads: tuple, require_gpu: bool, blob_cache: str) -> OpenVinoHRNet:
  """An optimized model (hrnet-beam optimize) on the OpenVINO engine, without TensorFlow:
  its precision is its manifest's (bfloat16 may fall back to float32 as --precision does);
  its compiled models cached in blob_cache, paid once per machine."""
  if precision != FLOAT32:
    raise ModelLoadError(f"{handle} is an optimized model, whose precision was chosen when "
                         f"it was optimized: drop --precision {precision}")
  if require_gpu:
    raise ModelLoadError(_OPTIMIZED_ON_GPU.format(handle=handle))
  manifest = read_manifest(local_dir)
  effective = effective_precision(manifest["precision"], fallback)
  return OpenVinoHRNet(handle, local_dir, effective, threads[0],
                       tensorflow_engine=functools.partial(
                           _tensorflow_around, handle=handle, local_dir=local_dir,
                           precision=effective), blob_cache=blob_cache)


def _tensorflow_around(module, handle: str, local_dir: str, precision: str) -> LoadedHRNet:
  """The TensorFlow engine over a SavedModel-like module (an IR's OpenVinoModule), at
  float32 around it: what test-time augmentation over an optimized model runs."""
  apply_precision(FLOAT32, "float32")
  return LoadedHRNet(module, handle, local_dir, precision)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  num_classes: int
  feature_dim: int
  has_fused_function: bool
  local_dir: str
  scores_kind: str = LOGITS    # what predict returns: probabilities or logits
  engine: str = ENGINE_TENSORFLOW
  manifest: Optional[dict] = None   # an optimized model's (openvino_engine.py)
  input_shape: Optional[tuple] = None   # an optimized model's (B, H, W, C); -1: any


def inspect_model(handle: str, cache_dir: str = DEFAULT_CACHE_DIR,
                  keep_for_local_worker: bool = False, precision: str = FLOAT32,
                  precision_fallback: str = "float32", threads: tuple = (0, 0)) -> ModelInfo:
  """Loads the model once, before launch, and reports what the pipeline needs to know.

  With keep_for_local_worker, the loaded model is handed to the first load_hrnet of the
  same handle in this process (a worker of the in-memory local runner). Pass the job's
  precision only when workers run on this machine: elsewhere its hardware says nothing.
  """
  model = load_hrnet(handle, cache_dir, precision=precision,
                     precision_fallback=precision_fallback, threads=threads)
  num_classes, feature_dim, cells = model.probe()
  if cells * 4 != 64:
    raise ModelLoadError(f"{handle}: get_features returned {cells} cells for 64 pixels; "
                         "HRNet features are at 1/4 resolution")
  if keep_for_local_worker:
    _PRELOADED[(handle, cache_dir, precision, precision_fallback)] = model
  return ModelInfo(num_classes, feature_dim, model.has_fused_function, model.local_dir,
                   model.scores_kind, model.engine, model.manifest, model.fixed_shape)
