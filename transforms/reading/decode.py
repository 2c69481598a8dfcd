"""Bytes to RGB pixels, by documented rules; pure functions, no Beam.

Rules (also in the manual, docs/inputs.md):
- The result is (H, W, 3) RGB, uint8 for 8-bit sources and uint16 for 16-bit ones;
  the model step scales it to [0, 1] by the dtype's range (255 or 65535).
- Grayscale is copied to all three channels; palette images are expanded through
  their palette; alpha is dropped (not composited); CMYK is converted to RGB.
- EXIF orientation is applied, so the mask matches the image as viewers show it.
- Float images (TIFF) are taken as already in [0, 1] and clipped, then stored as uint16.
- Multi-page TIFF and animated images: the first page/frame only.
- An image whose header declares more than `max_pixels` pixels is refused before
  its pixels are decoded, so a decompression bomb cannot exhaust memory.
- GeoTIFFs (GeoTIFF or GDAL nodata tags, or an internal mask) are read with rasterio:
  alpha bands and nodata mark pixels as nodata instead of being dropped (geo.py).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from transforms.reading import geotiff as geo
from transforms.reading.errors import DecodeError, check_size

__all__ = ["DecodeError", "check_size", "decode_image", "decode_raster", "read_block"]

# We enforce our own limit (max_pixels) before decoding; Pillow's own check would
# refuse large-but-legitimate aerial tiles with a less helpful message.
Image.MAX_IMAGE_PIXELS = None

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


MAX_BANDS = 16   # bands kept from a GeoTIFF for --channel_mapping indices


def _to_rgb(array: np.ndarray, keep_bands: bool = False) -> np.ndarray:
  """(H, W), (H, W, 1..4) of any numeric dtype -> (H, W, 3) uint8 or uint16.

  keep_bands (GeoTIFFs, whose alpha is already removed): 3 to MAX_BANDS bands are all
  kept, for --channel_mapping band indices (e.g. RGBN).
  """
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[2] < 1:
    raise DecodeError(f"unsupported pixel layout {array.shape}")
  channels = array.shape[2]
  if channels in (1, 2):       # gray, gray + alpha
    array = np.repeat(array[:, :, :1], 3, axis=2)
  elif keep_bands:
    if channels > MAX_BANDS:
      raise DecodeError(f"{channels} bands: at most {MAX_BANDS} are read")
  elif channels >= 3:          # RGB, RGBA (alpha dropped); extra bands are not guessed at
    if channels > 4:
      raise DecodeError(f"{channels} bands: only 1-4 band images are read as RGB")
    array = array[:, :, :3]
  if array.dtype == np.uint8 or array.dtype == np.uint16:
    return np.ascontiguousarray(array)
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if np.issubdtype(array.dtype, np.floating):
    unit = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(unit, 0.0, 1.0) * 65535).astype(np.uint16)
  if np.issubdtype(array.dtype, np.integer):
    info = np.iinfo(array.dtype)
    if info.min < 0:
      raise DecodeError(f"signed {array.dtype} pixels have no defined RGB range")
    return (array.astype(np.float64) / info.max * 65535).round().astype(np.uint16)
  raise DecodeError(f"unsupported pixel type {array.dtype}")


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
  import tifffile  # pylint: disable=import-outside-toplevel
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
      page = tif.pages[0]
      shape = page.shape
      if page.planarconfig == 2 and len(shape) == 3:  # separate planes: (C, H, W)
        height, width = shape[1], shape[2]
      else:
        height, width = shape[0], shape[1]
      check_size(height, width, max_pixels)
      array = page.asarray()
      if page.planarconfig == 2 and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)
  except DecodeError:
    raise
  except Exception as e:  # tifffile raises many types for damaged files
    raise DecodeError(f"unreadable TIFF: {e}") from e
  return _to_rgb(array)


def _decode_with_pillow(data: bytes, max_pixels: int) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size  # read from the header, nothing decoded yet
      check_size(height, width, max_pixels)
      with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        image.load()
      mode = image.mode
      if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
      elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
      elif mode == "1":
        image = image.convert("L")
      array = np.asarray(image)
      if mode.startswith("I;16"):
        array = array.astype(np.uint16)
      elif mode == "I":  # 32-bit integer images, usually 16-bit data in a wide container
        array = np.clip(array, 0, 65535).astype(np.uint16)
  except DecodeError:
    raise
  except Exception as e:  # Pillow: UnidentifiedImageError, OSError (truncated), SyntaxError
    raise DecodeError(f"unreadable image: {e}") from e
  return _to_rgb(array)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
  """Decodes PNG, JPEG, TIFF (and what else Pillow reads) into (H, W, 3) RGB pixels."""
  if not data:
    raise DecodeError("empty file (0 bytes)")
  if data[:4] in _TIFF_MAGIC:
    return _decode_tiff(data, max_pixels)
  return _decode_with_pillow(data, max_pixels)


def read_block(block):
  """A RasterBlock's pixels, read as a window of its raster (geo.py)."""
  return geo.read_window(block.source, block.y, block.x, block.height, block.width, _to_rgb)


def decode_raster(data: bytes, max_pixels: int):
  """Like decode_image, plus georeferencing and nodata for GeoTIFFs (geo.py)."""
  if data[:4] in _TIFF_MAGIC and geo.is_geotiff(data):
    return geo.read_geotiff(data, max_pixels, _to_rgb)
  return geo.Raster(decode_image(data, max_pixels), None, None)
