"""Decoding rules: every supported layout becomes (H, W, 3) RGB; bad bytes raise DecodeError."""
import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from transforms.reading.decode import DecodeError, decode_image

from inputs import png_declaring

LIMIT = 50_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def tiff_bytes(array, **kwargs) -> bytes:
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, array, **kwargs)
  return buffer.getvalue()


def test_rgb_png_round_trips_exactly():
  rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
  out = decode_image(encode(Image.fromarray(rgb), "PNG"), LIMIT)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_copied_to_three_channels():
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
  out = decode_image(encode(Image.fromarray(gray), "PNG"), LIMIT)
  assert out.shape == (8, 8, 3)
  for channel in range(3):
    np.testing.assert_array_equal(out[:, :, channel], gray)


def test_rgba_drops_alpha_without_compositing():
  rgba = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint8)
  rgba[:, :, 3] = 0  # fully transparent: colours must survive anyway
  out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT)
  np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_palette_png_with_transparency_uses_palette_colours():
  image = Image.new("P", (4, 3))
  image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  image.putpixel((1, 1), 1)
  out = decode_image(encode(image, "PNG", transparency=0), LIMIT)
  assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)


def test_16_bit_grayscale_png_keeps_16_bits():
  gray = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)
  out = decode_image(encode(Image.fromarray(gray), "PNG"), LIMIT)
  assert out.dtype == np.uint16
  np.testing.assert_array_equal(out[:, :, 1], gray)


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_rgb_and_rgba_tiff(channels):
  array = np.random.default_rng(2).integers(0, 65536, (9, 7, channels), dtype=np.uint16)
  out = decode_image(tiff_bytes(array, photometric="rgb"), LIMIT)
  assert out.dtype == np.uint16
  np.testing.assert_array_equal(out, array[:, :, :3])


def test_float_tiff_is_clipped_to_unit_range():
  array = np.array([[[-0.5, 0.5, 1.5]]], np.float32).repeat(3, 0)
  out = decode_image(tiff_bytes(array, photometric="rgb"), LIMIT)
  assert out.dtype == np.uint16
  np.testing.assert_array_equal(out[0, 0], [0, 32768, 65535])


def test_multi_page_tiff_reads_the_first_page():
  pages = np.stack([np.full((4, 5, 3), v, np.uint8) for v in (11, 99)])
  out = decode_image(tiff_bytes(pages, photometric="rgb"), LIMIT)
  assert out.shape == (4, 5, 3) and (out == 11).all()


def test_animated_gif_reads_the_first_frame():
  frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
  data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
  out = decode_image(data, LIMIT)
  assert out.shape == (4, 6, 3) and tuple(out[0, 0]) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb():
  out = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), LIMIT)
  assert out.shape == (8, 8, 3)
  assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60  # red


def test_exif_orientation_is_applied():
  image = Image.new("RGB", (40, 20), (0, 0, 0))
  image.paste((255, 255, 255), (0, 0, 10, 20))  # white left edge
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), LIMIT)
  assert out.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 tall
  assert out[:5, :, 0].mean() > 200  # the white edge is now at the top


def test_one_pixel_and_extreme_aspect_ratio():
  assert decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), LIMIT).shape == (1, 1, 3)
  assert decode_image(encode(Image.new("RGB", (5000, 3)), "PNG"), LIMIT).shape == (3, 5000, 3)


def test_header_declaring_too_many_pixels_is_refused_before_decoding():
  with pytest.raises(DecodeError, match="200000x200000.*--max_pixels"):
    decode_image(png_declaring(200_000, 200_000), LIMIT)


def test_max_pixels_applies_to_tiff_too():
  with pytest.raises(DecodeError, match="--max_pixels=100"):
    decode_image(tiff_bytes(np.zeros((20, 20, 3), np.uint8)), 100)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is a text file, not an image\n", "unreadable image"),
])
def test_non_images(data, reason):
  with pytest.raises(DecodeError, match=reason):
    decode_image(data, LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(fmt):
  data = encode(Image.fromarray(np.random.default_rng(3).integers(
      0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
  with pytest.raises(DecodeError, match="unreadable"):
    decode_image(data[:len(data) // 2], LIMIT)


def test_tiff_with_corrupt_strip():
  array = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = bytearray(tiff_bytes(array, photometric="rgb", compression="zlib"))
  data[200:400] = b"\xff" * 200  # inside the compressed strip
  with pytest.raises(DecodeError, match="unreadable TIFF"):
    decode_image(bytes(data), LIMIT)
