"""What decoding refuses, shared by the decoders (decode.py, geotiff.py): the error and
the pixel limit checked before any pixel is decoded."""


class DecodeError(ValueError):
  """The bytes are not an image this pipeline can read; the message says why."""


def check_size(height: int, width: int, max_pixels: int) -> None:
  if height < 1 or width < 1:
    raise DecodeError(f"image has no pixels ({width}x{height})")
  if height * width > max_pixels:
    raise DecodeError(
        f"image declares {width}x{height} = {width * height} pixels, above "
        f"--max_pixels={max_pixels}")
