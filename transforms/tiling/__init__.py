"""Tiling numerics, pure numpy: the tile grid, cutting, stitching and pooling weights
(grid), and what the model sees of the pixels (channels)."""
