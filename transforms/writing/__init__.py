"""Writing: rows to Parquet with one explicit schema, errors to JSON lines, masks
as Cloud-Optimized GeoTIFFs, polygons and patch embeddings as GeoParquet."""
from transforms.writing.geoparquet import WritePatches, WritePolygons
from transforms.writing.geotiff import WriteMaskGeoTiffs
from transforms.writing.parquet import WriteErrors, WriteSegmentations, segmentation_schema

__all__ = ["WriteErrors", "WriteMaskGeoTiffs", "WritePatches", "WritePolygons", "WriteSegmentations",
           "segmentation_schema"]
