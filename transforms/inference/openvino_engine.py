"""The OpenVINO engine: an optimized model (`hrnet-beam optimize`) behind the same calls as
a SavedModel's (LoadedModel), run by OpenVINO without TensorFlow: the backbone, then the
post-processing (probabilities, class ids, QA values, pooling) as a float32 OpenVINO graph.

An optimized model directory holds the IR (model.xml, model.bin), the labels file and
a manifest (hrnet_beam_openvino.json) saying where it came from and at what precision
it runs. The IR has one input (B, H, W, 3) with dynamic batch, height and width, and two
outputs: 'scores' (B, H, W, classes), as the source model's predict returned them
(probabilities or logits), and 'features' (B, H/4, W/4, F).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Optional

import numpy as np

from transforms.augmentation import Augmentation
from transforms.inference.confidence import LOGITS, tile_summaries
from transforms.inference.loaded import LoadedModel, TileOutputs
from transforms.inference.precision import (BF16_CPU_FLAGS, FALLBACK_FAIL, FLOAT32,
                                            PrecisionUnsupportedError, read_cpu_flags)
from transforms.inference.sources import OPTIMIZED_MANIFEST

logger = logging.getLogger(__name__)

ENGINE_TENSORFLOW = "tensorflow"
ENGINE_OPENVINO = "openvino"
MANIFEST = OPTIMIZED_MANIFEST
IR_FILE = "model.xml"
SCORES, FEATURES = "scores", "features"
INT8, BFLOAT16 = "int8", "bfloat16"
OPTIMIZED_PRECISIONS = (FLOAT32, BFLOAT16, INT8)
# The manifest's "shapes": the backbone compiled once for any size, or once per tile shape
# (hrnet-beam optimize --static_shapes); rows differ between the two, never run to run.
DYNAMIC_SHAPES, STATIC_SHAPES = "dynamic", "static per tile shape"
MAX_STATIC_VARIANTS = 8   # compiled backbones kept at once; more tile shapes: least recent out
BLOB_CACHE = "openvino-blobs"   # OpenVINO's compiled-model cache, under the model cache dir


def is_optimized_dir(local_dir: str) -> bool:
  return os.path.exists(os.path.join(local_dir, MANIFEST))


def read_manifest(local_dir: str) -> dict:
  with open(os.path.join(local_dir, MANIFEST), encoding="utf-8") as f:
    return json.load(f)


def bf16_unsupported_reason(flags: frozenset) -> Optional[str]:
  if not any(flag in flags for flag in BF16_CPU_FLAGS):
    return ("this CPU has neither AVX512-BF16 nor AMX (no avx512_bf16 or amx_bf16 flag): "
            "OpenVINO would emulate bfloat16")
  return None


def effective_precision(precision: str, fallback: str, flags: frozenset | None = None) -> str:
  """What an optimized model runs at here: its own precision, or float32 where a
  bfloat16 model meets a CPU without bfloat16 (or an error with --precision_fallback fail)."""
  if precision != BFLOAT16:
    return precision
  reason = bf16_unsupported_reason(read_cpu_flags() if flags is None else flags)
  if reason is None:
    return precision
  if fallback == FALLBACK_FAIL:
    raise PrecisionUnsupportedError(f"the optimized model runs bfloat16, which cannot run "
                                    f"here: {reason}. Pass --precision_fallback float32.")
  logger.warning("The optimized model's bfloat16 cannot run here: %s. Running float32; "
                 "rows record the precision used.", reason)
  return FLOAT32


def compile_config(precision: str, threads: int = 0, streams: bool = False) -> dict:
  """OpenVINO's CPU settings: the latency hint (one stream using the process's threads)
  or, with `streams`, the throughput hint (as many streams as OpenVINO finds fit for
  those threads, each running one request); and the inference precision said out loud:
  CPUs with bfloat16 default to it, which float32 and int8 models must not get."""
  import openvino as ov  # pylint: disable=import-outside-toplevel
  import openvino.properties as props  # pylint: disable=import-outside-toplevel
  import openvino.properties.hint as hints  # pylint: disable=import-outside-toplevel
  mode = hints.PerformanceMode.THROUGHPUT if streams else hints.PerformanceMode.LATENCY
  config = {hints.performance_mode: mode,
            hints.inference_precision: ov.Type.bf16 if precision == BFLOAT16 else ov.Type.f32}
  if threads:
    config[props.inference_num_threads] = int(threads)
  return config


def _usable_directory(path: Optional[str]) -> Optional[str]:
  """path, created if need be, or None (logged) where it cannot be written: a cache that
  cannot be kept costs compile time, never the job."""
  if not path or "://" in path:
    return None
  try:
    os.makedirs(path, exist_ok=True)
    if os.access(path, os.W_OK):
      return path
  except OSError:
    pass
  logger.warning("OpenVINO's compiled-model cache %s cannot be written: compiling on each "
                 "load", path)
  return None


def _producer(model, name: str):
  """The value feeding the IR's output `name` (its Result node's input)."""
  return next(o for o in model.outputs if name in o.get_names()).get_node().input_value(0)


def backbone_model(ir_model, want_scores: bool):
  """The IR with the outputs a call needs: scores and features, or features alone (the
  head is then pruned, as get_features skips it in TensorFlow)."""
  import openvino as ov  # pylint: disable=import-outside-toplevel
  import openvino.opset13 as ops  # pylint: disable=import-outside-toplevel
  names = (SCORES, FEATURES) if want_scores else (FEATURES,)
  values = [_producer(ir_model, name) for name in names]
  for result in list(ir_model.get_results()):
    ir_model.remove_result(result)
  results = []
  for name, value in zip(names, values):
    result = ops.result(value)
    result.output(0).get_tensor().set_names({name})
    results.append(result)
  return ov.Model(results, ir_model.get_parameters(), f"hrnet_{'_'.join(names)}")


def post_processing_model(num_classes: int, feature_dim: int, scores_kind: str,
                          want_masks: bool):
  """The work after the backbone, as an OpenVINO graph run in float32 whatever the
  backbone's precision: probabilities (softmax where the model gives logits), per pixel
  the class id, confidence, margin and normalised entropy, and the features pooled under
  the cell weights and under each patch's weights. Only these leave OpenVINO.

  Inputs: features (B, h, w, F), cell_weights (B, h, w), patch_weights (B, S, h, w) and,
  with masks, scores (B, H, W, classes). Outputs: pooled (B, F), patches (B, S, F) and,
  with masks, class_ids (B, H, W) uint8 and stats (B, 3, H, W) float32."""
  import openvino as ov  # pylint: disable=import-outside-toplevel
  import openvino.opset13 as ops  # pylint: disable=import-outside-toplevel
  f32 = ov.Type.f32

  def constant(values, dtype=np.int64):
    return ops.constant(np.asarray(values, dtype))

  def parameter(name, shape):
    node = ops.parameter(ov.PartialShape(shape), f32, name=name)
    node.output(0).get_tensor().set_names({name})
    return node

  features = parameter(FEATURES, [-1, -1, -1, feature_dim])
  cell_weights = parameter("cell_weights", [-1, -1, -1])
  patch_weights = parameter("patch_weights", [-1, -1, -1, -1])
  cells = ops.reshape(features, constant([0, -1, feature_dim]), special_zero=True)
  # One MatMul for the tile's weights and its patches' (row 0, then one row per patch):
  # the feature map is read once, not twice (PERFORMANCE.md).
  weights = ops.concat([ops.reshape(cell_weights, constant([0, 1, -1]), special_zero=True),
                        ops.reshape(patch_weights, constant([0, 0, -1]), special_zero=True)],
                       1)
  pooled_rows = ops.matmul(weights, cells, False, False)

  def rows(values, start, stop):
    return ops.slice(values, constant([start]), constant([stop]), constant([1]),
                     constant([1]))

  outputs = {"pooled": ops.squeeze(rows(pooled_rows, 0, 1), constant([1])),
             "patches": rows(pooled_rows, 1, np.iinfo(np.int64).max)}
  parameters = [features, cell_weights, patch_weights]
  if want_masks:
    scores = parameter(SCORES, [-1, -1, -1, num_classes])
    parameters.append(scores)
    # Classes first: reductions over a plane per class vectorize; over the innermost
    # axis of 7 they ran 2-3x slower (PERFORMANCE.md).
    planes = ops.transpose(scores, constant([0, 3, 1, 2]))
    probabilities = ops.softmax(planes, 1) if scores_kind == LOGITS else planes
    # Top-1 and top-2 as the TensorFlow engine takes them: the first class of a tie for
    # the top is the class id (a stable TopK), and the tie makes the second equal the top.
    top_two = ops.topk(probabilities, ops.constant(np.int64(2)), 1, "max", "value", "i32",
                       stable=True)
    top, second = rows(top_two.output(0), 0, 1), rows(top_two.output(0), 1, 2)
    if scores_kind == LOGITS:
      # sum p log p without a logarithm per class (OpenVINO's CPU Log is not vectorized):
      # log p_i = z_i - max z - log s, and p_top = 1 / s, so
      # sum p log p = sum p_i (z_i - max z) + log p_top.
      centred = ops.subtract(planes, ops.reduce_max(planes, constant([1]), keep_dims=True))
      plogp = ops.add(ops.reduce_sum(ops.multiply(probabilities, centred), constant([1]),
                                     keep_dims=True), ops.log(top))
    else:
      zero = ops.constant(np.float32(0))
      plogp = ops.reduce_sum(ops.select(
          ops.greater(probabilities, zero),
          ops.multiply(probabilities, ops.log(probabilities)), zero),
          constant([1]), keep_dims=True)
    entropy = ops.maximum(ops.multiply(plogp, ops.constant(np.float32(-1 / np.log(
        num_classes)))), ops.constant(np.float32(0)))
    outputs["stats"] = ops.concat([top, ops.subtract(top, second), entropy], 1)
    outputs["class_ids"] = ops.convert(ops.squeeze(rows(top_two.output(1), 0, 1),
                                                   constant([1])), "u8")
  results = []
  for name, node in outputs.items():
    result = ops.result(node)
    result.output(0).get_tensor().set_names({name})
    results.append(result)
  return ov.Model(results, parameters, "hrnet_beam_post_processing")


class OpenVinoHRNet(LoadedModel):
  """An optimized model (hrnet-beam optimize) run by OpenVINO alone: the backbone at the
  model's precision, then post_processing_model in float32, the backbone's outputs handed
  over in place. No TensorFlow is imported, except for test-time augmentation, whose
  passes are averaged by the TensorFlow engine's own code (OpenVinoModule).

  A call of several images runs them on OpenVINO's throughput streams, one image per
  request, each writing into its slot of one batch of outputs; a call of one image runs
  on one latency stream using all the threads. So an image's backbone outputs depend on
  the image and on the call size being 1 or more, never on the call's other images: an
  empty slot (a padded one, all of its weights zero) is not run at all. The
  post-processing then runs once over the batch.

  Compiled models are made on first use and kept: the backbone with or without the head,
  with streams or not, and the post-processing with or without masks. An IR optimized
  with static shapes gets a backbone compiled per tile shape (batch 1, as every request
  runs one image), the MAX_STATIC_VARIANTS most recently used kept. With a blob cache
  directory, OpenVINO stores each compiled model there and later loads read it instead of
  compiling again: once per machine (the loaded model is the same, and so are rows)."""

  engine = ENGINE_OPENVINO

  def __init__(self, handle: str, local_dir: str, precision: str, threads: int = 0,
               tensorflow_engine=None, blob_cache: Optional[str] = None):
    """tensorflow_engine: module -> LoadedModel, the TensorFlow engine wrapped around a
    SavedModel-like module (OpenVinoModule), for test-time augmentation; given by the
    loader, so that this engine never imports the TensorFlow one. blob_cache: a
    directory for OpenVINO's compiled-model cache, or None for none."""
    super().__init__(handle, local_dir, precision)
    import openvino as ov  # pylint: disable=import-outside-toplevel
    self.manifest = read_manifest(local_dir)
    self.scores_kind = self.manifest.get("scores_kind", LOGITS)
    self.single_pass = f"OpenVINO IR ({self.manifest.get('one_pass', 'one pass')})"
    self.has_fused_function = True
    self.num_classes = int(self.manifest["num_classes"])
    self.feature_dim = int(self.manifest["feature_dim"])
    self._core = ov.Core()
    self.static_shapes = self.manifest.get("shapes", DYNAMIC_SHAPES) == STATIC_SHAPES
    self.blob_cache = _usable_directory(blob_cache)
    if self.blob_cache:
      import openvino.properties as props  # pylint: disable=import-outside-toplevel
      self._core.set_property({props.cache_dir: self.blob_cache})
    # Read once: each compiled variant edits a clone of it (backbone_model).
    self._ir = self._core.read_model(os.path.join(local_dir, IR_FILE))
    self._threads = threads
    self._shape = tuple(None if d.is_dynamic else d.get_length() for d in list(
        self._ir.input(0).get_partial_shape()))
    self.fixed_shape = tuple(-1 if d is None else d for d in self._shape)
    self._compiled = collections.OrderedDict()   # key -> infer requests, least recent first
    self._buffers = {}   # name -> flat float32 array, grown to the largest call so far
    self._lock = threading.Lock()   # one call at a time: calls from threads take turns
    self._tensorflow = None
    self._make_tensorflow_engine = tensorflow_engine

  def _requests(self, key: tuple) -> list:
    """The infer requests of one compiled variant: one for the latency hint, as many as
    OpenVINO says keep its streams busy for the throughput hint."""
    if key in self._compiled:
      self._compiled.move_to_end(key)
    else:
      kind, flag, streams, side = key
      if kind == "backbone":
        model = backbone_model(self._ir.clone(), flag)
        if side is not None:
          import openvino as ov  # pylint: disable=import-outside-toplevel
          model.reshape({model.input(0): ov.PartialShape([1, *side, 3])})
          static = [k for k in self._compiled if k[3] is not None]
          if len(static) >= MAX_STATIC_VARIANTS:
            del self._compiled[static[0]]
          logger.info("Compiling the backbone of %s for %dx%d tiles", self.handle, *side)
        config = compile_config(self.runs_at, self._threads, streams)
      else:
        model = post_processing_model(self.num_classes, self.feature_dim,
                                      self.scores_kind, flag)
        config = compile_config(FLOAT32, self._threads)
      compiled = self._core.compile_model(model, "CPU", config)
      count = 1
      if streams:
        import openvino.properties as props  # pylint: disable=import-outside-toplevel
        count = max(1, int(compiled.get_property(props.optimal_number_of_infer_requests)))
      self._compiled[key] = [compiled.create_infer_request() for _ in range(count)]
    return self._compiled[key]

  @property
  def compiled_shapes(self) -> list:
    """The tile shapes (height, width) with a backbone compiled for them and kept (an IR
    optimized with static shapes); [] for one compiled for any size."""
    return sorted({key[3] for key in self._compiled if key[3] is not None})

  def _buffer(self, name: str, shape: tuple) -> np.ndarray:
    size = int(np.prod(shape))
    if self._buffers.get(name) is None or self._buffers[name].size < size:
      self._buffers[name] = np.zeros(size, np.float32)
    return self._buffers[name][:size].reshape(shape)

  def _backbone(self, images: np.ndarray, want_scores: bool,
                run: Optional[np.ndarray] = None) -> dict:
    """Scores and features of (B, H, W, 3) float32 images, as arrays that stay valid until
    the next backbone call. `run` (B booleans) leaves images out: their slots hold stale
    values. An IR with a fixed batch is called one batch at a time on one stream."""
    if images.dtype != np.float32:
      # A float32 input would take uint8 without scaling: never let that happen silently.
      raise TypeError(f"images must be float32 in [0, 1], got {images.dtype}")
    height, width = self._shape[1:3]
    if (height is not None and images.shape[1] != height) or (
        width is not None and images.shape[2] != width):
      raise ValueError(f"the optimized model takes only {height}x{width} inputs; got "
                       f"{images.shape[1]}x{images.shape[2]}")
    import openvino as ov  # pylint: disable=import-outside-toplevel
    names = (SCORES, FEATURES) if want_scores else (FEATURES,)
    batch, count = self._shape[0], images.shape[0]
    if batch is not None and batch != 1:   # chunks of the IR's batch, the last padded
      request = self._requests(("backbone", want_scores, False, None))[0]
      parts = []
      for start in range(0, count, batch):
        chunk = np.zeros((batch, *images.shape[1:]), np.float32)
        chunk[:min(batch, count - start)] = images[start:start + batch]
        request.infer({0: chunk})
        parts.append({n: np.array(request.get_tensor(n).data) for n in names})
      return {n: np.concatenate([p[n] for p in parts])[:count] for n in names}
    side = tuple(images.shape[1:3]) if self.static_shapes else None
    if count == 1:
      request = self._requests(("backbone", want_scores, False, side))[0]
      request.infer({0: np.ascontiguousarray(images)}, share_inputs=True,
                    share_outputs=True)
      return {n: request.get_tensor(n).data for n in names}
    images = np.ascontiguousarray(images)
    cells = (images.shape[1] // 4, images.shape[2] // 4)
    outputs = {FEATURES: self._buffer(FEATURES, (count, *cells, self.feature_dim))}
    if want_scores:
      outputs[SCORES] = self._buffer(SCORES, (count, *images.shape[1:3], self.num_classes))
    requests = self._requests(("backbone", want_scores, True, side))
    started = []
    try:
      for slot in range(count):
        if run is not None and not run[slot]:
          continue
        request = requests[len(started) % len(requests)]
        if len(started) >= len(requests):
          request.wait()
        for name, array in outputs.items():
          request.set_tensor(name, ov.Tensor(array[slot:slot + 1], shared_memory=True))
        request.start_async({0: images[slot:slot + 1]}, share_inputs=True)
        started.append(request)
    finally:   # every request done before the buffers are read or an error leaves
      errors = []
      for request in started[-len(requests):]:
        try:
          request.wait()
        except Exception as e:  # pylint: disable=broad-except
          errors.append(e)
      if errors:
        raise errors[0]
    return outputs

  def _post(self, backbone: dict, want_masks: bool, cell_weights, patch_weights) -> dict:
    features = backbone[FEATURES]
    batch, cells = features.shape[0], features.shape[1:3]
    if patch_weights is None:   # one empty slot: cheaper than a second compiled model
      patch_weights = np.zeros((batch, 1, *cells), np.float32)
    inputs = {FEATURES: features, "cell_weights": np.asarray(cell_weights, np.float32),
              "patch_weights": np.asarray(patch_weights, np.float32)}
    if want_masks:
      inputs[SCORES] = backbone[SCORES]
    request = self._requests(("post", want_masks, False, None))[0]
    request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()}, share_inputs=True)
    names = ("pooled", "patches") + (("class_ids", "stats") if want_masks else ())
    return {n: np.array(request.get_tensor(n).data) for n in names}

  def infer_tiles(self, images: np.ndarray, want_masks: bool, want_features: bool,
                  cell_weights: np.ndarray, pixel_weights: np.ndarray,
                  threshold: float = 0.5, ignore_below: float | None = None,
                  augmentation: Augmentation = Augmentation(),
                  want_confidence: bool = True,
                  patch_weights: Optional[np.ndarray] = None) -> TileOutputs:
    """The job's call, as LoadedHRNet.infer_tiles: (B, H, W, 3) float32 -> TileOutputs.
    A slot whose cell and pixel weights are all zero (padding) is not run."""
    if augmentation.passes > 1:
      return self._tensorflow_engine().infer_tiles(
          images, want_masks, want_features, cell_weights, pixel_weights, threshold,
          ignore_below, augmentation, want_confidence, patch_weights)
    count = len(images)
    run = (np.asarray(cell_weights).reshape(count, -1).any(axis=1) |
           np.asarray(pixel_weights).reshape(count, -1).any(axis=1))
    with self._lock:
      out = self._post(self._backbone(images, want_masks, run), want_masks, cell_weights,
                       patch_weights)
    want_patches = want_features and patch_weights is not None
    features = out["pooled"] if want_features else None
    patches = out["patches"] if want_patches else None
    if not want_masks:
      return TileOutputs(features=features, patch_features=patches)
    confidence, pseudo, qa, class_confidence = tile_summaries(
        out["class_ids"], out["stats"], pixel_weights, self.num_classes, threshold,
        ignore_below, want_confidence)
    return TileOutputs(out["class_ids"], confidence, pseudo, qa, class_confidence, features,
                       patches)

  def infer(self, images: np.ndarray, want_masks: bool, want_features: bool,
            cell_weights: Optional[np.ndarray] = None
            ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """As LoadedHRNet.infer: (class ids (B, H, W) uint8, feature maps or pooled sums)."""
    with self._lock:
      backbone = self._backbone(images, want_masks)
      ids = None
      if want_masks:
        ids = np.argmax(backbone[SCORES], axis=-1).astype(np.uint8)
      if not want_features:
        return ids, None
      if cell_weights is not None:
        return ids, self._post(backbone, False, cell_weights, None)["pooled"]
      return ids, np.array(backbone[FEATURES])

  def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, 3) float32 -> (scores, features) as numpy arrays of their own."""
    with self._lock:
      out = self._backbone(images, True)
      return np.array(out[SCORES]), np.array(out[FEATURES])

  def probe(self, size: int = 64) -> tuple[int, int, int]:
    """(num_classes, feature_dim, feature cells per `size` pixels) from blank images:
    the IR's own outputs, checked against its manifest. Two images, so that the probe
    compiles the streams variant the job's calls use (its default call size is 2). An
    IR of fixed size is probed at that size, and the cells scaled to `size`."""
    height, width = (d or size for d in self._shape[1:3])
    images = np.zeros((self._shape[0] or 2, height, width, 3), np.float32)
    scores, features = self.run(images)
    if scores.shape[1:3] != (height, width):
      raise ValueError(f"{self.handle}: the IR returned scores {tuple(scores.shape)} for a "
                       f"{height}x{width} image")
    if (scores.shape[-1], features.shape[-1]) != (self.num_classes, self.feature_dim):
      raise ValueError(f"{self.handle}: the IR outputs {scores.shape[-1]} classes and "
                       f"{features.shape[-1]} features, its manifest says {self.num_classes}"
                       f" and {self.feature_dim}: optimize the model again")
    return (int(scores.shape[-1]), int(features.shape[-1]),
            int(features.shape[1]) * size // height)

  def _tensorflow_engine(self):
    """The TensorFlow engine's post-processing over this IR (test-time augmentation)."""
    if self._tensorflow is None:
      if self._make_tensorflow_engine is None:
        raise ValueError(f"{self.handle}: --tta over an optimized model needs the "
                         "TensorFlow engine; load the model with load_hrnet")
      self._tensorflow = self._make_tensorflow_engine(OpenVinoModule(self))
    return self._tensorflow


class OpenVinoModule:
  """A SavedModel-like object over an OpenVinoHRNet: predict, get_features and the fused
  predict_with_features as TensorFlow ops (tf.numpy_function), so that test-time
  augmentation runs the TensorFlow engine's own averaging around the IR."""

  def __init__(self, model: OpenVinoHRNet):
    self._model = model
    self.manifest = model.manifest

  def predict_with_features(self, images):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    scores, features = tf.numpy_function(self._model.run, [images],
                                         [tf.float32, tf.float32], stateful=False)
    scores.set_shape([None, None, None, self.manifest["num_classes"]])
    features.set_shape([None, None, None, self.manifest["feature_dim"]])
    return {"predictions": scores, "features": features}

  def predict(self, images):
    return self.predict_with_features(images)["predictions"]

  def get_features(self, images):
    return self.predict_with_features(images)["features"]
