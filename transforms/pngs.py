"""8-bit single-channel PNGs (masks, confidence, pseudo-labels), and the arrays of the
ones this process encoded last, so a stage fused after the encoder reads them back
without decoding them again.

A row's PNG bytes pass from the stitch to polygons and GeoTIFFs as the same Python
object when Beam fuses the stages (the local runner and Dataflow do): decode_png then
returns the array encode_png was given, which is what decoding gives (PNG is lossless)
without the ~4-10 ms a megapixel of inflating it. Bytes that arrive any other way
(after a shuffle, from a file) are decoded. The cache is keyed by the bytes object
itself, bounded in entries and bytes, and safe across a process's threads.
"""
from __future__ import annotations

import collections
import io
import threading
from typing import Optional

import numpy as np

__all__ = ["encode_png", "decode_png", "RECENT_ARRAYS", "RECENT_BYTES"]

RECENT_ARRAYS = 6                 # a mask, confidence and pseudo-labels of two images
RECENT_BYTES = 64 * 1024 * 1024   # larger arrays are not kept: their decode is the cheap part

_lock = threading.Lock()
_recent: "collections.OrderedDict[int, tuple[bytes, np.ndarray]]" = collections.OrderedDict()
_held = [0]


def encode_png(array: np.ndarray, keep: bool = False) -> bytes:
  """(H, W) uint8 -> PNG bytes (fast compression: masks are long runs of few values).

  keep: the array is made read-only and kept with the bytes, so decode_png of these
  bytes returns it; a later write to it would raise instead of changing what they
  decode to."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(array, mode="L").save(buffer, format="PNG", compress_level=1)
  data = buffer.getvalue()
  if keep and array.nbytes <= RECENT_BYTES:
    array.flags.writeable = False
    with _lock:
      _recent[id(data)] = (data, array)
      _held[0] += array.nbytes
      while len(_recent) > RECENT_ARRAYS or _held[0] > RECENT_BYTES:
        _, (_, dropped) = _recent.popitem(last=False)
        _held[0] -= dropped.nbytes
  return data


def decode_png(data: Optional[bytes]) -> Optional[np.ndarray]:
  """PNG bytes -> their (H, W) uint8 array (read-only when it is the encoder's own)."""
  if data is None:
    return None
  with _lock:
    kept = _recent.get(id(data))
  if kept is not None and kept[0] is data:   # the very object encode_png returned
    return kept[1]
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image)
