"""Hostile inputs measured, not only their outcome: each is read in a child process along
the job's own reading path (open, decompress, split a shard, decode) and its peak RSS
(VmHWM) must stay within BOUND of the same child reading a normal image."""
import gzip
import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from inputs import shard_png
from test_hostile import _Zeros, write_tar_bomb

MB = 1 << 20
LIMIT = 64 * MB           # --max_record_bytes in these children
BOUND = LIMIT + 96 * MB   # the stated bound: the record limit plus buffers

CHILD = r"""
import json, sys
from transforms.reading.compressed import open_decompressed, read_file
from transforms.reading.decode import decode_raster
from transforms.reading.read import _format_of
from transforms.reading.shards import (FORMAT_TFRECORD, FORMAT_TAR, detect_format,
                                       tar_samples, tfrecord_payloads)
path, limit = sys.argv[1], int(sys.argv[2])
outcome = {"records": 0, "problems": 0, "error": None}
try:
  kind = detect_format(path)
  if kind == FORMAT_TAR:
    with open_decompressed(path) as stream:
      for record in tar_samples(stream, limit):
        outcome["records"] += 1
        outcome["problems"] += record.problem is not None
  elif kind == FORMAT_TFRECORD:
    with open_decompressed(path) as stream:
      for payload in tfrecord_payloads(stream, limit):
        outcome["records"] += 1
        outcome["problems"] += not isinstance(payload, bytes)
  else:
    decode_raster(read_file(path, limit), 100_000_000)
    outcome["records"] = 1
except Exception as e:
  outcome["error"] = f"{type(e).__name__}: {e}"[:300]
with open("/proc/self/status") as f:
  outcome["vmhwm"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
print(json.dumps(outcome))
"""


def _read_in_child(path) -> dict:
  done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(LIMIT)],
                        capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  path = tmp_path_factory.mktemp("normal") / "normal.png"
  path.write_bytes(shard_png(0, 512, 512))
  outcome = _read_in_child(path)
  assert outcome["error"] is None
  return outcome["vmhwm"]


def _tfrecord_header(length):
  from transforms.reading.shards import _masked_crc  # pylint: disable=import-outside-toplevel
  head = struct.pack("<Q", length)
  return head + struct.pack("<I", _masked_crc(head))


def _gzip_tfrecord_bomb(path, size):
  """A tfrecord.gz whose one record expands to `size` zero bytes (its CRC is wrong: the
  reader passes over it in chunks, then says so)."""
  with gzip.open(path, "wb", compresslevel=1) as stream:
    stream.write(_tfrecord_header(size))
    zeros = _Zeros(size)
    while chunk := zeros.read(8 * MB):
      stream.write(chunk)
    stream.write(b"\0\0\0\0")
  return path


def _png_with_long_idat(path):
  """A 64x64 PNG header over an IDAT stream inflating to 1 GiB."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  compressor = zlib.compressobj(1)
  idat = b"".join(compressor.compress(bytes(64 * MB)) for _ in range(16)) + compressor.flush()
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2,
                                                                      0, 0, 0))
                   + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
  return path


def _tiff_with_many_ifds(path, count=100_000):
  """A little-endian TIFF of `count` IFDs chained one after another, each a 1x1 image."""
  entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
             (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]
  ifd_size = 2 + 12 * len(entries) + 4
  out = bytearray(b"II*\x00" + struct.pack("<I", 9) + b"\x80")   # pixel at offset 8
  for i in range(count):
    out += struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
      out += struct.pack("<HHII", tag, kind, n, value)
    out += struct.pack("<I", 0 if i == count - 1 else 9 + (i + 1) * ifd_size)
  path.write_bytes(bytes(out))
  return path


def _tiff_offsets_past_the_end(path):
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((4000, 4000), np.uint8)).save(buffer, format="TIFF")
  data = bytearray(buffer.getvalue()[:4096])      # strips point far past the file's end
  path.write_bytes(bytes(data))
  return path


def _jpeg_with_huge_icc(path):
  """A JPEG carrying 255 ICC segments of 64 KB (the most a JPEG can chain: 16 MB)."""
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="JPEG",
                                                         icc_profile=bytes(255 * 65000))
  path.write_bytes(buffer.getvalue())
  return path


def _tar_of_empty_members(path, count=100_000):
  with tarfile.open(path, "w") as archive:
    for i in range(count):
      archive.addfile(tarfile.TarInfo(f"{i:06d}.txt"), io.BytesIO(b""))
  return path


def _tfrecord_of_empty_records(path, count=100_000):
  from transforms.reading.shards import _masked_crc  # pylint: disable=import-outside-toplevel
  path.write_bytes((_tfrecord_header(0) + struct.pack("<I", _masked_crc(b""))) * count)
  return path


CASES = {
    "3 GiB tar.gz member": (lambda p: write_tar_bomb(p / "bomb.tar.gz", 3 << 30,
                                                     before=[("a.png", shard_png(1))]),
                            lambda o: o["records"] == 2 and o["problems"] == 1),
    "tfrecord.gz record of 3 GiB": (lambda p: _gzip_tfrecord_bomb(p / "bomb.tfrecord.gz",
                                                                  3 << 30),
                                    lambda o: o["error"] is not None and "corrupt" in o["error"]),
    "gzip inside gzip": (lambda p: _write(p / "twice.png.gz", gzip.compress(
        gzip.compress(bytes(1 << 30), 1))), lambda o: o["error"] is not None),
    "a .gz image inflating to 1 GiB": (lambda p: _write(p / "big.png.gz", gzip.compress(
        bytes(1 << 30), 1)), lambda o: "decompresses to more than" in (o["error"] or "")),
    "PNG whose IDAT outgrows its header": (lambda p: _png_with_long_idat(p / "long.png"),
                                           lambda o: True),
    "TIFF of 100,000 IFDs": (lambda p: _tiff_with_many_ifds(p / "ifds.tif"), lambda o: True),
    "TIFF whose strips point past the file": (lambda p: _tiff_offsets_past_the_end(
        p / "short.tif"), lambda o: o["error"] is not None),
    "JPEG with a 16 MB ICC profile": (lambda p: _jpeg_with_huge_icc(p / "icc.jpg"),
                                      lambda o: o["error"] is None),
    "tar of 100,000 empty members": (lambda p: _tar_of_empty_members(p / "empty.tar"),
                                     lambda o: o["records"] == 100_000 and
                                     o["problems"] == 100_000),
    "TFRecord of 100,000 empty records": (lambda p: _tfrecord_of_empty_records(
        p / "empty.tfrecord"), lambda o: o["records"] == 100_000 and o["error"] is None),
}


def _write(path, data):
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_peak_memory_is_bounded(case, baseline, tmp_path):
  make, expected = CASES[case]
  path = make(tmp_path)
  outcome = _read_in_child(path)
  assert expected(outcome), outcome
  growth = outcome["vmhwm"] - baseline
  print(f"{case}: peak RSS {outcome['vmhwm'] / MB:.0f} MiB, {growth / MB:+.0f} MiB over a "
        f"normal image; {outcome}")
  assert growth < BOUND, f"{case}: {growth / MB:.0f} MiB above the baseline"
