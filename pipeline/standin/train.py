"""Trains the demo model: a small HRNetV2 on synthetic aerial scenes, on the CPU.

    hrnet-beam train-demo --output models/demo --seconds 600

A toy, not the ISPRS model: HRNetV2-W8 with one block and one module per stage
(0.40M parameters), trained with Adam on 256x256 scenes generated on the fly
(pipeline/standin/scenes.py), then exported with the TF Hub models' interface plus the fused
function, and the scenes' labels file (pipeline/standin/scene_labels.json). Held-out scenes use
seeds below TRAIN_SEED_START, so they are never trained on.
"""
import logging
import time

import numpy as np

from pipeline.standin import hrnet, scenes

logger = logging.getLogger(__name__)

TRAIN_SEED_START = 1_000_000
NUM_LABELS = scenes.SCENE_CLASSES  # the labels the scenes use; the 7th output never occurs
DEMO_NOTE = ("toy model trained on synthetic aerial scenes by `hrnet-beam train-demo` "
             "(HRNetV2-W8, reduced depth): NOT the ISPRS model; use it to see the pipeline "
             "work")


def batch(rng, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  pairs = [scenes.generate_scene(size, size, int(rng.integers(TRAIN_SEED_START, 2**31)))
           for _ in range(count)]
  images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255
  return images, np.stack([p[1] for p in pairs]).astype(np.int32)


def confusion(predicted: np.ndarray, truth: np.ndarray, classes: int = NUM_LABELS) -> np.ndarray:
  valid = truth < classes
  return np.bincount(truth[valid].astype(np.int64) * classes + predicted[valid],
                     minlength=classes * classes).reshape(classes, classes)


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
  """IoU per class from a confusion matrix (rows: truth); NaN for classes never seen."""
  hits = np.diag(matrix).astype(np.float64)
  union = matrix.sum(0) + matrix.sum(1) - hits
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, hits / union, np.nan)


def train(output_dir: str, seconds: float, seed: int = 0, batch_size: int = 8,
          size: int = 256, learning_rate: float = 3e-3) -> dict:
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(seed)
  spec = hrnet.HRNetSpec.reduced(8, 7)
  model = hrnet.build_hrnet(spec)
  build = model
  optimizer = keras.optimizers.Adam(learning_rate)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function
  def step(images, labels):
    with tf.GradientTape() as tape:
      logits, _ = build(images, training=True)
      loss = loss_fn(labels, logits)
    grads = tape.gradient(loss, build.trainable_variables)
    optimizer.apply_gradients(zip(grads, build.trainable_variables))
    return loss

  rng = np.random.default_rng(seed)
  started, steps, losses = time.monotonic(), 0, []
  while time.monotonic() - started < seconds:
    losses.append(float(step(*batch(rng, size, batch_size))))
    steps += 1
    if steps % 50 == 0:
      logger.info("step %d, %.0f s, loss %.3f", steps, time.monotonic() - started,
                  np.mean(losses[-50:]))
  matrix = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
  for i in range(50):  # held out: seeds 0..49
    image, truth = scenes.generate_scene(size, size, i)
    logits, _ = model(image[None].astype(np.float32) / 255, training=False)
    matrix += confusion(np.argmax(logits.numpy()[0], -1), truth)
  ious = iou_per_class(matrix)
  report = {"steps": steps, "seconds": round(time.monotonic() - started, 1),
            "final_loss": round(float(np.mean(losses[-50:])), 4),
            "miou": round(float(np.nanmean(ious)), 4),
            "pixel_accuracy": round(float(np.trace(matrix) / matrix.sum()), 4),
            "iou": {c["name"]: (None if np.isnan(v) else round(float(v), 4)) for c, v in zip(
                scenes.scene_labels()["classes"], ious)}}
  labels = scenes.scene_labels()
  labels["note"] = DEMO_NOTE
  labels["channel_mapping"] = "rgb"  # trained on the scenes' RGB as they are
  labels["training"] = report
  hrnet.export_saved_model(lambda images: model(images, training=False),
                           hrnet.keras_variables(model), output_dir, labels=labels)
  return report
