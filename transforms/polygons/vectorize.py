"""Masks to polygons: pure functions over numpy arrays (rasterio's GDAL polygonize and
sieve, shapely); no Beam.

Polygons are traced in whole-raster pixel coordinates (x = column, y = row, integer
corners), so polygons of neighbouring blocks of one raster share exact edges and merge
exactly; simplification and the map transform come last, once per final polygon.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Optional

import numpy as np

from transforms.config import PolygonConfig
from transforms.types import NODATA_CLASS, PolygonPart


def preload() -> None:
  """Imports what tracing, merging and finishing polygons use (rasterio's GDAL, shapely,
  pyproj): a DoFn's setup() calls it, so no element's time pays for the imports."""
  # pylint: disable=import-outside-toplevel,unused-import
  import affine  # noqa: F401
  import pyproj  # noqa: F401
  import rasterio.features  # noqa: F401
  import shapely  # noqa: F401


def denoise(mask: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
  """GDAL's sieve: regions of fewer than `size` pixels (4-connected) take the class of
  their largest neighbour. Nodata pixels are neither sieved nor given to a region."""
  if size <= 1:
    return mask
  from rasterio.features import sieve  # pylint: disable=import-outside-toplevel
  sieved = sieve(mask, size=size, mask=valid, connectivity=4)
  # A region surrounded by nodata only has no class to take: it keeps its own.
  return np.where(valid & (sieved != NODATA_CLASS), sieved, mask).astype(np.uint8)


def polygonize(mask: np.ndarray, confidence: Optional[np.ndarray], config: PolygonConfig,
               offset: tuple = (0, 0), seams: tuple = (False, False, False, False),
               ignore_values: tuple = (NODATA_CLASS,)) -> list[PolygonPart]:
  """(H, W) uint8 class ids -> one PolygonPart per 4-connected region of one class.

  confidence: (H, W) uint8 max probability x 255, or None. offset: (y, x) of the mask in
  its raster. seams: (top, bottom, left, right) edges that continue into another block;
  a part touching one is flagged for merging. Values in ignore_values never become
  polygons. Parts come sorted by (class, first pixel) so output order is reproducible.
  """
  # pylint: disable=import-outside-toplevel
  import shapely
  from affine import Affine
  from rasterio.features import shapes
  valid = ~np.isin(mask, ignore_values)
  if not valid.any():
    return []
  mask = denoise(mask, valid, config.denoise_px)
  oy, ox = offset
  to_raster = Affine(1, 0, ox, 0, 1, oy)
  # Without a mask where every pixel is valid: the same polygons, without GDAL's mask band.
  traced = list(shapes(mask, mask=None if valid.all() else valid, connectivity=4,
                       transform=to_raster))
  coords, ring_offsets, polygon_offsets = ragged_rings([g for g, _ in traced])
  geometries = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords,
                                         (ring_offsets, polygon_offsets))
  # Each region's pixels and confidence, from its rings: exact, since every vertex lies
  # on a pixel corner (what burning the polygons back gave, without the burning).
  local = coords - (ox, oy)
  pixel_counts = region_sums(local, ring_offsets, polygon_offsets)
  confidence_sums = (region_sums(local, ring_offsets, polygon_offsets,
                                 summed_area_table(confidence)) / 255.0
                     if confidence is not None else None)
  bounds = shapely.bounds(geometries)
  wkbs = shapely.to_wkb(geometries)
  classes = np.array([int(value) for _, value in traced])
  height, width = mask.shape
  top, bottom, left, right = seams
  x0, y0, x1, y1 = bounds.T
  on_seam = (((y0 <= oy) & top) | ((y1 >= oy + height) & bottom)
             | ((x0 <= ox) & left) | ((x1 >= ox + width) & right))
  # Sorted by (class, first pixel); lexsort is stable, so ties keep GDAL's order.
  order = np.lexsort((x0, y0, classes)).tolist()
  classes, pixel_counts, on_seam = classes.tolist(), pixel_counts.tolist(), on_seam.tolist()
  sums = None if confidence_sums is None else confidence_sums.tolist()
  return [PolygonPart(class_id=classes[i], geometry_wkb=wkbs[i], pixels=pixel_counts[i],
                      confidence_sum=None if sums is None else sums[i], on_seam=on_seam[i])
          for i in order]


def ragged_rings(polygons: list) -> tuple:
  """GeoJSON-like Polygon mappings -> (coordinates (N, 2) float64, ring offsets, polygon
  offsets): shapely's ragged-array layout, so all polygons are built in one call
  (shapely.from_ragged_array) rather than one Python object graph each. The vertices
  are read into one array in one pass, not an array per ring."""
  if not polygons:
    return np.empty((0, 2)), np.zeros(1, np.int64), np.zeros(1, np.int64)
  chain = itertools.chain.from_iterable
  rings = [ring for polygon in polygons for ring in polygon["coordinates"]]
  ring_offsets = np.zeros(len(rings) + 1, np.int64)
  np.cumsum(np.fromiter(map(len, rings), np.int64, len(rings)), out=ring_offsets[1:])
  polygon_offsets = np.zeros(len(polygons) + 1, np.int64)
  np.cumsum(np.fromiter((len(p["coordinates"]) for p in polygons), np.int64, len(polygons)),
            out=polygon_offsets[1:])
  count = int(ring_offsets[-1])
  coords = np.fromiter(chain(chain(rings)), np.float64, 2 * count).reshape(count, 2)
  return coords, ring_offsets, polygon_offsets


def summed_area_table(values: np.ndarray) -> np.ndarray:
  """(H, W) integers -> (H + 1, W + 1) int64 table: table[y, x] = values[:y, :x].sum()."""
  table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.int64)
  table[1:, 1:] = values
  np.cumsum(table, 1, out=table)      # along contiguous rows: fast in place
  for y in range(2, len(table)):      # down the columns, a row at a time: 2-3x faster
    np.add(table[y], table[y - 1], out=table[y])    # than cumsum over axis 0 here
  return table


def region_sums(coords: np.ndarray, ring_offsets: np.ndarray, polygon_offsets: np.ndarray,
                table: Optional[np.ndarray] = None) -> np.ndarray:
  """Per polygon, the sum of a raster's values over the pixels inside it (its pixel count
  when table is None), from a summed-area table and the rings' vertical edges alone.

  By Green's theorem an edge from (x, y) to (x, y') adds table[y', x] - table[y, x], up
  to the ring's orientation; holes subtract. Exact (integers) where every vertex lies on
  a pixel corner, as GDAL's polygons' do; coords are in the table's pixel frame. Rings
  repeat their first vertex last, as GeoJSON's and shapely's do.
  """
  if len(coords) == 0:
    return np.zeros(len(polygon_offsets) - 1, np.int64)
  x = np.rint(coords[:, 0]).astype(np.int64)
  y = np.rint(coords[:, 1]).astype(np.int64)
  following = np.append(y[1:], 0)
  if table is None:     # the table of ones: table[y, x] = x * y
    edges = x * (following - y)
  else:
    edges = table[following, x] - table[y, x]
  edges[ring_offsets[1:] - 1] = 0      # a ring's last vertex closes it: no edge onwards
  rings = np.abs(np.add.reduceat(edges, ring_offsets[:-1]))
  signs = np.full(len(rings), -1, np.int64)    # holes subtract; each polygon's first
  signs[polygon_offsets[:-1]] = 1              # ring is its shell
  return np.add.reduceat(rings * signs, polygon_offsets[:-1])


def merge_parts(parts: list[PolygonPart]) -> list[PolygonPart]:
  """Parts of one class from neighbouring blocks -> the polygons they form together.

  Parts that share an edge become one (their pixels and confidence added up); parts
  that only touch at a corner stay apart, as 4-connected regions do within a block.
  """
  # pylint: disable=import-outside-toplevel
  import shapely
  from shapely import wkb
  if len(parts) <= 1:
    return [dataclasses.replace(p, on_seam=False) for p in parts]
  geometries = [wkb.loads(p.geometry_wkb) for p in parts]
  tree = shapely.STRtree(geometries)
  # Union-find over parts that share more than a point.
  parent = list(range(len(parts)))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i
  left, right = tree.query(geometries, predicate="intersects")
  for i, j in zip(left.tolist(), right.tolist()):
    if i < j and geometries[i].intersection(geometries[j]).length > 0:
      parent[root(i)] = root(j)
  groups: dict = {}
  for i in range(len(parts)):
    groups.setdefault(root(i), []).append(i)
  merged = []
  keys = []
  for members in groups.values():
    # simplify(0) drops the vertices the blocks' edges left on straight lines.
    union = shapely.union_all([geometries[i] for i in members]).simplify(0)
    confidences = [parts[i].confidence_sum for i in members]
    for piece in _polygons(union):
      # A union is one polygon when its parts share edges; should GEOS return pieces,
      # pixels and confidence are split by area (exact: areas are pixel counts).
      share = piece.area / union.area
      merged.append(PolygonPart(
          class_id=parts[members[0]].class_id, geometry_wkb=piece.wkb,
          pixels=int(round(sum(parts[i].pixels for i in members) * share)),
          confidence_sum=(None if any(c is None for c in confidences)
                          else sum(confidences) * share),
          on_seam=False))
      x0, y0, _, _ = piece.bounds
      keys.append((merged[-1].class_id, y0, x0))
  return [merged[i] for i in sorted(range(len(merged)), key=keys.__getitem__)]


def _polygons(geometry) -> list:
  """The polygons of a Polygon, MultiPolygon or collection (lines and points dropped)."""
  if geometry.geom_type == "Polygon":
    return [geometry] if not geometry.is_empty else []
  return [g for part in getattr(geometry, "geoms", []) for g in _polygons(part)]


def pixel_area(transform: tuple) -> float:
  """Area of one pixel in the CRS's units squared."""
  a, b, _, d, e, _ = transform[:6]
  return abs(a * e - b * d)


@functools.lru_cache(maxsize=64)
def metres_per_unit(crs_wkt: Optional[str]) -> Optional[float]:
  """Metres per CRS unit for a projected CRS; None for geographic or unknown ones."""
  if not crs_wkt:
    return None
  from pyproj import CRS  # pylint: disable=import-outside-toplevel
  crs = CRS.from_wkt(crs_wkt)
  if not crs.is_projected or not crs.axis_info:
    return None
  factor = crs.axis_info[0].unit_conversion_factor
  return float(factor) if factor and math.isfinite(factor) else None


@dataclasses.dataclass(frozen=True)
class Finished:
  """A final polygon: WKB in map coordinates (pixels without a transform), its bounds,
  and its area in square metres (None without a projected CRS)."""
  wkb: bytes
  bounds: tuple
  area_m2: Optional[float]


def finish(parts: list[PolygonPart], config: PolygonConfig, transform: Optional[tuple],
           metres: Optional[float], traced: bool = False) -> list[Optional[Finished]]:
  """Final parts -> one Finished per part, after simplification, or None where the part
  is below --min_polygon_area or simplifies to nothing. Built over the whole array with
  shapely's vectorised functions; only an invalid polygon is repaired on its own.

  traced: the parts are polygonize's own, unmerged. GDAL's 4-connected traces are valid
  polygons (a pinch becomes a hole touching its shell at one vertex; tests/polygons check
  it over random masks), so without simplification their validity check is skipped."""
  import shapely  # pylint: disable=import-outside-toplevel
  results: list = [None] * len(parts)
  keep = [i for i, p in enumerate(parts) if p.pixels >= config.min_area_px]
  if not keep:
    return results
  geometries = shapely.from_wkb([parts[i].geometry_wkb for i in keep])
  if config.simplify_px > 0:
    geometries = shapely.simplify(geometries, config.simplify_px, preserve_topology=True)
  checked = config.simplify_px > 0 or not traced
  for j in np.flatnonzero(~shapely.is_valid(geometries)) if checked else ():
    pieces = _polygons(shapely.make_valid(geometries[j]))
    geometries[j] = max(pieces, key=lambda g: g.area) if pieces else None
  alive = ~(shapely.is_missing(geometries) | shapely.is_empty(geometries))
  keep = [i for i, a in zip(keep, alive) if a]
  geometries = geometries[alive]
  unit_area = None    # a pixel's area in CRS units squared, where metres are known
  if transform is not None:
    a, b, c, d, e, f = transform[:6]
    # x' = a x + b y + c, y' = d x + e y + f: element by element, as one polygon at a time.
    geometries = shapely.transform(
        geometries, lambda xy: np.stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                         d * xy[:, 0] + e * xy[:, 1] + f]).T)
    if metres is not None:
      unit_area = pixel_area(transform)
  wkbs = shapely.to_wkb(geometries)
  bounds = shapely.bounds(geometries).tolist()
  for j, i in enumerate(keep):
    results[i] = Finished(wkbs[j], tuple(bounds[j]), None if unit_area is None else
                          parts[i].pixels * unit_area * metres * metres)
  return results
