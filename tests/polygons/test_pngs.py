"""transforms/pngs.py: the stitch's PNGs taken back as their arrays by the stages fused
after it, and decoded whenever the bytes came any other way; polygons are the same."""
import io
import threading

import numpy as np
import pytest
from PIL import Image

from transforms import pngs
from transforms.config import PolygonConfig
from transforms.polygons.polygonize import _PolygonizeFn
from transforms.types import Segmentation


def _blobs(seed, height=96, width=80):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 4, (height // 8 + 1, width // 8 + 1)).astype(np.uint8)
  return np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:height, :width].copy()


def test_kept_bytes_give_back_the_array_read_only_and_other_bytes_are_decoded():
  mask = _blobs(1)
  data = pngs.encode_png(mask, keep=True)
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), mask)  # a real PNG
  assert pngs.decode_png(data) is mask
  with pytest.raises(ValueError):
    mask[0, 0] = 9            # what the bytes decode to can no longer change
  copied = bytes(bytearray(data))     # equal bytes, another object: decoded
  decoded = pngs.decode_png(copied)
  assert decoded is not mask and np.array_equal(decoded, mask)
  plain = _blobs(2)
  unkept = pngs.encode_png(plain)
  assert pngs.decode_png(unkept) is not plain and plain.flags.writeable
  assert pngs.decode_png(None) is None


def test_the_cache_is_bounded_in_entries_and_bytes(monkeypatch):
  first = _blobs(3)
  first_png = pngs.encode_png(first, keep=True)
  later = [pngs.encode_png(_blobs(10 + i), keep=True) for i in range(pngs.RECENT_ARRAYS)]
  assert pngs.decode_png(first_png) is not first          # pushed out: decoded again
  assert np.array_equal(pngs.decode_png(first_png), first)
  assert pngs.decode_png(later[-1]) is not None
  monkeypatch.setattr(pngs, "RECENT_BYTES", first.nbytes - 1)
  big = _blobs(4)
  big_png = pngs.encode_png(big, keep=True)
  assert pngs.decode_png(big_png) is not big and big.flags.writeable   # too big to keep
  with pngs._lock:  # pylint: disable=protected-access
    held = sum(a.nbytes for _, a in pngs._recent.values())  # pylint: disable=protected-access
    assert held == pngs._held[0] and len(pngs._recent) <= pngs.RECENT_ARRAYS  # pylint: disable=protected-access


def test_threads_each_get_their_own_arrays_back():
  results = {}

  def work(seed):
    array = _blobs(seed)
    data = pngs.encode_png(array, keep=True)
    results[seed] = np.array_equal(pngs.decode_png(data), _blobs(seed))
  threads = [threading.Thread(target=work, args=(s,)) for s in range(40, 56)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(results.values()) and len(results) == 16


def test_polygons_from_kept_arrays_equal_polygons_from_decoded_pngs():
  mask = _blobs(5)
  confidence = np.random.default_rng(6).integers(0, 256, mask.shape).astype(np.uint8)
  kept = Segmentation("a.png", "a.png", *mask.shape, pngs.encode_png(mask, keep=True),
                      None, None, "m", "float32",
                      confidence_png=pngs.encode_png(confidence, keep=True))
  assert pngs.decode_png(kept.mask_png) is mask        # the fast path is the one taken
  copied = Segmentation("a.png", "a.png", *mask.shape, bytes(bytearray(kept.mask_png)),
                        None, None, "m", "float32",
                        confidence_png=bytes(bytearray(kept.confidence_png)))
  fn = _PolygonizeFn(PolygonConfig(), tuple(f"c{i}" for i in range(4)))
  fn.setup()
  fast, slow = list(fn.process(kept)), list(fn.process(copied))
  assert len(fast) == 1 and len(fast[0].features) > 10
  assert fast == slow
