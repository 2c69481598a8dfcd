"""Shards: TFRecord (plain, gzip) and WebDataset tar (plain, gzip), written here, read by the job."""
import gzip
import io
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from transforms.shards import ShardError, tar_samples, tfrecord_payloads

from conftest import read_errors, read_rows, run_job, textured_image


def _png(seed, height=48, width=64):
  buffer = io.BytesIO()
  Image.fromarray(textured_image(height, width, seed)).save(buffer, format="PNG")
  return buffer.getvalue()


def _example(image=None, **ids):
  feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
             for k, v in ids.items()}
  if image is not None:
    feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path, records, compress=False):
  options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
  with tf.io.TFRecordWriter(str(path), options) as writer:
    for record in records:
      writer.write(record)
  return str(path)


def write_tar(path, members, compress=False):
  with tarfile.open(str(path), "w:gz" if compress else "w") as archive:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return str(path)


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
      _example(_png(1), **{"image/filename": "one.png"}),
      _example(_png(2), **{"image/id": "two"}),
      _example(_png(3)),                                   # no id: its index, 2
      _example(None, **{"image/filename": "nothing.png"}),  # missing image key
      _example(b"not an image", **{"image/filename": "garbage.png"}),
  ])
  gz = write_tfrecord(shards / "zipped.tfrecord.gz", [_example(_png(4), **{"image/id": "z"})],
                      compress=True)
  whole = open(write_tfrecord(tmp_path / "t.tfrecord",
                              [_example(_png(5 + i), **{"image/id": f"t{i}"})
                               for i in range(3)]), "rb").read()
  truncated = shards / "truncated.tfrecord"
  truncated.write_bytes(whole[:len(whole) - 100])
  tar = write_tar(shards / "web.tar", [("s/k1.png", _png(9)), ("s/k1.cls", b"3"),
                                       ("s/k2.jpg", _png(10)), ("s/k3.txt", b"no image")])
  tgz = write_tar(shards / "web.tar.gz", [("k4.png", _png(11))], compress=True)
  summary = run_job("--input", shards / "*", "--output", tmp_path / "out" / "rows",
                    "--model", pixel_local_model)
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


def test_shard_records_are_skipped_by_id_on_rerun(pixel_local_model, tmp_path):
  shard = write_tfrecord(tmp_path / "a.tfrecord",
                         [_example(_png(i), **{"image/id": f"r{i}"}) for i in range(4)])
  out = f"{tmp_path / 'out'}/"
  first = run_job("--input", shard, "--output", out, "--model", pixel_local_model)
  assert first.rows == 4
  second = run_job("--input", shard, "--output", out, "--model", pixel_local_model,
                   "--skip_existing")
  assert (second.rows, second.skipped) == (0, 4)


def test_repeated_key_in_a_shard_is_reported_not_doubled(pixel_local_model, tmp_path):
  shard = write_tfrecord(tmp_path / "dup.tfrecord",
                         [_example(_png(i), **{"image/id": "same"}) for i in range(2)])
  summary = run_job("--input", shard, "--output", tmp_path / "rows", "--model",
                    pixel_local_model)
  assert (summary.inputs, summary.rows, summary.errors) == (2, 1, 1)
  assert "same key" in read_errors(tmp_path / "rows-errors")[0]["reason"]
