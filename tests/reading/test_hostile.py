"""Hostile inputs: records and files too large to hold become errors, read past, not read."""
import gzip
import io
import tarfile

import numpy as np
import pytest

from transforms.reading.shards import ShardError, TooLarge, tar_samples, tfrecord_payloads

from conftest import read_errors, read_rows, run_job, save_image, textured_image
from inputs import shard_png, tf_example, write_tar, write_tfrecord

MB = 1 << 20


class _Zeros(io.RawIOBase):
  """`size` zero bytes, produced as they are read: a member far larger than memory."""

  def __init__(self, size):
    super().__init__()
    self.left = size

  def readable(self):
    return True

  def readinto(self, buffer):
    n = min(len(buffer), self.left)
    buffer[:n] = bytes(n)
    self.left -= n
    return n


def write_tar_bomb(path, member_size, before=(), after=()):
  """A gzip tar whose one large member of zeros compresses ~230:1 (3 GiB -> 14 MB)."""
  with gzip.open(path, "wb", compresslevel=1) as stream:
    with tarfile.open(fileobj=stream, mode="w|") as archive:
      for name, data in before:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
      info = tarfile.TarInfo("bomb.png")
      info.size = member_size
      archive.addfile(info, io.BufferedReader(_Zeros(member_size), 8 * MB))
      for name, data in after:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
  return str(path)


def test_tfrecord_record_above_the_limit_is_read_past_with_its_crc_checked(tmp_path):
  big = np.random.default_rng(0).bytes(3 * MB)
  path = write_tfrecord(tmp_path / "a.tfrecord", [b"small", big, b"after"])
  with open(path, "rb") as f:
    records = list(tfrecord_payloads(f, max_bytes=MB))
  assert records == [b"small", TooLarge("record 1", 3 * MB), b"after"]
  damaged = bytearray(open(path, "rb").read())
  damaged[30 + MB] ^= 0xFF   # a byte inside the large record
  with pytest.raises(ShardError, match="corrupt at record 1"):
    list(tfrecord_payloads(io.BytesIO(bytes(damaged)), max_bytes=MB))


def test_tar_member_above_the_limit_is_passed_over(tmp_path):
  path = write_tar_bomb(tmp_path / "b.tar.gz", 5 * MB, before=[("a.png", b"png a")],
                        after=[("c.png", b"png c")])
  with gzip.open(path, "rb") as stream:
    samples = list(tar_samples(stream, max_bytes=MB))
  assert [(s.key, s.data) for s in samples] == [("a", b"png a"), ("bomb", None),
                                                 ("c", b"png c")]
  assert "member bomb.png is 5,242,880 bytes, above the record limit of 1,048,576" in (
      samples[1].problem)


def test_a_3_gib_tar_member_is_one_error_and_the_job_goes_on(pixel_local_model, tmp_path):
  """The reported case: a 14 MB .tar.gz whose one member expands to 3 GiB, among good
  images, at the default limit. Before, the local runner reached 10 GB and the job died."""
  inputs = tmp_path / "in"
  inputs.mkdir()
  bomb = write_tar_bomb(inputs / "bomb.tar.gz", 3 << 30,
                        before=[("first.png", shard_png(1))], after=[("last.png", shard_png(2))])
  for i in range(2):
    save_image(inputs / f"good{i}.png", textured_image(40, 56, i))
  summary = run_job("--input", inputs / "*", "--output", tmp_path / "out" / "rows",
                    "--model", pixel_local_model)
  assert (summary.inputs, summary.rows, summary.errors) == (5, 4, 1)
  assert sorted(read_rows(tmp_path / "out" / "rows")) == sorted(
      [f"{bomb}#first", f"{bomb}#last", str(inputs / "good0.png"), str(inputs / "good1.png")])
  (error,) = read_errors(tmp_path / "out" / "rows-errors")
  assert error["image_id"] == f"{bomb}#bomb" and error["stage"] == "read"
  assert "3,221,225,472 bytes, above the record limit of 1,073,741,824" in error["reason"]


def test_files_and_records_above_max_record_bytes_are_errors(pixel_local_model, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
  big_png = save_image(inputs / "big.png", noise)          # ~480 KB: incompressible
  small_png = save_image(inputs / "small.png", textured_image(40, 56))
  big_record = tf_example(open(big_png, "rb").read(), **{"image/id": "big"})
  shard = write_tfrecord(inputs / "s.tfrecord", [
      tf_example(shard_png(3), **{"image/id": "before"}), big_record,
      tf_example(shard_png(4), **{"image/id": "after"})])
  tar = write_tar(inputs / "t.tar", [("x.png", open(big_png, "rb").read()),
                                     ("y.png", shard_png(5))])
  summary = run_job("--input", inputs / "*", "--output", tmp_path / "out" / "rows",
                    "--model", pixel_local_model, "--max_record_bytes", 100_000)
  errors = {e["image_id"]: e["reason"] for e in read_errors(tmp_path / "out" / "rows-errors")}
  assert sorted(read_rows(tmp_path / "out" / "rows")) == sorted(
      [small_png, f"{shard}#before", f"{shard}#after", f"{tar}#y"])
  assert sorted(errors) == sorted([big_png, f"{shard}#1", f"{tar}#x"])
  assert "above the limit of 100,000 bytes (--max_record_bytes); not read" in errors[big_png]
  assert "record 1 is" in errors[f"{shard}#1"] and "member x.png is" in errors[f"{tar}#x"]
  assert (summary.inputs, summary.rows, summary.errors) == (7, 4, 3)


def test_decoded_pixels_above_the_limit_are_an_error(pixel_local_model, tmp_path):
  """A small file can decode to far more bytes (here 120x160x3 = 57,600)."""
  path = save_image(tmp_path / "flat.png", np.zeros((120, 160, 3), np.uint8))
  summary = run_job("--input", path, "--output", tmp_path / "rows", "--model",
                    pixel_local_model, "--max_record_bytes", 50_000)
  assert (summary.rows, summary.errors) == (0, 1)
  (error,) = read_errors(tmp_path / "rows-errors")
  assert error["stage"] == "decode" and "decoded pixels are 57,600 bytes" in error["reason"]
