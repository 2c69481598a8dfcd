"""Polygons built in one call (shapely.from_ragged_array) are exactly the ones shapely's
per-polygon `shape()` builds from GDAL's GeoJSON: same WKB bytes, holes included."""
import numpy as np
from rasterio.features import shapes
from shapely.geometry import shape

from transforms.polygons.vectorize import polygons_from_geojson


def test_one_call_builds_the_same_polygons_as_shape():
  rng = np.random.default_rng(3)
  mask = (rng.random((64, 80)) < 0.45).astype(np.uint8)
  mask[20:40, 20:40] = 2
  mask[25:30, 25:30] = 3          # a hole in class 2's region
  traced = list(shapes(mask, connectivity=4))
  assert len(traced) > 100
  built = polygons_from_geojson([g for g, _ in traced])
  assert [g.wkb for g in built] == [shape(g).wkb for g, _ in traced]
  assert any(len(list(g.interiors)) for g in built)
  assert len(polygons_from_geojson([])) == 0
