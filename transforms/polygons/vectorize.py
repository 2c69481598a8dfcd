"""Masks to polygons: pure functions over numpy arrays (rasterio's GDAL polygonize and
sieve, shapely); no Beam.

Polygons are traced in whole-raster pixel coordinates (x = column, y = row, integer
corners), so polygons of neighbouring blocks of one raster share exact edges and merge
exactly; simplification and the map transform come last, once per final polygon.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import numpy as np

from transforms.config import PolygonConfig
from transforms.types import NODATA_CLASS, PolygonPart


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
  from rasterio.features import rasterize, shapes
  valid = ~np.isin(mask, ignore_values)
  if not valid.any():
    return []
  mask = denoise(mask, valid, config.denoise_px)
  oy, ox = offset
  to_raster = Affine(1, 0, ox, 0, 1, oy)
  traced = list(shapes(mask, mask=valid, connectivity=4, transform=to_raster))
  # Each region's pixels, to sum its confidence: the polygons burnt back (exact, since
  # every vertex lies on a pixel corner and GDAL burns pixels by their centres), from
  # GDAL's own GeoJSON (no shapely round trip).
  regions = rasterize(((g, i + 1) for i, (g, _) in enumerate(traced)),
                      out_shape=mask.shape, transform=to_raster, fill=0, dtype="int32")
  pixel_counts = np.bincount(regions.ravel(), minlength=len(traced) + 1)
  confidence_sums = (np.bincount(regions.ravel(), weights=confidence.ravel().astype(np.float64),
                                 minlength=len(traced) + 1) / 255.0
                     if confidence is not None else None)
  geometries = polygons_from_geojson([g for g, _ in traced])
  bounds = shapely.bounds(geometries)
  wkbs = shapely.to_wkb(geometries)
  height, width = mask.shape
  top, bottom, left, right = seams
  parts = []
  # Sorted by (class, first pixel) from the bounds at hand: Python's sort is stable, so
  # ties keep GDAL's order as before.
  order = sorted(range(len(traced)),
                 key=lambda i: (int(traced[i][1]), bounds[i][1], bounds[i][0]))
  for i in order:
    value = traced[i][1]
    x0, y0, x1, y1 = bounds[i]
    on_seam = ((top and y0 <= oy) or (bottom and y1 >= oy + height)
               or (left and x0 <= ox) or (right and x1 >= ox + width))
    parts.append(PolygonPart(
        class_id=int(value), geometry_wkb=wkbs[i], pixels=int(pixel_counts[i + 1]),
        confidence_sum=None if confidence_sums is None else float(confidence_sums[i + 1]),
        on_seam=bool(on_seam)))
  return parts


def polygons_from_geojson(polygons: list) -> np.ndarray:
  """GeoJSON-like Polygon mappings -> an array of shapely Polygons, built in one call
  (shapely.from_ragged_array) rather than one Python object graph per polygon."""
  import shapely  # pylint: disable=import-outside-toplevel
  if not polygons:
    return np.empty(0, dtype=object)
  rings = [np.asarray(ring, dtype=np.float64) for polygon in polygons
           for ring in polygon["coordinates"]]
  ring_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rings])])
  polygon_offsets = np.concatenate(
      [[0], np.cumsum([len(polygon["coordinates"]) for polygon in polygons])])
  return shapely.from_ragged_array(shapely.GeometryType.POLYGON, np.concatenate(rings),
                                   (ring_offsets, polygon_offsets))


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
           metres: Optional[float]) -> list[Optional[Finished]]:
  """Final parts -> one Finished per part, after simplification, or None where the part
  is below --min_polygon_area or simplifies to nothing. Built over the whole array with
  shapely's vectorised functions; only an invalid polygon is repaired on its own."""
  import shapely  # pylint: disable=import-outside-toplevel
  results: list = [None] * len(parts)
  keep = [i for i, p in enumerate(parts) if p.pixels >= config.min_area_px]
  if not keep:
    return results
  geometries = shapely.from_wkb([parts[i].geometry_wkb for i in keep])
  if config.simplify_px > 0:
    geometries = shapely.simplify(geometries, config.simplify_px, preserve_topology=True)
  for j in np.flatnonzero(~shapely.is_valid(geometries)):
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
