"""Pure numpy tiling, stitching and pooling: no Beam, no TensorFlow.

Along each axis an image gets the fewest tiles of at most tile_size that cover it with
at least `overlap` between neighbours; with the 'fit' grid each tile is then shrunk to
the smallest side (a multiple of 32) that still covers the axis, so a 1024 px side
takes three 384 px tiles instead of three 512 px ones (44% fewer pixels for the model).
Tiles past the bottom/right edge are padded, never resized. Each tile owns the central
part of its area (half the overlap is given to each neighbour), and the owned boxes
partition the image exactly, so stitching places blocks and pooling counts each
pixel once. The grid depends on the image's size and the settings only.
"""
from __future__ import annotations

import math

import numpy as np

from transforms.types import TileSpec

# Networks with four stride-2 stages see the same alignment everywhere only when
# tile origins and tile sizes are multiples of 32 (see shared/HRNET.md).
ALIGNMENT = 32


def axis_side(length: int, tile_size: int, overlap: int, fit: bool = True) -> tuple[int, int]:
  """(tile count, tile side) along an axis of `length` pixels."""
  count = 1 if length <= tile_size else math.ceil((length - overlap) / (tile_size - overlap))
  if not fit:
    return count, tile_size
  # count tiles of side s with `overlap` between them cover count*s - (count-1)*overlap.
  needed = math.ceil((length + (count - 1) * overlap) / count)
  return count, min(tile_size, ALIGNMENT * math.ceil(needed / ALIGNMENT))


def _axis_tiles(length: int, tile_size: int, overlap: int,
                fit: bool) -> tuple[int, list[tuple[int, int, int]]]:
  """(tile side, [(start, own_start, own_end)]) for the tiles along one axis."""
  count, side = axis_side(length, tile_size, overlap, fit)
  stride = side - overlap
  starts = [i * stride for i in range(count)]
  half = overlap // 2
  spans = []
  for i, start in enumerate(starts):
    own_start = 0 if i == 0 else start + half
    own_end = length if i == count - 1 else starts[i + 1] + half
    spans.append((start, own_start, own_end))
  return side, spans


def tile_grid(height: int, width: int, tile_size: int, overlap: int,
              fit: bool = True) -> list[TileSpec]:
  """The tiles covering a height x width image, row-major."""
  if height < 1 or width < 1:
    raise ValueError(f"image has no pixels: {height}x{width}")
  if not 0 <= overlap < tile_size:
    raise ValueError(f"overlap {overlap} must be >= 0 and below tile_size {tile_size}")
  side_y, rows = _axis_tiles(height, tile_size, overlap, fit)
  side_x, columns = _axis_tiles(width, tile_size, overlap, fit)
  specs = []
  for y, own_y0, own_y1 in rows:
    for x, own_x0, own_x1 in columns:
      specs.append(TileSpec(len(specs), y, x, own_y0, own_y1, own_x0, own_x1, side_y, side_x))
  return specs


def cut_tile(image: np.ndarray, spec: TileSpec) -> np.ndarray:
  """The tile's pixels, mirror-padded bottom/right to spec.height x spec.width."""
  crop = image[spec.y:spec.y + spec.height, spec.x:spec.x + spec.width]
  pad_y, pad_x = spec.height - crop.shape[0], spec.width - crop.shape[1]
  if pad_y == 0 and pad_x == 0:
    return np.ascontiguousarray(crop)
  # 'symmetric' also works for 1-pixel-wide crops, where 'reflect' has nothing to reflect.
  return np.pad(crop, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")


def cut_valid(valid: np.ndarray, spec: TileSpec) -> np.ndarray:
  """The tile's part of an (H, W) validity mask, padded with False to the tile's size."""
  crop = valid[spec.y:spec.y + spec.height, spec.x:spec.x + spec.width]
  tile = np.zeros((spec.height, spec.width), dtype=bool)
  tile[:crop.shape[0], :crop.shape[1]] = crop
  return tile


def own_box_in_tile(spec: TileSpec) -> tuple[int, int, int, int]:
  """The owned box in the tile's own coordinates: (y0, y1, x0, x1)."""
  return (spec.own_y0 - spec.y, spec.own_y1 - spec.y, spec.own_x0 - spec.x,
          spec.own_x1 - spec.x)


def cell_weights(start: int, end: int, cells: int, stride: int) -> np.ndarray:
  """How many pixels of [start, end) fall into each of `cells` feature cells of `stride`."""
  edges = np.arange(cells + 1) * stride
  return np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], start), 0, None)


def pooled_feature_sum(features: np.ndarray, box: tuple[int, int, int, int],
                       stride: int) -> np.ndarray:
  """Sum over the box's pixels of the feature of the cell each pixel falls in (float64).

  `features` is (cells_y, cells_x, F) at 1/stride of the tile; `box` is in tile pixels.
  Dividing the sum over all tiles by H*W gives the image's per-pixel mean feature.
  """
  y0, y1, x0, x1 = box
  weights_y = cell_weights(y0, y1, features.shape[0], stride).astype(np.float64)
  weights_x = cell_weights(x0, x1, features.shape[1], stride).astype(np.float64)
  rows = np.nonzero(weights_y)[0]
  cols = np.nonzero(weights_x)[0]
  block = features[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float64)
  return np.einsum("i,j,ijf->f", weights_y[rows[0]:rows[-1] + 1],
                   weights_x[cols[0]:cols[-1] + 1], block, optimize=True)


def cell_weight_map(box: tuple[int, int, int, int], stride: int, cells,
                    valid: np.ndarray | None = None) -> np.ndarray:
  """(cells_y, cells_x) float32: how many counted pixels of the box fall into each cell.
  `cells` is (cells_y, cells_x), or one number for a square tile.

  sum(weights[..., None] * features) is pooled_feature_sum when valid is None, and the
  sum over the box's valid pixels otherwise: the pooling as weights the model step
  applies where the model runs, so feature maps never leave TensorFlow.
  """
  cells_y, cells_x = (cells, cells) if np.isscalar(cells) else cells
  y0, y1, x0, x1 = box
  if valid is None:
    return np.outer(cell_weights(y0, y1, cells_y, stride),
                    cell_weights(x0, x1, cells_x, stride)).astype(np.float32)
  counted = np.zeros((cells_y * stride, cells_x * stride), dtype=bool)
  counted[y0:y1, x0:x1] = valid[y0:y1, x0:x1]
  return counted.reshape(cells_y, stride, cells_x, stride).sum(axis=(1, 3)).astype(np.float32)


def stitch_mask(height: int, width: int, blocks) -> np.ndarray:
  """Places (TileSpec, class_ids of its owned box) blocks into an H x W uint8 mask."""
  mask = np.zeros((height, width), dtype=np.uint8)
  covered = 0
  for spec, class_ids in blocks:
    expected = (spec.own_y1 - spec.own_y0, spec.own_x1 - spec.own_x0)
    if class_ids.shape != expected:
      raise ValueError(f"tile {spec.index}: block {class_ids.shape} != owned box {expected}")
    mask[spec.own_y0:spec.own_y1, spec.own_x0:spec.own_x1] = class_ids
    covered += class_ids.size
  if covered != height * width:
    raise ValueError(f"tiles cover {covered} of {height * width} pixels")
  return mask
