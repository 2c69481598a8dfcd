"""Shards: TFRecord (plain, gzip) and WebDataset tar (plain, gzip), written here, read by the job."""
import contextlib
import io
import re

import pytest

from transforms.reading.shards import ShardError, tar_samples, tfrecord_payloads

from conftest import read_errors, read_rows, run_job
from inputs import shard_png, tf_example, write_tar, write_tfrecord


def test_tfrecord_reader_checks_framing_and_stops_at_damage(tmp_path):
  path = write_tfrecord(tmp_path / "a.tfrecord", [b"one", b"two", b"three"])
  data = open(path, "rb").read()
  assert list(tfrecord_payloads(io.BytesIO(data))) == [b"one", b"two", b"three"]
  truncated = io.BytesIO(data[:-5])
  read = []
  with pytest.raises(ShardError, match="truncated at record 2"):
    for payload in tfrecord_payloads(truncated):
      read.append(payload)
  assert read == [b"one", b"two"]
  flipped = bytearray(data)
  flipped[12 + 1] ^= 0xFF  # inside the first payload
  with pytest.raises(ShardError, match="corrupt at record 0"):
    list(tfrecord_payloads(io.BytesIO(bytes(flipped))))


def test_tar_samples_group_members_by_key(tmp_path):
  path = write_tar(tmp_path / "s.tar", [("a/x1.png", b"img1"), ("a/x1.json", b"{}"),
                                         ("a/x2.seg.jpg", b"img2"), ("a/x3.txt", b"t")])
  samples = list(tar_samples(open(path, "rb")))
  assert [(s.key, s.data, s.problem is None) for s in samples] == [
      ("a/x1", b"img1", True), ("a/x2", b"img2", True), ("a/x3", None, False)]


def test_shards_of_every_kind_through_the_job(pixel_local_model, tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  plain = write_tfrecord(shards / "plain.tfrecord", [
      tf_example(shard_png(1), **{"image/filename": "one.png"}),
      tf_example(shard_png(2), **{"image/id": "two"}),
      tf_example(shard_png(3)),                                   # no id: its index, 2
      tf_example(None, **{"image/filename": "nothing.png"}),  # missing image key
      tf_example(b"not an image", **{"image/filename": "garbage.png"}),
  ])
  gz = write_tfrecord(shards / "zipped.tfrecord.gz", [tf_example(shard_png(4), **{"image/id": "z"})],
                      compress=True)
  whole = open(write_tfrecord(tmp_path / "t.tfrecord",
                              [tf_example(shard_png(5 + i), **{"image/id": f"t{i}"})
                               for i in range(3)]), "rb").read()
  truncated = shards / "truncated.tfrecord"
  truncated.write_bytes(whole[:len(whole) - 100])
  tar = write_tar(shards / "web.tar", [("s/k1.png", shard_png(9)), ("s/k1.cls", b"3"),
                                       ("s/k2.jpg", shard_png(10)), ("s/k3.txt", b"no image")])
  tgz = write_tar(shards / "web.tar.gz", [("k4.png", shard_png(11))], compress=True)
  progress = io.StringIO()
  with contextlib.redirect_stderr(progress):
    summary = run_job("--input", shards / "*", "--output", tmp_path / "out" / "rows",
                      "--model", pixel_local_model, "--progress", "lines",
                      "--progress_interval", 0.05)
  rows = read_rows(tmp_path / "out" / "rows")
  errors = {e["image_id"]: e for e in read_errors(tmp_path / "out" / "rows-errors")}
  expected_rows = {f"{plain}#one.png", f"{plain}#two", f"{plain}#2", f"{gz}#z",
                   f"{truncated}#t0", f"{truncated}#t1", f"{tar}#s/k1", f"{tar}#s/k2",
                   f"{tgz}#k4"}
  assert set(rows) == expected_rows
  assert all(rows[i]["source"] == i.split("#")[0] for i in rows)
  assert set(errors) == {f"{plain}#nothing.png", f"{plain}#garbage.png",
                         f"{truncated}#damaged-from-2", f"{tar}#s/k3"}
  assert "record 3 has no 'image/encoded'" in errors[f"{plain}#nothing.png"]["reason"]
  assert errors[f"{plain}#garbage.png"]["stage"] == "decode"
  assert "truncated at record 2" in errors[f"{truncated}#damaged-from-2"]["reason"]
  assert "no image member" in errors[f"{tar}#s/k3"]["reason"]
  assert (summary.inputs, summary.rows, summary.errors) == (13, 9, 4)
  for row in rows.values():
    assert row["mask"].shape == (48, 64)
  # 5 files matched before launch; once every shard is read the total is exact: 13.
  lines = [line for line in progress.getvalue().splitlines() if line.startswith("progress:")]
  assert lines and lines[-1].startswith("progress: 13/13 inputs, 4 errors"), lines
  assert all(re.match(r"progress: \d+/(\d+\+|13) inputs", line) for line in lines[:-1]), lines


def test_shard_records_are_skipped_by_id_on_rerun(pixel_local_model, tmp_path):
  """Rows and the errors of bad records and of a damaged tail are each skipped by id."""
  whole = open(write_tfrecord(tmp_path / "whole.tfrecord", [
      *[tf_example(shard_png(i), **{"image/id": f"r{i}"}) for i in range(4)],
      tf_example(None, **{"image/id": "no-image"}),
      tf_example(shard_png(9), **{"image/id": "lost"})]), "rb").read()
  shard = tmp_path / "a.tfrecord"
  shard.write_bytes(whole[:-50])   # the last record is cut short
  out = f"{tmp_path / 'out'}/"
  first = run_job("--input", shard, "--output", out, "--model", pixel_local_model)
  assert (first.rows, first.errors) == (4, 2)
  second = run_job("--input", shard, "--output", out, "--model", pixel_local_model,
                   "--skip_existing")
  assert (second.inputs, second.rows, second.errors, second.skipped) == (0, 0, 0, 6)


def test_repeated_key_in_a_shard_is_reported_not_doubled(pixel_local_model, tmp_path):
  shard = write_tfrecord(tmp_path / "dup.tfrecord",
                         [tf_example(shard_png(i), **{"image/id": "same"}) for i in range(2)])
  summary = run_job("--input", shard, "--output", tmp_path / "rows", "--model",
                    pixel_local_model)
  assert (summary.inputs, summary.rows, summary.errors) == (2, 1, 1)
  assert "same key" in read_errors(tmp_path / "rows-errors")[0]["reason"]
