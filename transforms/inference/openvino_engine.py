"""The OpenVINO engine: an optimized model (`hrnet-beam optimize`) served behind the
same calls as a SavedModel, so the job's handler, TTA, QA and pooling run unchanged.

An optimized model directory holds the IR (model.xml, model.bin), the labels file and
a manifest (hrnet_beam_openvino.json) saying where it came from and at what precision
it runs. The IR has one input (B, H, W, 3) with dynamic batch, height and width, and two
outputs: 'scores' (B, H, W, classes), as the source model's predict returned them
(probabilities or logits), and 'features' (B, H/4, W/4, F).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Optional

import numpy as np

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


def compile_config(precision: str, threads: int = 0) -> dict:
  """OpenVINO's CPU settings: latency hint (one stream using the process's threads, as
  each worker process runs one call at a time), and the inference precision said out
  loud: CPUs with bfloat16 default to it, which float32 and int8 models must not get."""
  import openvino as ov  # pylint: disable=import-outside-toplevel
  import openvino.properties as props  # pylint: disable=import-outside-toplevel
  import openvino.properties.hint as hints  # pylint: disable=import-outside-toplevel
  config = {hints.performance_mode: hints.PerformanceMode.LATENCY,
            hints.inference_precision: ov.Type.bf16 if precision == BFLOAT16 else ov.Type.f32}
  if threads:
    config[props.inference_num_threads] = int(threads)
  return config


class OpenVinoModule:
  """A SavedModel-like object over a compiled IR: predict, get_features and the fused
  predict_with_features, as TensorFlow ops (tf.numpy_function), so everything around
  the backbone (softmax, TTA, QA sums, pooling) is the TensorFlow engine's own code."""

  def __init__(self, local_dir: str, precision: str, threads: int = 0):
    import openvino as ov  # pylint: disable=import-outside-toplevel
    self.manifest = read_manifest(local_dir)
    core = ov.Core()
    model = core.read_model(os.path.join(local_dir, IR_FILE))
    self._compiled = core.compile_model(model, "CPU", compile_config(precision, threads))
    self._scores = self._compiled.output(SCORES)
    self._features = self._compiled.output(FEATURES)
    self._request = self._compiled.create_infer_request()
    self._lock = threading.Lock()   # one request: calls from several threads take turns
    self.input_shape = model.input(0).get_partial_shape()

  def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, 3) float32 -> (scores, features) as numpy arrays.

    An IR with a fixed size (the job refuses it unless the tiles have that size) still
    answers the load-time probes: smaller inputs are padded and the outputs cropped,
    one image at a time where its batch is fixed too."""
    batch, height, width = (None if d.is_dynamic else d.get_length()
                            for d in list(self.input_shape)[:3])
    if batch is not None and images.shape[0] != batch:
      parts = [self.run(images[i:i + 1]) for i in range(images.shape[0])]
      return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    pad_y = 0 if height is None else height - images.shape[1]
    pad_x = 0 if width is None else width - images.shape[2]
    if pad_y < 0 or pad_x < 0:
      raise ValueError(f"the optimized model takes {height}x{width} inputs at most; got "
                       f"{images.shape[1]}x{images.shape[2]}")
    if pad_y or pad_x:
      images = np.pad(images, ((0, 0), (0, pad_y), (0, pad_x), (0, 0)))
    with self._lock:
      results = self._request.infer({0: np.ascontiguousarray(images, np.float32)})
      scores = np.array(results[self._scores], np.float32)
      features = np.array(results[self._features], np.float32)
    if pad_y or pad_x:
      scores = scores[:, :scores.shape[1] - pad_y, :scores.shape[2] - pad_x]
      features = features[:, :features.shape[1] - pad_y // 4, :features.shape[2] - pad_x // 4]
    return scores, features

  def predict_with_features(self, images):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    scores, features = tf.numpy_function(self.run, [images], [tf.float32, tf.float32],
                                         stateful=False)
    scores.set_shape([None, None, None, self.manifest["num_classes"]])
    features.set_shape([None, None, None, self.manifest["feature_dim"]])
    return {"predictions": scores, "features": features}

  def predict(self, images):
    return self.predict_with_features(images)["predictions"]

  def get_features(self, images):
    return self.predict_with_features(images)["features"]
