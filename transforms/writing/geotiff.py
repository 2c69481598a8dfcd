"""Writing each georeferenced mask as a Cloud-Optimized GeoTIFF beside the Parquet rows."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re

import numpy as np
import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.metrics import METRICS_NAMESPACE
from transforms.pngs import decode_png
from transforms.types import NODATA_CLASS, GeoReference, Segmentation

__all__ = ["WriteMaskGeoTiffs"]

logger = logging.getLogger(__name__)


def mask_geotiff_bytes(mask: np.ndarray, geo: GeoReference, palette: list,
                       confidence: np.ndarray | None = None) -> bytes:
  """A Cloud-Optimized GeoTIFF of class ids with the source's georeferencing, the class
  palette as its colour map and NODATA_CLASS as nodata, so GIS tools show it on the map.
  With `confidence` (uint8, max probability x 255) it is the second band."""
  # pylint: disable=import-outside-toplevel
  from affine import Affine
  from rasterio.crs import CRS
  from rasterio.io import MemoryFile
  crs = CRS.from_wkt(geo.crs_wkt) if geo.crs_wkt else None
  colormap = {i: (*map(int, colour), 255) for i, colour in enumerate(palette)}
  colormap[NODATA_CLASS] = (0, 0, 0, 0)
  with MemoryFile() as memory:
    with memory.open(driver="COG", width=mask.shape[1], height=mask.shape[0],
                     count=1 if confidence is None else 2, dtype="uint8", crs=crs,
                     transform=Affine(*geo.transform), nodata=NODATA_CLASS,
                     compress="deflate") as dataset:
      dataset.write(mask, 1)
      dataset.set_band_description(1, "class id")
      if confidence is None:
        dataset.write_colormap(1, colormap)
      else:
        # A palette needs a single-band file: with two bands, class colours are in the
        # Parquet metadata (palette) instead.
        dataset.write(np.where(mask == NODATA_CLASS, NODATA_CLASS,
                               np.minimum(confidence, NODATA_CLASS - 1)).astype(np.uint8), 2)
        dataset.set_band_description(2, "confidence: max probability x 255 (254 = 254 or 255)")
    return memory.read()


def mask_geotiff_name(image_id: str, source: str) -> str:
  """A readable, unique file name: the source's stem plus a hash of the image id."""
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.rstrip("/").rsplit("/", 1)[-1])
  stem = stem.rsplit(".", 1)[0] if "." in stem else stem
  return f"{stem[:80]}-{hashlib.sha1(image_id.encode()).hexdigest()[:10]}.tif"


class _MaskGeoTiffFn(beam.DoFn):
  """Segmentation -> the same row with mask_geotiff set, after writing its COG.

  Rows without georeferencing or mask pass unchanged. A failed write keeps the row
  (mask_geotiff null), logs why and counts mask_geotiffs_failed: the Parquet row is the
  job's output, the COG a convenience.
  """

  def __init__(self, directory: str, palette: list):
    self._directory = directory.rstrip("/")
    self._palette = palette
    self._written = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "mask_geotiffs")
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "mask_geotiffs_failed")

  def process(self, row: Segmentation):
    if row.transform is None or row.mask_png is None:
      yield row
      return
    path = f"{self._directory}/{mask_geotiff_name(row.image_id, row.source)}"
    try:
      mask, confidence = decode_png(row.mask_png), decode_png(row.confidence_png)
      data = mask_geotiff_bytes(mask, GeoReference(row.crs_wkt, row.crs_epsg,
                                                   tuple(row.transform)), self._palette,
                                confidence)
      with FileSystems.create(path, mime_type="image/tiff",
                              compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    except Exception as e:  # pylint: disable=broad-except
      self._failed.inc()
      logger.warning("Mask GeoTIFF for %s not written to %s: %s: %s", row.source, path,
                     type(e).__name__, e)
      yield row
      return
    self._written.inc()
    yield dataclasses.replace(row, mask_geotiff=path)


class WriteMaskGeoTiffs(beam.PTransform):
  """PCollection[Segmentation] -> PCollection[Segmentation], writing each georeferenced
  mask as a Cloud-Optimized GeoTIFF under `directory`. Usage:
      rows = rows | WriteMaskGeoTiffs("gs://bucket/masks", labels.palette)
  """

  def __init__(self, directory: str, palette):
    super().__init__()
    self._directory = directory
    self._palette = [list(colour) for colour in palette]

  def expand(self, rows):
    return rows | "WriteMaskGeoTiff" >> beam.ParDo(_MaskGeoTiffFn(self._directory,
                                                                  self._palette))
