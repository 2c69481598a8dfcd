"""Which feature-grid pixels a head trains on: labels nearest-downsampled to the 1/4
feature grid, ignored and nodata pixels dropped, a class-balanced sample per image
(google-research stable_transfer's segmentation protocol). Pure numpy."""
from __future__ import annotations

import numpy as np

FEATURE_STRIDE = 4


def grid_labels(truth: np.ndarray, grid_shape: tuple) -> np.ndarray:
  """(H, W) labels -> (h, w): the label of the pixel nearest each feature cell's centre
  (cell i covers pixels 4i..4i+3)."""
  rows = np.minimum(np.arange(grid_shape[0]) * FEATURE_STRIDE + FEATURE_STRIDE // 2,
                    truth.shape[0] - 1)
  cols = np.minimum(np.arange(grid_shape[1]) * FEATURE_STRIDE + FEATURE_STRIDE // 2,
                    truth.shape[1] - 1)
  return truth[np.ix_(rows, cols)]


def balanced_sample(labels: np.ndarray, usable: np.ndarray, count: int,
                    rng: np.random.Generator) -> np.ndarray:
  """Flat indices of up to `count` usable cells, drawn without replacement with weights
  inverse to their class's frequency in this image (each present class equally likely)."""
  flat_labels = labels.ravel()
  candidates = np.flatnonzero(usable.ravel())
  if candidates.size <= count:
    return candidates
  classes, inverse, counts = np.unique(flat_labels[candidates], return_inverse=True,
                                       return_counts=True)
  weights = 1.0 / counts[inverse]
  chosen = rng.choice(candidates.size, size=count, replace=False, p=weights / weights.sum())
  return np.sort(candidates[chosen])
