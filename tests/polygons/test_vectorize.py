"""Masks to polygons, as pure functions: exact areas, nodata, seams merged exactly."""
import numpy as np
import pytest
import shapely
from hypothesis import given, settings, strategies as st
from rasterio.features import rasterize
from shapely import wkb

from transforms.config import PolygonConfig
from transforms.polygons.vectorize import (denoise, finish, merge_parts, polygonize,
                                           ragged_rings, region_sums, summed_area_table)
from transforms.types import NODATA_CLASS


def _burn(parts, shape):
  """The parts drawn back as a class mask (NODATA_CLASS where none)."""
  return rasterize(((wkb.loads(p.geometry_wkb), p.class_id) for p in parts), out_shape=shape,
                   fill=NODATA_CLASS, dtype="uint8")


def _blobs(rng, height, width, classes=3):
  coarse = rng.integers(0, classes, (height // 4 + 1, width // 4 + 1))
  mask = np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:height, :width].astype(np.uint8)
  noise = rng.random((height, width)) < 0.05
  return np.where(noise, rng.integers(0, classes, (height, width)), mask).astype(np.uint8)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 10_000))
def test_polygons_cover_each_class_exactly_and_never_nodata(height, width, seed):
  rng = np.random.default_rng(seed)
  mask = _blobs(rng, height, width)
  mask[rng.random((height, width)) < 0.1] = NODATA_CLASS
  confidence = rng.integers(0, 256, (height, width)).astype(np.uint8)
  parts = polygonize(mask, confidence, PolygonConfig())
  np.testing.assert_array_equal(_burn(parts, mask.shape), mask)
  for part in parts:
    geometry = wkb.loads(part.geometry_wkb)
    assert geometry.is_valid and geometry.geom_type == "Polygon"
    assert geometry.area == part.pixels        # pixel edges: area is the pixel count
    region = _burn([part], mask.shape) != NODATA_CLASS
    assert part.pixels == region.sum()
    assert part.confidence_sum == confidence[region].sum() / 255.0   # exact, as bincount's
  assert sum(p.pixels for p in parts) == (mask != NODATA_CLASS).sum()


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 48), st.integers(8, 48), st.integers(2, 20), st.integers(0, 10_000))
def test_blocks_merged_across_seams_equal_the_whole_mask(height, width, block, seed):
  rng = np.random.default_rng(seed)
  mask = _blobs(rng, height, width, classes=2)
  mask[:, : width // 5] = NODATA_CLASS
  confidence = rng.integers(0, 256, (height, width)).astype(np.uint8)
  whole = polygonize(mask, confidence, PolygonConfig())
  final, seams = [], {}
  for y in range(0, height, block):
    for x in range(0, width, block):
      for part in polygonize(mask[y:y + block, x:x + block], confidence[y:y + block, x:x + block],
                             PolygonConfig(), offset=(y, x), seams=(y > 0, True, x > 0, True)):
        if part.on_seam:
          seams.setdefault(part.class_id, []).append(part)
        else:
          final.append(part)
  for parts in seams.values():
    final.extend(merge_parts(parts))
  assert len(final) == len(whole)
  key = lambda p: (p.class_id, wkb.loads(p.geometry_wkb).bounds, p.pixels)
  for got, want in zip(sorted(final, key=key), sorted(whole, key=key)):
    assert (got.class_id, got.pixels) == (want.class_id, want.pixels)
    assert shapely.equals(wkb.loads(got.geometry_wkb), wkb.loads(want.geometry_wkb))
    assert got.confidence_sum == pytest.approx(want.confidence_sum)


def test_corner_touching_parts_stay_apart_as_in_one_block():
  mask = np.full((4, 4), 1, np.uint8)
  mask[:2, :2] = 0
  mask[2:, 2:] = 0     # class 0 touches itself only at the centre corner
  left = polygonize(mask[:, :2], None, PolygonConfig(), seams=(False, True, False, True))
  right = polygonize(mask[:, 2:], None, PolygonConfig(), offset=(0, 2),
                     seams=(False, True, True, True))
  merged = merge_parts([p for p in left + right if p.class_id == 0])
  assert sorted(p.pixels for p in merged) == [4, 4]
  assert len(polygonize(mask, None, PolygonConfig())) == 4   # a 2 x 2 checkerboard


def test_denoise_fills_small_regions_but_never_from_or_into_nodata():
  mask = np.zeros((12, 12), np.uint8)
  mask[5, 5] = 1                  # a speck inside class 0: becomes 0
  mask[0:6, 8:12] = NODATA_CLASS
  mask[2, 10] = 2                 # a speck inside nodata only: nothing to take, stays
  valid = mask != NODATA_CLASS
  cleaned = denoise(mask, valid, 4)
  assert cleaned[5, 5] == 0 and cleaned[2, 10] == 2
  np.testing.assert_array_equal(cleaned == NODATA_CLASS, mask == NODATA_CLASS)
  parts = polygonize(mask, None, PolygonConfig(denoise_px=4))
  assert sorted((p.class_id, p.pixels) for p in parts) == [(0, 12 * 12 - 24), (2, 1)]


def test_finish_simplifies_drops_small_and_maps_to_the_crs():
  mask = np.zeros((40, 40), np.uint8)
  yy, xx = np.mgrid[:40, :40]
  mask[(yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2] = 1   # a staircase disc
  mask[0, 0] = 2
  parts = {p.class_id: p for p in polygonize(mask, None, PolygonConfig())}
  disc = parts[1]
  exact = shapely.from_wkb(finish([disc], PolygonConfig(), None, None)[0].wkb)
  simple = shapely.from_wkb(finish([disc], PolygonConfig(simplify_px=1.0), None, None)[0].wkb)
  assert len(simple.exterior.coords) < len(exact.exterior.coords) / 2
  assert simple.is_valid
  # Douglas-Peucker moves the outline by at most the tolerance.
  assert abs(simple.area - disc.pixels) <= 1.0 * exact.length
  assert simple.hausdorff_distance(exact) <= 1.0 + 1e-9
  assert finish([parts[2], disc], PolygonConfig(min_area_px=2), None, None)[0] is None
  transform = (0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0)
  done = finish([disc], PolygonConfig(), transform, 1.0)[0]
  assert done.area_m2 == disc.pixels * 0.25
  mapped = shapely.from_wkb(done.wkb)
  assert mapped.area == pytest.approx(disc.pixels * 0.25)
  x0, y0, x1, y1 = done.bounds
  assert done.bounds == mapped.bounds
  assert (x0, y1) == (1000.0 + 0.5 * 6, 2000.0 - 0.5 * 6)   # the disc starts at pixel 6


def _finish_one_at_a_time(part, config, transform, metres):
  """The per-polygon path the vectorised finish replaced (issue 28), kept as the oracle."""
  from shapely import affinity, make_valid  # pylint: disable=import-outside-toplevel
  if part.pixels < config.min_area_px:
    return None
  geometry = wkb.loads(part.geometry_wkb)
  if config.simplify_px > 0:
    geometry = geometry.simplify(config.simplify_px, preserve_topology=True)
  if not geometry.is_valid:
    pieces = [g for g in getattr(make_valid(geometry), "geoms", [make_valid(geometry)])
              if g.geom_type == "Polygon" and not g.is_empty]
    if not pieces:
      return None
    geometry = max(pieces, key=lambda g: g.area)
  if geometry.is_empty:
    return None
  area_m2 = None
  if transform is not None:
    a, b, c, d, e, f = transform
    geometry = affinity.affine_transform(geometry, [a, b, d, e, c, f])
    if metres is not None:
      area_m2 = part.pixels * abs(a * e - b * d) * metres * metres
  return geometry.wkb, geometry.bounds, area_m2


@settings(max_examples=20, deadline=None)
@given(st.integers(8, 64), st.integers(8, 64), st.integers(0, 10_000),
       st.sampled_from([0.0, 0.7, 2.0]), st.integers(1, 6), st.booleans())
def test_vectorised_finish_and_order_are_byte_identical_to_one_at_a_time(
    height, width, seed, simplify, min_area, mapped):
  rng = np.random.default_rng(seed)
  mask = _blobs(rng, height, width)
  parts = polygonize(mask, None, PolygonConfig())
  # Parts come sorted by (class, first pixel), ties in GDAL's order, as before.
  keys = [(p.class_id, wkb.loads(p.geometry_wkb).bounds[1], wkb.loads(p.geometry_wkb).bounds[0])
          for p in parts]
  assert keys == sorted(keys)
  config = PolygonConfig(simplify_px=simplify, min_area_px=min_area)
  transform = (0.3, 0.01, 512345.7, -0.02, -0.3, 4123456.1) if mapped else None
  got = finish(parts, config, transform, 0.3048 if mapped else None)
  want = [_finish_one_at_a_time(p, config, transform, 0.3048 if mapped else None)
          for p in parts]
  assert [None if g is None else (g.wkb, g.bounds, g.area_m2) for g in got] == want
  if simplify == 0:      # unsimplified, a part is dropped exactly when it is too small
    assert [g is None for g in got] == [p.pixels < min_area for p in parts]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 48), st.integers(2, 48), st.integers(0, 10_000),
       st.floats(0.05, 0.95), st.sampled_from([0.0, 1.5]))
def test_traced_parts_are_valid_so_finish_may_skip_their_check(height, width, seed, density,
                                                               simplify):
  """finish(traced=True) skips is_valid on unsimplified parts: it relies on GDAL's
  4-connected traces being valid polygons, here on salt-and-pepper masks full of
  diagonal pinches (a ring of one class around a pixel that touches the outside at a
  corner), with nodata, and gives what the checked path gives."""
  rng = np.random.default_rng(seed)
  mask = np.where(rng.random((height, width)) < density,
                  rng.integers(0, 3, (height, width)), 0).astype(np.uint8)
  mask[rng.random((height, width)) < 0.05] = NODATA_CLASS
  parts = polygonize(mask, None, PolygonConfig())
  assert shapely.is_valid(shapely.from_wkb([p.geometry_wkb for p in parts])).all()
  config = PolygonConfig(simplify_px=simplify)
  checked = finish(parts, config, None, None)
  assert finish(parts, config, None, None, traced=True) == checked


def test_region_sums_read_pixels_and_values_off_the_rings_holes_subtracted():
  values = np.arange(12 * 10, dtype=np.int64).reshape(12, 10) % 251
  # A ring of pixels rows 2..8, columns 1..6, with a hole rows 4..5, columns 3..4, placed
  # at (y, x) = (100, 40) in its raster: coordinates are (column, row) pixel corners.
  shell = [(41, 102), (47, 102), (47, 109), (41, 109), (41, 102)]
  hole = [(43, 104), (43, 106), (45, 106), (45, 104), (43, 104)]     # opposite winding
  square = [(40, 100), (41, 100), (41, 101), (40, 101), (40, 100)]
  coords, rings, polygons = ragged_rings([{"coordinates": [shell, hole]},
                                          {"coordinates": [square]}])
  local = coords - (40, 100)
  region = np.zeros((12, 10), bool)
  region[2:9, 1:7] = True
  region[4:6, 3:5] = False
  np.testing.assert_array_equal(region_sums(local, rings, polygons), [region.sum(), 1])
  np.testing.assert_array_equal(
      region_sums(local, rings, polygons, summed_area_table(values)),
      [values[region].sum(), values[0, 0]])
