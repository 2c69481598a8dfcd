"""A fitted head saved with its base model as a new model directory: a SavedModel with
the TF Hub interface (`predict`: the head's probabilities upsampled to the input size;
`get_features`: the base's features, unchanged) plus the one-pass function the job uses,
and the user's labels JSON, which names the base, the training images, the sample and
the seed. `run`, `optimize`, `evaluate`, `export`, `index` and `serve` take it as any
other model."""
from __future__ import annotations

import json
import os

from transforms.heads.train import Head
from transforms.inference.model import FUSED_FUNCTION


def save_head_model(base_module, head: Head, to: str, labels: dict) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  module = tf.Module()
  module.base = base_module
  module.mean = tf.Variable(head.mean, trainable=False, name="feature_mean")
  module.scale = tf.Variable(head.scale, trainable=False, name="feature_scale")
  module.head = [tf.Variable(w, trainable=False, name=f"head_{i}")
                 for i, w in enumerate(head.weights)]

  def logits(features):
    x = (features - module.mean) / module.scale
    x = tf.einsum("bhwf,fk->bhwk", x, module.head[0]) + module.head[1]
    if len(module.head) == 4:
      x = tf.einsum("bhwf,fk->bhwk", tf.nn.relu(x), module.head[2]) + module.head[3]
    return x

  def both(images):
    features = base_module.get_features(images)
    # Logits upsampled bilinearly, then softmax: as HRNetV2 brings its 1/4 head to size.
    scores = tf.nn.softmax(tf.image.resize(logits(features), tf.shape(images)[1:3],
                                           method="bilinear"))
    return scores, features

  signature = [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
  module.predict = tf.function(lambda images: both(images)[0], input_signature=signature)
  module.get_features = tf.function(base_module.get_features, input_signature=signature)
  setattr(module, FUSED_FUNCTION, tf.function(
      lambda images: dict(zip(("predictions", "features"), both(images))),
      input_signature=signature))
  tf.saved_model.save(module, to)
  with open(os.path.join(to, "labels.json"), "w", encoding="utf-8") as f:
    json.dump(labels, f, indent=2)
