"""GeoTIFFs: reading pixels with their georeferencing and nodata, whole or by windows.

Pure functions over bytes and arrays (rasterio, whose wheels bundle GDAL); no Beam.
A TIFF goes through here when it carries GeoTIFF or GDAL nodata tags or an internal
mask; other TIFFs keep the plain decoder's rules (decode.py).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Optional

import numpy as np

from transforms.reading.errors import DecodeError, check_size
from transforms.types import GeoReference

GCS_READ_CHUNK = 1 << 20   # bytes per ranged GCS read when reading a raster by windows

# TIFF tags that make a file a GeoTIFF or give it a GDAL nodata value.
_GEO_TAGS = {33550, 33922, 34264, 34735, 42113}
_MASK_SUBFILE_TYPE = 4   # NewSubfileType bit of GDAL's internal (per-dataset) masks


@dataclasses.dataclass(frozen=True)
class Raster:
  """Decoded pixels (H, W, C) uint8/uint16 (C = 3, or a GeoTIFF's bands), where on the
  map, and which pixels hold data."""
  pixels: np.ndarray
  geo: Optional[GeoReference]
  valid: Optional[np.ndarray]   # (H, W) bool; None when every pixel holds data


def is_geotiff(data: bytes) -> bool:
  """Whether a TIFF carries georeferencing, a nodata value or an internal mask."""
  import tifffile  # pylint: disable=import-outside-toplevel
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
      first = tif.pages[0]
      if _GEO_TAGS & {tag.code for tag in first.tags.values()}:
        return True
      return any(int(getattr(page, "subfiletype", 0)) & _MASK_SUBFILE_TYPE
                 for page in tif.pages[1:4])
  except Exception:  # pylint: disable=broad-except  # not readable: the plain decoder says why
    return False


def georeference(dataset) -> Optional[GeoReference]:
  """The dataset's CRS and affine transform; None for a raster not placed on a map."""
  transform = tuple(float(v) for v in tuple(dataset.transform)[:6])
  if dataset.crs is None and transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
    return None
  wkt = dataset.crs.to_wkt() if dataset.crs is not None else None
  epsg = dataset.crs.to_epsg() if dataset.crs is not None else None
  return GeoReference(wkt, epsg, transform)


def _read_raster(dataset, to_rgb, window=None) -> Raster:
  """The dataset's pixels (or a window's), their georeferencing and GDAL's dataset mask.

  Alpha bands are not pixels: with GDAL's nodata value and internal masks they decide
  which pixels hold data. Every other band is kept, for --channel_mapping indices.
  """
  # pylint: disable=import-outside-toplevel
  from rasterio.enums import ColorInterp
  from rasterio.windows import transform as window_transform
  bands = [i + 1 for i, interp in enumerate(dataset.colorinterp) if interp != ColorInterp.alpha]
  if not bands:
    raise DecodeError("raster has only an alpha band")
  array = np.moveaxis(dataset.read(bands, window=window), 0, -1)
  mask = dataset.dataset_mask(window=window) != 0
  geo = georeference(dataset)
  if geo is not None and window is not None:   # a block is placed by its own transform
    geo = dataclasses.replace(geo, transform=tuple(
        float(v) for v in tuple(window_transform(window, dataset.transform))[:6]))
  return Raster(to_rgb(array, keep_bands=True), geo, None if mask.all() else mask)


def read_geotiff(data: bytes, max_pixels: int, to_rgb) -> Raster:
  """Bytes of a GeoTIFF -> Raster. `to_rgb` maps (H, W, C) arrays as decode.py does."""
  # pylint: disable=import-outside-toplevel
  from rasterio.io import MemoryFile
  try:
    with MemoryFile(data) as memory, memory.open() as dataset:
      check_size(dataset.height, dataset.width, max_pixels)
      return _read_raster(dataset, to_rgb)
  except DecodeError:
    raise
  except Exception as e:  # rasterio raises RasterioIOError and others for damaged files
    raise DecodeError(f"unreadable GeoTIFF: {e}") from e


def _open(path: str):
  """A rasterio dataset on a local or Beam-filesystem path (gs://), read by byte ranges:
  only the header and the blocks a window touches are fetched."""
  import rasterio  # pylint: disable=import-outside-toplevel
  if "://" not in path or path.startswith("file://"):
    return rasterio.open(path[len("file://"):] if path.startswith("file://") else path)
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems

  def opener(uri, mode="rb"):
    del mode
    if uri.startswith("gs://"):
      # Beam's default 16 MiB read buffer would fetch 16 MiB for every small seek.
      from apache_beam.io.gcp import gcsio
      return gcsio.GcsIO().open(uri, "rb", read_buffer_size=GCS_READ_CHUNK)
    return FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED)
  return rasterio.open(path, opener=opener)


def raster_size(path: str) -> tuple[int, int]:
  """(height, width) from the header alone."""
  with _open(path) as dataset:
    return dataset.height, dataset.width


def block_grid(height: int, width: int, block_size: int) -> list:
  """(y, x, block height, block width) of fixed blocks covering the raster, row by row."""
  return [(y, x, min(block_size, height - y), min(block_size, width - x))
          for y in range(0, height, block_size) for x in range(0, width, block_size)]


def read_window(path: str, y: int, x: int, height: int, width: int, to_rgb) -> Raster:
  """One block of a raster, with its own transform and nodata mask; nothing else read."""
  # pylint: disable=import-outside-toplevel
  from rasterio.windows import Window
  try:
    with _open(path) as dataset:
      return _read_raster(dataset, to_rgb, Window(x, y, width, height))
  except Exception as e:  # pylint: disable=broad-except
    raise DecodeError(f"unreadable window y={y} x={x} {height}x{width}: "
                      f"{type(e).__name__}: {e}") from e
