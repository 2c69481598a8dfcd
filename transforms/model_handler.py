"""Loading HRNet SavedModels (TF Hub handle, local or gs:// directory) and RunInference on tiles.

Beam's stock TFModelHandlerTensor cannot serve these models: Keras 3's load_model
rejects them (apache/beam#30616) and it calls `model(batch)`, which they do not define.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler

from transforms.config import InferenceConfig, ModelConfig
from transforms.geo import NODATA_CLASS
from transforms.head import find_head, model_variables
from transforms.precision import FLOAT32, apply_precision
from transforms.tiling import cell_weight_map, map_channels, own_box_in_tile, to_unit_float
from transforms.types import Tile, TileResult

logger = logging.getLogger(__name__)

METRICS_NAMESPACE = "hrnet_beam"
FEATURE_STRIDE = 4   # HRNet features are at 1/4 of the input (checked by inspect_model)
FUSED_FUNCTION = "predict_with_features"  # the stand-ins' one-pass function; hub models lack it
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hrnet_beam", "models")

STAGING_HELP = (
    "To run without reaching tfhub.dev, stage the model once and point --model at the copy: "
    "download https://tfhub.dev/google/HRNet/<name>-hrnetv2-w48/1?tf-hub-format=compressed, "
    "extract the .tar.gz into a directory (it holds saved_model.pb and variables/), then "
    "pass that directory, or copy it to gs://BUCKET/models/NAME and pass that.")


class ModelLoadError(RuntimeError):
  """The model could not be loaded or is not an HRNet SavedModel; the message says why."""


def is_hub_handle(handle: str) -> bool:
  return handle.startswith(("http://", "https://"))


def _is_remote(handle: str) -> bool:
  return "://" in handle and not handle.startswith("file://")


def _copy_remote_model(uri: str, cache_dir: str) -> str:
  """Copies a SavedModel directory from gs:// (any Beam filesystem) to local disk.

  Once per machine: processes on the same machine wait on a file lock, and a finished
  copy is marked complete, so a thousand workers read the bucket once each, not per process.
  """
  prefix = uri.rstrip("/") + "/"
  dest = os.path.join(cache_dir, hashlib.sha1(prefix.encode()).hexdigest()[:20])
  marker = os.path.join(dest, ".hrnet_beam_complete")
  if os.path.exists(marker):
    return dest
  os.makedirs(cache_dir, exist_ok=True)
  with open(dest + ".lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(marker):
      return dest
    files = FileSystems.match([prefix + "**"])[0].metadata_list
    if not files:
      raise ModelLoadError(f"no files under {prefix}")
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for meta in files:
      relative = meta.path[len(prefix):]
      target = os.path.join(tmp, relative)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with FileSystems.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED
                            ) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    with open(marker, "w", encoding="utf-8") as f:
      f.write(uri)
  logger.info("Copied model %s to %s", uri, dest)
  return dest


def resolve_model_dir(handle: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
  """A local SavedModel directory for a TF Hub handle, a gs:// directory or a local one."""
  if is_hub_handle(handle):
    import tensorflow_hub as hub  # pylint: disable=import-outside-toplevel
    return hub.resolve(handle)
  if handle.startswith("file://"):
    handle = handle[len("file://"):]
  if _is_remote(handle):
    return _copy_remote_model(handle, cache_dir)
  if not os.path.isdir(handle):
    raise ModelLoadError(f"{handle} is not a directory")
  if not os.path.exists(os.path.join(handle, "saved_model.pb")):
    raise ModelLoadError(f"{handle} has no saved_model.pb: not a SavedModel directory")
  return handle


class LoadedHRNet:
  """A loaded HRNet SavedModel with one call that returns what was asked for.

  Masks come back as uint8 class ids (argmax inside TensorFlow: 1 byte per pixel
  leaves the graph instead of 4 per class). The backbone runs once for masks and
  features with a fused function, or with the model's own head found among its
  variables (head.py); otherwise `predict` and `get_features` run separately.
  `single_pass` says which one-pass path is used, None for two passes.
  """

  def __init__(self, module: Any, handle: str, local_dir: str, precision: str = FLOAT32):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    self.handle = handle
    self.local_dir = local_dir
    self._precision = precision   # what really runs (after any fallback)
    self._id = uuid.uuid4().hex[:12]
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
    if fused is not None:
      self.single_pass = f"the model's fused function {FUSED_FUNCTION}"
      def both(images):
        out = fused(images)
        return class_ids(out["predictions"]), out["features"]
    else:
      search = find_head(module, model_variables(module))
      if search.head is not None:
        self.single_pass = search.reason
        head = search.head
        def both(images):
          features = module.get_features(images)
          return class_ids(head(features, tf.shape(images)[1:3])), features
      else:
        self.single_pass = None
        logger.warning("Masks and features need two backbone passes per tile with %s: %s",
                       handle, search.reason)
        def both(images):
          return class_ids(module.predict(images)), module.get_features(images)
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
    self._masks = tf.function(lambda images: class_ids(module.predict(images)),
                              input_signature=spec)
    self._features = tf.function(module.get_features, input_signature=spec)

  def precision(self) -> str:
    """The precision that really runs (a method: shared models are proxies of methods)."""
    return self._precision

  def load_id(self) -> str:
    """Unique per load: a metric of distinct ids counts the model copies that served."""
    return self._id

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


class NoGpuError(RuntimeError):
  """A worker that was asked for a GPU sees none: stop rather than crawl on the CPU."""


def set_thread_pools(intra_op_threads: int, inter_op_threads: int) -> None:
  """TensorFlow's thread pools for this process (0 keeps TF's default: all cores).

  Several worker processes on one machine, each with a pool of all cores, fight over
  them; the pools can only be set before TensorFlow's runtime starts in the process.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for wanted, getter, setter in (
      (intra_op_threads, tf.config.threading.get_intra_op_parallelism_threads,
       tf.config.threading.set_intra_op_parallelism_threads),
      (inter_op_threads, tf.config.threading.get_inter_op_parallelism_threads,
       tf.config.threading.set_inter_op_parallelism_threads)):
    if wanted and getter() != wanted:
      try:
        setter(wanted)
      except RuntimeError:  # the runtime already started here: keep what it has
        logger.warning("TensorFlow already started in process %d; its thread pool stays "
                       "at %d threads instead of %d", os.getpid(), getter(), wanted)


def prepare_devices(require_gpu: bool, intra_op_threads: int = 0,
                    inter_op_threads: int = 0) -> list:
  """Thread pools and GPU memory growth (set before any model loads), and the GPU check."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  set_thread_pools(intra_op_threads, inter_op_threads)
  gpus = tf.config.list_physical_devices("GPU")
  for gpu in gpus:
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # already initialized in this process: keep its setting
      pass
  if require_gpu and not gpus:
    raise NoGpuError(
        "This worker was asked for a GPU (--require_gpu, or a worker_accelerator service "
        "option) but TensorFlow sees none: check the image has CUDA-enabled TensorFlow and "
        "the service option installs the NVIDIA driver (install-nvidia-driver). Stopping "
        "instead of running on the CPU for hours.")
  return gpus


# A model loaded by the pre-launch check, kept for a worker running in the same process
# (the local runner, in memory) so it is not loaded twice; see keep_for_local_worker.
_PRELOADED: dict = {}


def release_preloaded() -> None:
  _PRELOADED.clear()


def load_hrnet(handle: str, cache_dir: str = DEFAULT_CACHE_DIR, require_gpu: bool = False,
               precision: str = FLOAT32, precision_fallback: str = "float32",
               threads: tuple = (0, 0)) -> LoadedHRNet:
  """Loads the model or raises ModelLoadError naming it, the cause and how to stage it.

  The precision is switched on before the model's functions are first traced; a
  precision the hardware lacks raises PrecisionUnsupportedError or falls back to float32.
  """
  prepare_devices(require_gpu, *threads)
  choice = apply_precision(precision, precision_fallback)
  preloaded = _PRELOADED.pop((handle, cache_dir, precision, precision_fallback), None)
  if preloaded is not None:
    logger.info("Using the model %s loaded by the pre-launch check", handle)
    return preloaded
  try:
    local_dir = resolve_model_dir(handle, cache_dir)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    started = time.monotonic()
    module = tf.saved_model.load(local_dir)
    model = LoadedHRNet(module, handle, local_dir, choice.effective)
  except ModelLoadError as e:
    raise ModelLoadError(f"Cannot load model {handle!r}: {e}. {STAGING_HELP}") from e
  except Exception as e:  # network, tarball and SavedModel errors come in many types
    raise ModelLoadError(
        f"Cannot load model {handle!r}: {type(e).__name__}: {e}. {STAGING_HELP}") from e
  logger.info("Loaded model %s from %s in %.1f s (one backbone pass for masks and features: "
              "%s; precision: %s)", handle, local_dir, time.monotonic() - started,
              model.single_pass or "no", model.precision())
  return model


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  num_classes: int
  feature_dim: int
  has_fused_function: bool
  local_dir: str


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
  return ModelInfo(num_classes, feature_dim, model.has_fused_function, model.local_dir)


def _is_out_of_memory(error: Exception) -> bool:
  name = type(error).__name__
  return name == "ResourceExhaustedError" or "out of memory" in str(error).lower()


class HRNetModelHandler(ModelHandler[Tile, TileResult, LoadedHRNet]):
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

  def __init__(self, model: ModelConfig, inference: InferenceConfig, tile_size: int):
    share = inference.share_model_across_processes or inference.model_copies is not None
    super().__init__(min_batch_size=inference.min_batch_size,
                     max_batch_size=inference.max_batch_size,
                     large_model=share,
                     model_copies=inference.model_copies if share else None)
    self._model_config = model
    self._inference = inference
    self._tile_size = tile_size
    self._call_size = inference.model_batch_size
    self._metrics = None

  def load_model(self) -> LoadedHRNet:
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
          "load_ids": beam.metrics.Metrics.string_set(METRICS_NAMESPACE, "model_load_ids")}
    return self._metrics

  def run_inference(self, batch: Sequence[Tile], model: LoadedHRNet,
                    inference_args: Optional[dict[str, Any]] = None) -> Iterable[TileResult]:
    counters = self._counters()
    counters["load_ids"].add(model.load_id())
    results = self._infer_or_split(list(batch), model)
    counters["tiles_failed"].inc(sum(1 for r in results if r.error is not None))
    return results

  def _infer_or_split(self, tiles: list, model: LoadedHRNet) -> list:
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

  def _infer(self, tiles: list, model: LoadedHRNet) -> list:
    """Model outputs for the tiles' owned boxes; tiles whose owned box is all nodata are
    answered without the model, and nodata pixels get NODATA_CLASS and no feature weight."""
    boxes = [own_box_in_tile(tile.spec) for tile in tiles]
    valid_own = [None if tile.valid is None else tile.valid[y0:y1, x0:x1]
                 for tile, (y0, y1, x0, x1) in zip(tiles, boxes)]
    needed = [i for i, valid in enumerate(valid_own) if valid is None or valid.any()]
    class_ids = sums = None
    if needed:
      size, cells = self._tile_size, self._tile_size // FEATURE_STRIDE
      images = np.zeros((self._call_size, size, size, 3), np.float32)
      weights = np.zeros((self._call_size, cells, cells), np.float32)
      for slot, i in enumerate(needed):
        images[slot] = map_channels(to_unit_float(tiles[i].pixels),
                                    self._model_config.channel_mapping)
        weights[slot] = cell_weight_map(boxes[i], FEATURE_STRIDE, cells, tiles[i].valid)
      class_ids, sums = model.infer(images, self._inference.want_masks,
                                    self._inference.want_features, weights)
    counters = self._counters()
    counters["inferred"].inc(len(needed))
    counters["nodata"].inc(len(tiles) - len(needed))
    slot_of = {i: slot for slot, i in enumerate(needed)}
    precision = model.precision()
    results = []
    for i, tile in enumerate(tiles):
      box, valid, slot = boxes[i], valid_own[i], slot_of.get(i)
      y0, y1, x0, x1 = box
      ids = feature_sum = None
      if slot is None:  # nothing but nodata here: the model is not asked
        if self._inference.want_masks:
          ids = np.full((y1 - y0, x1 - x0), NODATA_CLASS, np.uint8)
        if self._inference.want_features:
          feature_sum = np.zeros(self._model_config.feature_dim, np.float64)
      else:
        if class_ids is not None:
          ids = np.array(class_ids[slot, y0:y1, x0:x1])
          if valid is not None:
            ids[~valid] = NODATA_CLASS
        if sums is not None:
          feature_sum = sums[slot].astype(np.float64)
      results.append(TileResult(
          tile.image, tile.spec, class_ids=ids, feature_sum=feature_sum, precision=precision,
          counted_pixels=None if valid is None else int(np.count_nonzero(valid))))
    return results
