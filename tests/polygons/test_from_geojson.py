"""Polygons built in one call (shapely.from_ragged_array) are exactly the ones shapely's
per-polygon `shape()` builds from GDAL's GeoJSON: same WKB bytes, holes included."""
import numpy as np
from rasterio.features import shapes
from shapely.geometry import shape

import shapely

from transforms.polygons.vectorize import ragged_rings


def test_one_call_builds_the_same_polygons_as_shape():
  rng = np.random.default_rng(3)
  mask = (rng.random((64, 80)) < 0.45).astype(np.uint8)
  mask[20:40, 20:40] = 2
  mask[25:30, 25:30] = 3          # a hole in class 2's region
  traced = list(shapes(mask, connectivity=4))
  assert len(traced) > 100
  coords, ring_offsets, polygon_offsets = ragged_rings([g for g, _ in traced])
  built = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords,
                                    (ring_offsets, polygon_offsets))
  assert [g.wkb for g in built] == [shape(g).wkb for g, _ in traced]
  assert any(len(list(g.interiors)) for g in built)
  coords, ring_offsets, polygon_offsets = ragged_rings([])
  assert coords.shape == (0, 2) and list(ring_offsets) == list(polygon_offsets) == [0]
