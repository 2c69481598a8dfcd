"""Writing: rows to Parquet with one explicit schema, errors to JSON lines, and masks
as Cloud-Optimized GeoTIFFs."""
from transforms.writing.geotiff import WriteMaskGeoTiffs
from transforms.writing.parquet import WriteErrors, WriteSegmentations, segmentation_schema

__all__ = ["WriteErrors", "WriteMaskGeoTiffs", "WriteSegmentations", "segmentation_schema"]
