"""What the model sees: decoded pixels scaled to [0, 1] and mapped to its three input
channels (rgb, rg_mean, irg or band indices). Pure numpy; no Beam, no TensorFlow."""
from __future__ import annotations

import numpy as np


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
  """Integer pixels scaled by their dtype's range to float32 in [0, 1]."""
  if pixels.dtype == np.uint8:
    return pixels.astype(np.float32) * np.float32(1 / 255)
  if pixels.dtype == np.uint16:
    return pixels.astype(np.float32) * np.float32(1 / 65535)
  raise TypeError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")


CHANNEL_MAPPINGS = ("rgb", "rg_mean", "irg")
MAX_BAND_INDEX = 15


def parse_channel_mapping(text: str) -> str:
  """Checks a mapping: a name of CHANNEL_MAPPINGS, or three band indices like '2,1,0'."""
  if text in CHANNEL_MAPPINGS:
    return text
  parts = text.split(",")
  if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= MAX_BAND_INDEX for p in parts):
    return ",".join(p.strip() for p in parts)
  raise ValueError(f"channel mapping {text!r}: use one of {', '.join(CHANNEL_MAPPINGS)} or "
                   f"three band indices from 0 to {MAX_BAND_INDEX}, e.g. '2,1,0' or '3,0,1' "
                   "(NIR, R, G of an RGBN GeoTIFF)")


def map_channels(unit: np.ndarray, mapping: str) -> np.ndarray:
  """The model's input channels from decoded (..., C) floats in [0, 1], C >= 3.

  rgb: the first three bands. rg_mean: (R, G, (R+G)/2), the ISPRS models' training
  input. irg: an IR-R-G image (Vaihingen) to (R, G, (R+G)/2). 'i,j,k': those bands, in
  order (a GeoTIFF keeps all its bands, e.g. '3,0,1' is NIR, R, G of RGBN).
  """
  if mapping == "rgb":
    return unit if unit.shape[-1] == 3 else unit[..., :3]
  if mapping in ("rg_mean", "irg"):
    red, green = (unit[..., 0], unit[..., 1]) if mapping == "rg_mean" else (
        unit[..., 1], unit[..., 2])
    return np.stack([red, green, (red + green) * np.float32(0.5)], axis=-1)
  indices = [int(i) for i in mapping.split(",")]
  if max(indices) >= unit.shape[-1]:
    raise ValueError(f"--channel_mapping {mapping} asks for band {max(indices)} but the "
                     f"image has {unit.shape[-1]} bands (0 to {unit.shape[-1] - 1})")
  return unit[..., indices]
