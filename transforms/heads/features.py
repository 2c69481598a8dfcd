"""A model's `get_features` and `predict` over whole images in tiles (memory bounded by
one tile), for training heads: features gathered at sampled feature-grid cells, and
class ids per pixel for held-out scoring."""
from __future__ import annotations

import numpy as np

from transforms.heads.sampling import FEATURE_STRIDE
from transforms.labels import generic_labels, model_labels, resolve_model_name
from transforms.tiling.channels import map_channels, to_unit_float
from transforms.inference.sources import DEFAULT_CACHE_DIR, ModelLoadError, resolve_model_dir

TILE = 512        # a multiple of the feature stride, so tiles share the image's grid


class FeatureModel:
  """A SavedModel (local, gs:// or a TF Hub handle or short name) and its labels."""

  def __init__(self, model: str, cache_dir: str = DEFAULT_CACHE_DIR):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    self.handle = resolve_model_name(model)
    self.local_dir = resolve_model_dir(self.handle, cache_dir)
    try:
      self.module = tf.saved_model.load(self.local_dir)
    except Exception as e:  # pylint: disable=broad-except  # many SavedModel error types
      raise ModelLoadError(f"{model}: not a SavedModel TensorFlow can load ({e})") from e
    if not hasattr(self.module, "get_features"):
      raise ModelLoadError(f"{model} has no get_features function: a head needs the "
                           "model's features (the HRNet suite's modules all have it)")
    self.labels = model_labels(self.handle, self.local_dir)
    self.channel_mapping = (self.labels.channel_mapping if self.labels and
                            self.labels.channel_mapping else "rgb")
    self._tf = tf

  def model_input(self, pixels: np.ndarray) -> np.ndarray:
    return map_channels(to_unit_float(pixels), self.channel_mapping)

  def _tiles(self, height: int, width: int):
    for y in range(0, height, TILE):
      for x in range(0, width, TILE):
        yield y, x

  def gather(self, pixels: np.ndarray, cells: np.ndarray, grid_width: int) -> np.ndarray:
    """Features (len(cells), F) at flat feature-grid indices of the whole image."""
    unit = self.model_input(pixels)
    rows, cols = cells // grid_width, cells % grid_width
    out = None
    for y, x in self._tiles(*unit.shape[:2]):
      inside = ((rows >= y // FEATURE_STRIDE) & (rows < (y + TILE) // FEATURE_STRIDE) &
                (cols >= x // FEATURE_STRIDE) & (cols < (x + TILE) // FEATURE_STRIDE))
      if not inside.any():
        continue
      tile = unit[y:y + TILE, x:x + TILE]
      features = self.module.get_features(self._tf.constant(tile[None])).numpy()[0]
      if out is None:
        out = np.zeros((len(cells), features.shape[-1]), np.float32)
      r = np.minimum(rows[inside] - y // FEATURE_STRIDE, features.shape[0] - 1)
      c = np.minimum(cols[inside] - x // FEATURE_STRIDE, features.shape[1] - 1)
      out[inside] = features[r, c]
    return out

  def class_ids(self, pixels: np.ndarray) -> np.ndarray:
    """The model's own head: argmax of `predict`, tile by tile, (H, W) uint8."""
    unit = self.model_input(pixels)
    mask = np.zeros(unit.shape[:2], np.uint8)
    for y, x in self._tiles(*unit.shape[:2]):
      scores = self.module.predict(self._tf.constant(unit[None, y:y + TILE, x:x + TILE]))
      mask[y:y + TILE, x:x + TILE] = np.argmax(scores.numpy()[0], -1).astype(np.uint8)
    return mask

  def class_names(self, num_classes: int) -> tuple:
    labels = self.labels or generic_labels(num_classes)
    return labels.class_names
