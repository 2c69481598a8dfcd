"""HRNetV2 for semantic segmentation, built in Keras, and its export as a SavedModel.

The exported SavedModel has the interface of the TF Hub HRNet models
(`predict`, `get_features`) plus a fused `predict_with_features` that runs the
backbone once. Topology: Wang et al., HRNetV2 (see shared/HRNET.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from transforms import labels as labels_lib

logger = logging.getLogger(__name__)

FUSED_FUNCTION = "predict_with_features"
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class HRNetSpec:
  """What to build: `width` is W (48 for HRNetV2-W48); depth as in the paper by default."""
  width: int = 48
  num_classes: int = 7
  num_blocks: int = 4          # blocks per branch in every module (and Bottlenecks in stage 1)
  stage3_modules: int = 4
  stage4_modules: int = 3

  @classmethod
  def reduced(cls, width: int, num_classes: int) -> "HRNetSpec":
    """One block and one module per stage: same branches and head, loads in about a second."""
    return cls(width=width, num_classes=num_classes, num_blocks=1, stage3_modules=1,
               stage4_modules=1)

  @property
  def feature_dim(self) -> int:
    return 15 * self.width


def _keras():
  import keras  # pylint: disable=import-outside-toplevel
  return keras


def build_hrnet(spec: HRNetSpec):
  """Returns a Keras model: images (B,H,W,3) -> [logits at input size, features at 1/4]."""
  keras = _keras()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  layers = keras.layers

  class ResizeLike(layers.Layer):
    """Bilinear resize of x to the exact spatial size of ref (any size, not only /32)."""

    def call(self, inputs):
      x, ref = inputs
      return tf.image.resize(x, tf.shape(ref)[1:3], method="bilinear")

  def conv(x, filters, kernel, stride=1, bias=False):
    return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=bias)(x)

  def bn(x):
    return layers.BatchNormalization(momentum=0.9, epsilon=BN_EPSILON)(x)

  relu = layers.ReLU

  def basic_block(x, filters):
    y = relu()(bn(conv(x, filters, 3)))
    y = bn(conv(y, filters, 3))
    if x.shape[-1] != filters:
      x = bn(conv(x, filters, 1))
    return relu()(layers.Add()([x, y]))

  def bottleneck(x, planes):
    y = relu()(bn(conv(x, planes, 1)))
    y = relu()(bn(conv(y, planes, 3)))
    y = bn(conv(y, planes * 4, 1))
    if x.shape[-1] != planes * 4:
      x = bn(conv(x, planes * 4, 1))
    return relu()(layers.Add()([x, y]))

  def fuse(branches, channels):
    outputs = []
    for i, target in enumerate(branches):
      terms = []
      for j, source in enumerate(branches):
        if j == i:
          terms.append(source)
        elif j > i:  # lower resolution -> higher: 1x1 conv + BN, then upsample
          terms.append(ResizeLike()([bn(conv(source, channels[i], 1)), target]))
        else:  # higher resolution -> lower: (i - j) stride-2 3x3 convs
          y = source
          for step in range(i - j):
            last = step == i - j - 1
            y = bn(conv(y, channels[i] if last else channels[j], 3, stride=2))
            if not last:
              y = relu()(y)
          terms.append(y)
      outputs.append(relu()(layers.Add()(terms)) if len(terms) > 1 else terms[0])
    return outputs

  def module(branches, channels):
    branches = [x for x in branches]
    for _ in range(spec.num_blocks):
      branches = [basic_block(x, c) for x, c in zip(branches, channels)]
    return fuse(branches, channels)

  w = spec.width
  images = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
  x = relu()(bn(conv(images, 64, 3, stride=2)))
  x = relu()(bn(conv(x, 64, 3, stride=2)))
  for _ in range(spec.num_blocks):
    x = bottleneck(x, 64)
  branches = [relu()(bn(conv(x, w, 3))), relu()(bn(conv(x, 2 * w, 3, stride=2)))]
  branches = module(branches, [w, 2 * w])
  for channels, num_modules in (([w, 2 * w, 4 * w], spec.stage3_modules),
                                ([w, 2 * w, 4 * w, 8 * w], spec.stage4_modules)):
    branches = branches + [relu()(bn(conv(branches[-1], channels[-1], 3, stride=2)))]
    for _ in range(num_modules):
      branches = module(branches, channels)
  features = layers.Concatenate(name="features")(
      [branches[0]] + [ResizeLike()([b, branches[0]]) for b in branches[1:]])
  y = relu()(bn(conv(features, spec.feature_dim, 1, bias=True)))
  logits = ResizeLike(name="predictions")([conv(y, spec.num_classes, 1, bias=True), images])
  return keras.Model(images, [logits, features], name=f"hrnetv2_w{w}")


def recalibrate_batch_norm(model, images: np.ndarray) -> None:
  """One training-mode pass with momentum 0: BN statistics become those of `images`.

  Deep random HRNets are degenerate (one class everywhere) until this is done.
  """
  keras = _keras()
  norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  momenta = [l.momentum for l in norms]
  for layer in norms:
    layer.momentum = 0.0
  model(images, training=True)
  for layer, momentum in zip(norms, momenta):
    layer.momentum = momentum


def calibration_images(seed: int, size: int = 256, count: int = 2) -> np.ndarray:
  """Smooth random colour fields in [0, 1]: closer to photographs than white noise."""
  from transforms.inference.head import smooth_colour_images  # pylint: disable=import-outside-toplevel
  return smooth_colour_images(seed, size, size, count)


def export_saved_model(predict_and_features, variables, output_dir: str, *,
                       fused: bool = True, labels: dict | None = None) -> None:
  """Saves a SavedModel whose public functions all call one traced network.

  `predict_and_features(images)` returns (logits at input size, features). Only a flat
  list of variables is tracked (loading is then about twice as fast as a Keras object
  graph). With `fused=False` the model looks like the TF Hub ones: `predict` and
  `get_features` only.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  signature = [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
  module = tf.Module()
  module.weights = list(variables)
  module.predict = tf.function(lambda images: predict_and_features(images)[0],
                               input_signature=signature)
  module.get_features = tf.function(lambda images: predict_and_features(images)[1],
                                    input_signature=signature)
  if fused:
    setattr(module, FUSED_FUNCTION, tf.function(
        lambda images: dict(zip(("predictions", "features"), predict_and_features(images))),
        input_signature=signature))
  tf.saved_model.save(module, output_dir)
  if labels is not None:
    with open(os.path.join(output_dir, "labels.json"), "w", encoding="utf-8") as f:
      json.dump(labels, f, indent=2)


def keras_variables(model) -> list:
  """The tf.Variables behind a Keras 3 model's weights (what the traced graph captures)."""
  return [getattr(v, "value", v) for v in model.weights]


def export_hrnet(spec: HRNetSpec, output_dir: str, *, seed: int = 0, fused: bool = True,
                 labels: dict | None = None) -> int:
  """Builds, recalibrates and exports an HRNetV2; returns its parameter count."""
  keras = _keras()
  keras.utils.set_random_seed(seed)
  model = build_hrnet(spec)
  recalibrate_batch_norm(model, calibration_images(seed))
  export_saved_model(lambda images: model(images, training=False), keras_variables(model),
                     output_dir, fused=fused, labels=labels)
  return int(model.count_params())


def export_pixel_local(num_classes: int, feature_dim: int, output_dir: str, *,
                       seed: int = 0, labels: dict | None = None) -> None:
  """A model whose outputs depend on single pixels only: the exact oracle for tiling.

  `predict` is a per-pixel affine map of RGB; `get_features` samples a per-pixel map
  at the top-left pixel of every 4x4 cell, so tiled and untiled runs must agree exactly.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  class_weights = tf.Variable(rng.normal(0, 4, (3, num_classes)).astype(np.float32))
  class_bias = tf.Variable(rng.normal(0, 1, (num_classes,)).astype(np.float32))
  feature_weights = tf.Variable(rng.normal(0, 1, (3, feature_dim)).astype(np.float32))

  def predict_and_features(images):
    logits = tf.einsum("bhwc,ck->bhwk", images, class_weights) + class_bias
    features = tf.einsum("bhwc,ck->bhwk", images[:, ::4, ::4, :], feature_weights)
    return tf.nn.softmax(logits), tf.nn.relu(features)

  export_saved_model(predict_and_features, [class_weights, class_bias, feature_weights],
                     output_dir, labels=labels)


STAND_IN_NOTE = ("stand-in model with random weights: class names are those of the model it "
                 "stands in for, masks are meaningless")


def stand_in_labels(num_classes: int) -> dict:
  """A stand-in's labels file: the ISPRS names when the class count fits, else generic."""
  isprs = labels_lib.packaged_labels("isprs")
  chosen = isprs if isprs and isprs.num_classes == num_classes else (
      labels_lib.generic_labels(num_classes))
  data = chosen.to_json()
  data["note"] = STAND_IN_NOTE
  data["channel_mapping"] = "rgb"  # random weights: no training preprocessing to mimic
  return data
