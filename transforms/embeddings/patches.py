"""Pure numpy patch embeddings: a grid of patch_size squares aligned to the image (the
raster's origin for blocks), independent of the inference tiles.

Each tile contributes, for every patch its owned box meets, the feature sum and pixel
count of the valid pixels they share (weights applied where the model runs, like the
image's pooling). Owned boxes partition the image, so adding the tiles' parts gives
each patch's exact sum, whatever the tiles; the embedding is that sum over the count.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from transforms.tiling.grid import cell_weight_map
from transforms.types import NODATA_CLASS, ImageInfo, PatchPart, TileSpec

MIN_PATCH_SIZE = 32


def patch_slots(tile_height: int, tile_width: int, patch_size: int) -> int:
  """How many patches an owned box of a tile this size can meet (at most): the fixed
  number of weight maps per tile, so the model step keeps one shape per tile shape."""
  return ((math.ceil(tile_height / patch_size) + 1) *
          (math.ceil(tile_width / patch_size) + 1))


def patches_in_box(y0: int, y1: int, x0: int, x1: int, patch_size: int):
  """(row, column, (y0, y1, x0, x1)) of each patch a box meets, with their common box,
  all in the same coordinates as the box (raster pixels)."""
  for row in range(y0 // patch_size, (y1 - 1) // patch_size + 1):
    for column in range(x0 // patch_size, (x1 - 1) // patch_size + 1):
      yield row, column, (max(y0, row * patch_size), min(y1, (row + 1) * patch_size),
                          max(x0, column * patch_size), min(x1, (column + 1) * patch_size))


def tile_patch_weights(image: ImageInfo, spec: TileSpec, patch_size: int, stride: int,
                       valid: Optional[np.ndarray]) -> tuple[list, np.ndarray]:
  """([(row, column)], (slots, cells_y, cells_x) float32 weights) for the patches the
  tile's owned box meets: weights count each patch's valid owned pixels per feature
  cell. Slots past the patches met stay zero."""
  cells = (spec.height // stride, spec.width // stride)
  offset_y, offset_x = image.block or (0, 0)
  keys = []
  weights = np.zeros((patch_slots(spec.height, spec.width, patch_size), *cells), np.float32)
  for row, column, (y0, y1, x0, x1) in patches_in_box(
      offset_y + spec.own_y0, offset_y + spec.own_y1, offset_x + spec.own_x0,
      offset_x + spec.own_x1, patch_size):
    box = (y0 - offset_y - spec.y, y1 - offset_y - spec.y,
           x0 - offset_x - spec.x, x1 - offset_x - spec.x)
    weights[len(keys)] = cell_weight_map(box, stride, cells, valid)
    keys.append((row, column))
  return keys, weights


def add_patch_sums(totals: dict, keys: list, counts: np.ndarray, sums: np.ndarray) -> None:
  """Adds one tile's patch counts and (slots, F) feature sums into {(row, col): [count,
  sum]}; patches without a valid pixel in the tile add nothing."""
  for slot, key in enumerate(keys):
    if counts[slot] > 0:
      entry = totals.setdefault(key, [0, np.zeros(sums.shape[-1], np.float64)])
      entry[0] += int(round(float(counts[slot])))
      entry[1] += sums[slot]


def image_patches(image: ImageInfo, totals: dict, patch_size: int,
                  mask: Optional[np.ndarray], num_classes: int) -> list:
  """The image's PatchParts from its tiles' summed parts; class counts from the stitched
  mask when there is one. A part is `complete` unless the patch crosses the edge of a
  raster block (then its neighbours' parts are added to it later)."""
  offset_y, offset_x = image.block or (0, 0)
  parts = []
  for (row, column), (count, feature_sum) in sorted(totals.items()):
    y0, y1 = max(row * patch_size, offset_y), min((row + 1) * patch_size,
                                                  offset_y + image.height)
    x0, x1 = max(column * patch_size, offset_x), min((column + 1) * patch_size,
                                                     offset_x + image.width)
    class_counts = None
    if mask is not None:
      region = mask[y0 - offset_y:y1 - offset_y, x0 - offset_x:x1 - offset_x]
      counted = np.bincount(region.ravel(), minlength=NODATA_CLASS + 1)
      class_counts = tuple(int(c) for c in counted[:num_classes])
    complete = image.block is None or (
        y0 == row * patch_size and x0 == column * patch_size and
        y1 - y0 == patch_size and x1 - x0 == patch_size)
    parts.append(PatchPart(row, column, (y0, y1, x0, x1), count, feature_sum, class_counts,
                           complete))
  return parts


def merge_patch_parts(parts: list) -> PatchPart:
  """One patch from its parts in several blocks: boxes joined, sums and counts added."""
  boxes = np.array([p.box for p in parts])
  class_counts = None
  if all(p.class_counts is not None for p in parts):
    class_counts = tuple(int(c) for c in np.sum([p.class_counts for p in parts], axis=0))
  return PatchPart(parts[0].row, parts[0].column,
                   (int(boxes[:, 0].min()), int(boxes[:, 1].max()), int(boxes[:, 2].min()),
                    int(boxes[:, 3].max())),
                   sum(p.valid_pixels for p in parts),
                   np.sum([p.feature_sum for p in parts], axis=0), class_counts, True)


def class_fractions(class_counts, class_names, valid_pixels: int) -> Optional[dict]:
  """{class name: share of the valid pixels}, or None without a mask or valid pixel."""
  if class_counts is None or not valid_pixels:
    return None
  return {name: float(count) / valid_pixels for name, count in zip(class_names, class_counts)}
