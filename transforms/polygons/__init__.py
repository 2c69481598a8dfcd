"""Polygons: class regions of the stitched masks as polygons in the raster's CRS
(vectorize: pure functions; polygonize: the Beam transform)."""
from transforms.polygons.polygonize import PolygonizeMasks

__all__ = ["PolygonizeMasks"]
