"""Pure tiling, stitching and pooling arithmetic, without Beam or TensorFlow."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.tiling import channels, grid

sizes = st.integers(min_value=1, max_value=1400)
tile_settings = st.sampled_from([(64, 0), (64, 32), (128, 32), (128, 64), (256, 64),
                                 (512, 64)])


@settings(max_examples=150, deadline=None)
@given(height=sizes, width=sizes, setting=tile_settings, fit=st.booleans())
def test_owned_boxes_partition_the_image_and_lie_inside_their_tiles(height, width, setting,
                                                                    fit):
  tile_size, overlap = setting
  specs = grid.tile_grid(height, width, tile_size, overlap, fit=fit)
  cover = np.zeros((height, width), np.int32)
  shapes = {(s.height, s.width) for s in specs}
  assert len(shapes) == 1                      # one shape per image: one stack
  side_y, side_x = shapes.pop()
  for side, length in ((side_y, height), (side_x, width)):
    assert side % grid.ALIGNMENT == 0 and side <= tile_size
    if not fit:
      assert side == tile_size
  for spec in specs:   # a lone tile may be no wider than the overlap: then no stride
    assert spec.y == 0 or spec.y % (side_y - overlap) == 0
    assert spec.x == 0 or spec.x % (side_x - overlap) == 0
    assert spec.y % grid.ALIGNMENT == 0 and spec.x % grid.ALIGNMENT == 0
    assert spec.y <= spec.own_y0 < spec.own_y1 <= spec.y + side_y
    assert spec.x <= spec.own_x0 < spec.own_x1 <= spec.x + side_x
    cover[spec.own_y0:spec.own_y1, spec.own_x0:spec.own_x1] += 1
  assert (cover == 1).all()
  assert [s.index for s in specs] == list(range(len(specs)))


@settings(max_examples=200, deadline=None)
@given(length=sizes, setting=tile_settings)
def test_fit_grid_has_the_fewest_tiles_of_the_smallest_side(length, setting):
  tile_size, overlap = setting
  count, side = grid.axis_side(length, tile_size, overlap)
  assert count == grid.axis_side(length, tile_size, overlap, fit=False)[0]
  covers = lambda n, s: n * s - (n - 1) * overlap >= length
  assert covers(count, side)
  assert count == 1 or not covers(count - 1, tile_size)          # fewest tiles
  assert side - grid.ALIGNMENT <= overlap or not covers(count, side - grid.ALIGNMENT)


def test_fit_grid_examples():
  # 1024 px at 512/64: three 384 px tiles (1152 px) instead of three 512 px (1536 px).
  assert grid.axis_side(1024, 512, 64) == (3, 384)
  assert [s.y for s in grid.tile_grid(1024, 10, 512, 64)] == [0, 320, 640]
  assert grid.axis_side(300, 512, 64) == (1, 320)
  assert grid.axis_side(512, 512, 64) == (1, 512)
  assert grid.axis_side(513, 512, 64) == (2, 320)


def test_interior_boundaries_keep_half_the_overlap_from_each_side():
  specs = grid.tile_grid(900, 300, 512, 64, fit=False)
  assert [(s.y, s.own_y0, s.own_y1) for s in specs] == [(0, 0, 480), (448, 480, 900)]
  # 1000 px: a second tile ends at 960, so a third (padded) one is needed.
  assert [s.y for s in grid.tile_grid(1000, 300, 512, 64, fit=False)] == [0, 448, 896]
  assert (specs[0].own_x0, specs[0].own_x1) == (0, 300)
  assert {s.height for s in grid.tile_grid(900, 300, 512, 64)} == {512}  # 2 x 480 < 964
  fitted = grid.tile_grid(800, 300, 512, 64)   # two 448 px tiles: 2 x 448 - 64 = 832
  assert [(s.y, s.own_y0, s.own_y1, s.height, s.width) for s in fitted] == [
      (0, 0, 416, 448, 320), (384, 416, 800, 448, 320)]


def test_small_image_is_one_padded_tile():
  specs = grid.tile_grid(3, 5000, 512, 64, fit=False)
  assert {s.y for s in specs} == {0} and len(specs) == 12
  image = np.arange(3 * 5000 * 3, dtype=np.uint16).reshape(3, 5000, 3)
  tile = grid.cut_tile(image, specs[0])
  assert tile.shape == (512, 512, 3) and tile.dtype == np.uint16
  np.testing.assert_array_equal(tile[:3, :512], image[:, :512])
  np.testing.assert_array_equal(tile[3], image[2, :512])  # mirrored, not zeros
  fitted = grid.tile_grid(3, 5000, 512, 64)
  assert len(fitted) == 12 and grid.cut_tile(image, fitted[0]).shape == (32, 480, 3)


def test_one_pixel_image_pads_by_repetition():
  tile = grid.cut_tile(np.full((1, 1, 3), 7, np.uint8), grid.tile_grid(1, 1, 64, 0)[0])
  assert tile.shape == (32, 32, 3) and (tile == 7).all()


@pytest.mark.parametrize("bad", [(0, 10, 64, 0), (10, 10, 64, 64), (10, 10, 64, -32)])
def test_tile_grid_rejects_impossible_settings(bad):
  with pytest.raises(ValueError):
    grid.tile_grid(*bad)


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 700), width=st.integers(1, 700), setting=tile_settings,
       seed=st.integers(0, 2**16))
def test_stitching_owned_blocks_reproduces_the_mask(height, width, setting, seed):
  tile_size, overlap = setting
  mask = np.random.default_rng(seed).integers(0, 7, (height, width)).astype(np.uint8)
  blocks = [(s, mask[s.own_y0:s.own_y1, s.own_x0:s.own_x1])
            for s in grid.tile_grid(height, width, tile_size, overlap, fit=seed % 2 == 0)]
  np.testing.assert_array_equal(grid.stitch_mask(height, width, blocks), mask)


def test_stitching_refuses_missing_or_misshapen_blocks():
  specs = grid.tile_grid(200, 200, 128, 32)
  blocks = [(s, np.zeros((s.own_y1 - s.own_y0, s.own_x1 - s.own_x0), np.uint8)) for s in specs]
  with pytest.raises(ValueError, match="cover"):
    grid.stitch_mask(200, 200, blocks[1:])
  with pytest.raises(ValueError, match="owned box"):
    grid.stitch_mask(200, 200, [(specs[0], np.zeros((3, 3), np.uint8))] + blocks[1:])


def test_cell_weights_count_pixels_per_cell():
  np.testing.assert_array_equal(grid.cell_weights(0, 10, 4, 4), [4, 4, 2, 0])
  np.testing.assert_array_equal(grid.cell_weights(6, 13, 4, 4), [0, 2, 4, 1])


@settings(max_examples=80, deadline=None)
@given(box=st.tuples(st.integers(0, 63), st.integers(1, 64), st.integers(0, 63),
                     st.integers(1, 64)), seed=st.integers(0, 2**16))
def test_pooled_sum_equals_sum_over_pixels_of_their_cell_feature(box, seed):
  y0, dy, x0, dx = box
  y1, x1 = min(64, y0 + dy), min(64, x0 + dx)
  features = np.random.default_rng(seed).normal(size=(16, 16, 5)).astype(np.float32)
  per_pixel = np.repeat(np.repeat(features, 4, 0), 4, 1)  # each pixel's cell feature
  expected = per_pixel[y0:y1, x0:x1].astype(np.float64).sum(axis=(0, 1))
  np.testing.assert_allclose(grid.pooled_feature_sum(features, (y0, y1, x0, x1), 4),
                             expected, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 400), width=st.integers(1, 400), setting=tile_settings)
def test_pooling_over_tiles_counts_each_pixel_once(height, width, setting):
  tile_size, overlap = setting
  rng = np.random.default_rng(height * 1000 + width)
  padded = (max(height, width) // tile_size + 2) * tile_size  # past the last tile
  image_features = rng.normal(size=(padded // 4, padded // 4, 3))
  per_pixel = np.repeat(np.repeat(image_features, 4, 0), 4, 1)[:height, :width]
  total = np.zeros(3)
  for spec in grid.tile_grid(height, width, tile_size, overlap):
    # The tile's features are the image's, cut at the tile's (4-aligned) origin.
    tile_features = image_features[spec.y // 4:(spec.y + spec.height) // 4,
                                   spec.x // 4:(spec.x + spec.width) // 4]
    total += grid.pooled_feature_sum(tile_features, grid.own_box_in_tile(spec), 4)
  np.testing.assert_allclose(total / (height * width), per_pixel.mean(axis=(0, 1)), rtol=1e-9)


def test_to_unit_float_scales_by_dtype_range():
  np.testing.assert_array_equal(channels.to_unit_float(np.array([0, 255], np.uint8)), [0, 1])
  np.testing.assert_allclose(channels.to_unit_float(np.array([0, 65535, 32768], np.uint16)),
                             [0, 1, 32768 / 65535])
  with pytest.raises(TypeError):
    channels.to_unit_float(np.array([0.5], np.float32))


def test_channel_mappings():
  unit = np.array([[[0.2, 0.6, 0.9]]], np.float32)
  np.testing.assert_array_equal(channels.map_channels(unit, "rgb"), unit)
  np.testing.assert_allclose(channels.map_channels(unit, "rg_mean"), [[[0.2, 0.6, 0.4]]])
  np.testing.assert_allclose(channels.map_channels(unit, "irg"), [[[0.6, 0.9, 0.75]]])
  np.testing.assert_array_equal(channels.map_channels(unit, "2,1,0"), unit[..., ::-1])
  assert channels.parse_channel_mapping(" 2, 0,1".strip()) == "2,0,1"
  rgbn = np.array([[[0.2, 0.6, 0.9, 0.7]]], np.float32)
  np.testing.assert_array_equal(channels.map_channels(rgbn, "3,0,1"), rgbn[..., [3, 0, 1]])
  np.testing.assert_array_equal(channels.map_channels(rgbn, "rgb"), unit)
  with pytest.raises(ValueError, match="asks for band 3 but the image has 3 bands"):
    channels.map_channels(unit, "3,0,1")
  for bad in ("bgr", "0,1", "0,1,16", "-1,0,1"):
    with pytest.raises(ValueError, match="channel mapping"):
      channels.parse_channel_mapping(bad)


def test_cell_weight_map_pools_like_the_reference_sums():
  """The weights the model step applies on the device give the reference pooling."""
  rng = np.random.default_rng(2)
  features = rng.normal(size=(16, 16, 6))
  for box in [(0, 64, 0, 64), (5, 61, 3, 40), (32, 33, 7, 8)]:
    weights = grid.cell_weight_map(box, 4, 16)
    np.testing.assert_allclose(np.einsum("ij,ijf->f", weights, features),
                               grid.pooled_feature_sum(features, box, 4), rtol=1e-12)
    valid = rng.random((64, 64)) > 0.3
    masked = grid.cell_weight_map(box, 4, 16, valid)
    per_pixel = np.repeat(np.repeat(features, 4, axis=0), 4, axis=1)
    own_valid = np.zeros((64, 64), bool)
    own_valid[box[0]:box[1], box[2]:box[3]] = valid[box[0]:box[1], box[2]:box[3]]
    np.testing.assert_allclose(np.einsum("ij,ijf->f", masked, features),
                               per_pixel[own_valid].sum(axis=0), rtol=1e-12)
    assert masked.sum() == own_valid.sum()
  # A tile of another shape: (cells_y, cells_x).
  features = rng.normal(size=(8, 16, 6))
  box = (3, 30, 9, 60)
  valid = rng.random((32, 64)) > 0.3
  masked = grid.cell_weight_map(box, 4, (8, 16), valid)
  own_valid = np.zeros((32, 64), bool)
  own_valid[3:30, 9:60] = valid[3:30, 9:60]
  per_pixel = np.repeat(np.repeat(features, 4, axis=0), 4, axis=1)
  np.testing.assert_allclose(np.einsum("ij,ijf->f", masked, features),
                             per_pixel[own_valid].sum(axis=0), rtol=1e-12)
  np.testing.assert_allclose(np.einsum("ij,ijf->f", grid.cell_weight_map(box, 4, (8, 16)),
                                       features),
                             grid.pooled_feature_sum(features, box, 4), rtol=1e-12)
