"""Confidence from the model's scores: whether they are probabilities, the ignore value of
pseudo-labels, and the per-image QA numbers built from per-tile sums. Pure numpy."""
from __future__ import annotations

import numpy as np

from transforms.types import NODATA_CLASS

# Pixels of a pseudo-label mask whose confidence is below --ignore_below. Distinct from
# NODATA_CLASS (255) and from every class id (models with at most 254 classes).
IGNORE_VALUE = 254
MAX_CLASSES_WITH_IGNORE = IGNORE_VALUE
PROBABILITIES, LOGITS = "probabilities", "logits"
# Per-tile sums the model call returns, in this order (then one confidence sum per class).
QA_SUMS = ("confidence", "margin", "entropy", "low_confidence")


def scores_kind(scores: np.ndarray, tolerance: float = 1e-3) -> str:
  """PROBABILITIES when every pixel's scores are non-negative and sum to 1, else LOGITS."""
  scores = np.asarray(scores, np.float64)
  if scores.min() >= -tolerance and np.abs(scores.sum(axis=-1) - 1).max() <= tolerance:
    return PROBABILITIES
  return LOGITS


def image_qa(qa_sums: np.ndarray, class_confidence_sums: np.ndarray,
             class_counts: np.ndarray, counted: int) -> dict:
  """The QA columns of one image from its tiles' summed sums (nodata left out of both)."""
  if not counted:
    return {"mean_confidence": None, "mean_margin": None, "mean_entropy": None,
            "low_confidence_fraction": None, "class_mean_confidence": None}
  means = np.asarray(qa_sums, np.float64) / counted
  counts = np.asarray(class_counts, np.float64)
  per_class = [float(s / c) if c else None for s, c in zip(class_confidence_sums, counts)]
  return {"mean_confidence": float(means[0]), "mean_margin": float(means[1]),
          "mean_entropy": float(means[2]), "low_confidence_fraction": float(means[3]),
          "class_mean_confidence": per_class}


def reference_qa(probabilities: np.ndarray, valid: np.ndarray | None,
                 threshold: float) -> dict:
  """The QA columns computed directly from an image's (H, W, C) probabilities: the
  definition the model-side sums must reproduce."""
  p = np.asarray(probabilities, np.float64)
  keep = np.ones(p.shape[:2], bool) if valid is None else valid
  p = p[keep]
  top = np.sort(p, axis=-1)[:, ::-1]
  confidence, margin = top[:, 0], top[:, 0] - top[:, 1]
  with np.errstate(divide="ignore", invalid="ignore"):
    entropy = -np.where(p > 0, p * np.log(p), 0).sum(-1) / np.log(p.shape[-1])
  ids = p.argmax(-1)
  counts = np.bincount(ids, minlength=p.shape[-1])
  sums = np.array([confidence.sum(), margin.sum(), entropy.sum(),
                   (confidence < threshold).sum()])
  class_sums = np.bincount(ids, weights=confidence, minlength=p.shape[-1])
  return image_qa(sums, class_sums, counts, int(keep.sum()))


def pseudo_label(class_ids: np.ndarray, confidence: np.ndarray, ignore_below: float
                 ) -> np.ndarray:
  """Class ids with IGNORE_VALUE where confidence < ignore_below; nodata stays nodata."""
  pseudo = np.array(class_ids, np.uint8)
  pseudo[(confidence < ignore_below) & (pseudo != NODATA_CLASS)] = IGNORE_VALUE
  return pseudo


def tile_summaries(class_ids: np.ndarray, stats: np.ndarray, pixel_weights: np.ndarray,
                   num_classes: int, threshold: float, ignore_below: float | None,
                   want_confidence: bool) -> tuple:
  """The per-tile QA from per-pixel values computed where the model runs: class ids
  (B, H, W) and stats (B, 3, H, W) = confidence, margin, normalised entropy (float32).

  Returns (confidence as 8 bits or None, pseudo-labels or None, QA sums (B, 4) and
  per-class confidence sums (B, classes)); the sums are float64 over pixel_weights, as
  the TensorFlow engine's, so they do not depend on the order of a float32 reduction."""
  batch = len(class_ids)
  confidence = stats[:, 0]
  weights = np.asarray(pixel_weights, np.float64).reshape(batch, -1, 1)
  per_pixel = np.concatenate([np.asarray(stats, np.float64).reshape(batch, 3, -1),
                              (confidence < threshold).reshape(batch, 1, -1)], axis=1)
  qa = np.matmul(per_pixel, weights)[..., 0]
  weighted = weights[..., 0] * confidence.reshape(batch, -1).astype(np.float64)
  class_confidence = np.stack([
      np.bincount(ids.ravel(), weights=w, minlength=num_classes)[:num_classes]
      for ids, w in zip(class_ids, weighted)])
  confidence_8bit = (np.round(confidence * np.float32(255)).astype(np.uint8)
                     if want_confidence else None)
  pseudo = None
  if ignore_below is not None:
    pseudo = np.where(confidence < ignore_below, np.uint8(IGNORE_VALUE),
                      class_ids).astype(np.uint8)
  return confidence_8bit, pseudo, qa, class_confidence
