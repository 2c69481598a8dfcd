"""Nothing lost, nothing doubled: bad inputs, failing batches, determinism, resume, budget."""
import glob
import io
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.standin import hrnet
from pipeline.standin.hrnet import stand_in_labels

from conftest import (NUM_CLASSES, read_errors, read_rows, run_job, save_image,
                      textured_image)
from inputs import png_declaring

MARKER = (255, 0, 255)  # a tile whose top-left pixel is exactly magenta poisons its call


@pytest.fixture(scope="module")
def faulty_model(tmp_path_factory):
  """A real SavedModel that fails on chosen inputs and runs out of memory above 2 tiles.

  Pixel-local outputs; a call raises InvalidArgumentError when any tile's top-left
  pixel is MARKER, and a genuine ResourceExhaustedError (a 4 TB allocation) when it
  holds more than 2 tiles.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  weights = tf.Variable(rng.normal(0, 4, (3, NUM_CLASSES)).astype(np.float32))
  feature_weights = tf.Variable(rng.normal(0, 1, (3, 24)).astype(np.float32))
  marker = tf.constant([c / 255 for c in MARKER], tf.float32)

  def predict_and_features(images):
    poisoned = tf.reduce_any(tf.reduce_all(tf.abs(images[:, 0, 0, :] - marker) < 1e-6, -1))
    check = tf.debugging.Assert(tf.logical_not(poisoned), ["poisoned tile"])
    count = tf.shape(images, out_type=tf.int64)[0]
    huge = tf.cond(count > 2,
                   lambda: tf.reduce_sum(tf.random.uniform(tf.stack([count * 2**40]))),
                   lambda: tf.constant(0.0))
    with tf.control_dependencies([check]):
      logits = tf.einsum("bhwc,ck->bhwk", images, weights) + 0.0 * huge
      features = tf.einsum("bhwc,ck->bhwk", images[:, ::4, ::4, :], feature_weights)
    return logits, features

  path = str(tmp_path_factory.mktemp("models") / "faulty")
  hrnet.export_saved_model(predict_and_features, [weights, feature_weights], path,
                           labels=stand_in_labels(NUM_CLASSES))
  return path


def _poisoned(height, width, seed, at=(0, 0)):
  image = textured_image(height, width, seed)
  image[at] = MARKER
  return image


def test_failing_tiles_are_isolated_and_their_images_reported(faulty_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  good = [save_image(images / f"good{i}.png", textured_image(64, 64, i)) for i in range(5)]
  bad_single = save_image(images / "bad_single.png", _poisoned(64, 64, 9))
  # Two tiles side by side; only the second (origin x=64) is poisoned.
  bad_second_tile = save_image(images / "bad_second_tile.png", _poisoned(64, 128, 8, (0, 64)))
  summary = run_job("--input", images / "*.png", "--output", tmp_path / "out" / "rows",
                    "--model", faulty_model, "--tile_size", 64, "--tile_overlap", 0,
                    "--batch_size", 8, "--model_batch_size", 2)
  rows, errors = read_rows(tmp_path / "out" / "rows"), read_errors(
      tmp_path / "out" / "rows-errors")
  assert sorted(rows) == sorted(good)
  by_source = {e["source"]: e for e in errors}
  assert sorted(by_source) == sorted([bad_single, bad_second_tile])
  assert all(e["stage"] == "inference" and "poisoned tile" in e["reason"] for e in errors)
  assert "1 of 2 tiles failed" in by_source[bad_second_tile]["reason"]
  assert summary.metrics["tiles_failed"] == 2


def test_out_of_memory_halves_the_call_size_once_and_keeps_it(faulty_model, tmp_path):
  for i in range(8):
    save_image(tmp_path / f"{i}.png", textured_image(64, 64, i))
  summary = run_job("--input", tmp_path / "*.png", "--output", tmp_path / "out" / "rows",
                    "--model", faulty_model, "--tile_size", 64, "--tile_overlap", 0,
                    "--batch_size", 8, "--model_batch_size", 4)
  assert (summary.rows, summary.errors) == (8, 0)
  # 4 -> 2 after the first OOM; every later call stays at 2 and never fails again.
  assert summary.metrics["oom_backoffs"] == 1
  assert summary.metrics.get("tiles_failed", 0) == 0


def _bad_input_matrix(directory):
  """Every awkward input we know of, with its documented outcome: a row, or an error."""
  def write(name, data):
    path = directory / name
    path.write_bytes(data)
    return str(path)

  def encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()

  def tiff(array, **kwargs):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()

  photo = Image.fromarray(textured_image(80, 96, 1))
  png, jpeg = encoded(photo, "PNG"), encoded(photo, "JPEG")
  strip = bytearray(tiff(textured_image(64, 64, 2), photometric="rgb", compression="zlib"))
  strip[200:400] = b"\xff" * 200
  palette = Image.new("P", (40, 30))
  palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  frames = [Image.new("RGB", (33, 21), c) for c in ((255, 0, 0), (0, 0, 255))]
  rgb16 = textured_image(50, 70, 3).astype(np.uint16) * 257
  rgba16 = textured_image(50, 70, 4, channels=4).astype(np.uint16) * 257
  return {
      write("zero_bytes.png", b""): "error: empty file",
      write("truncated.png", png[:len(png) // 2]): "error: unreadable",
      write("truncated.jpg", jpeg[:len(jpeg) // 2]): "error: unreadable",
      write("text.jpg", b"a text file with an image extension\n"): "error: unreadable image",
      write("bomb.png", png_declaring(200_000, 200_000)): "error: --max_pixels",
      write("corrupt_strip.tif", bytes(strip)): "error: unreadable TIFF",
      write("one_pixel.png", encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")): (1, 1),
      write("aspect_3x5000.png", encoded(Image.new("RGB", (5000, 3)), "PNG")): (3, 5000),
      write("rgb16.tif", tiff(rgb16, photometric="rgb")): (50, 70),
      write("rgba16.tif", tiff(rgba16, photometric="rgb", extrasamples=["unassalpha"])):
          (50, 70),
      write("gray16.png", encoded(Image.fromarray(rgb16[:, :, 0]), "PNG")): (50, 70),
      write("float32.tif", tiff(rgb16.astype(np.float32) / 65535, photometric="rgb")):
          (50, 70),
      write("cmyk.jpg", encoded(Image.new("CMYK", (40, 24), (0, 255, 255, 0)), "JPEG")):
          (24, 40),
      write("palette_transparent.png", encoded(palette, "PNG", transparency=0)): (30, 40),
      write("multipage.tif", tiff(np.stack([textured_image(20, 30, 5)] * 3),
                                  photometric="rgb")): (20, 30),
      write("animated.gif", encoded(frames[0], "GIF", save_all=True,
                                    append_images=frames[1:])): (21, 33),
  }


def test_bad_input_matrix_every_input_lands_in_exactly_one_output(pixel_local_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  expected = _bad_input_matrix(images)
  summary = run_job("--input", images / "*", "--output", tmp_path / "out" / "rows",
                    "--model", pixel_local_model, "--max_pixels", 10_000_000)
  rows = read_rows(tmp_path / "out" / "rows")
  errors = {e["source"]: e for e in read_errors(tmp_path / "out" / "rows-errors")}
  assert not set(rows) & set(errors)
  assert sorted(list(rows) + list(errors)) == sorted(expected)
  for source, outcome in expected.items():
    if isinstance(outcome, tuple):
      assert source in rows, (source, errors.get(source))
      assert rows[source]["mask"].shape == outcome
      assert sum(rows[source]["class_counts"]) == outcome[0] * outcome[1]
    else:
      assert source in errors, source
      assert errors[source]["stage"] == "decode"
      assert outcome.removeprefix("error: ") in errors[source]["reason"], errors[source]
  assert (summary.inputs, summary.rows, summary.errors) == (len(expected), len(rows),
                                                            len(errors))


def test_rows_are_identical_across_runs_batch_sizes_and_worker_counts(tiny_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  for i, (height, width) in enumerate([(300, 260), (200, 420), (96, 96), (257, 129)]):
    save_image(images / f"{i}.png", textured_image(height, width, 30 + i))
  common = ["--input", images / "*.png", "--model", tiny_model, "--tile_size", 128,
            "--tile_overlap", 32]
  variants = {
      "batch1": ["--batch_size", 1],
      "batch5": ["--batch_size", 5],
      "batch5_again": ["--batch_size", 5],
      "batch3_two_processes": ["--batch_size", 3, "--direct_num_workers", 2,
                               "--direct_running_mode", "multi_processing"],
  }
  results = {}
  for name, flags in variants.items():
    run_job(*common, "--output", tmp_path / name / "rows", *flags)
    results[name] = read_rows(tmp_path / name / "rows")
  reference = results.pop("batch1")
  assert len(reference) == 4
  for name, rows in results.items():
    assert sorted(rows) == sorted(reference), name
    for image_id, row in rows.items():
      assert row["mask_png"] == reference[image_id]["mask_png"], (name, image_id)
      assert row["class_counts"] == reference[image_id]["class_counts"]
      assert row["pooled_features"] == reference[image_id]["pooled_features"], (name, image_id)
      for column in ("mean_confidence", "mean_margin", "mean_entropy",
                     "low_confidence_fraction", "class_mean_confidence"):
        assert row[column] == reference[image_id][column], (name, image_id, column)


def test_rerun_with_skip_existing_completes_the_set_exactly_once(pixel_local_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  for i in range(7):
    save_image(images / f"{i}.png", textured_image(40, 50, i))
  (images / "9_broken.png").write_bytes(b"broken")
  out = f"{tmp_path / 'out'}/"
  first = run_job("--input", images / "[0-2].png", "--output", out, "--model",
                  pixel_local_model, "--run_id", "first")
  assert (first.rows, first.skipped) == (3, 0)
  second = run_job("--input", images / "*.png", "--output", out, "--model",
                   pixel_local_model, "--skip_existing", "--run_id", "second")
  assert (second.rows, second.errors, second.skipped) == (4, 1, 3)
  files = sorted(os.path.basename(f) for f in glob.glob(f"{out}segmentations-*.parquet"))
  assert files == ["segmentations-first-00000-of-00001.parquet",
                   "segmentations-second-00000-of-00001.parquet"]
  union = read_rows(f"{out}segmentations")  # asserts each image_id appears once
  assert sorted(union) == sorted(str(images / f"{i}.png") for i in range(7))
  # The broken file's error is recorded once: a rerun skips it like the rows...
  third = run_job("--input", images / "*.png", "--output", out, "--model",
                  pixel_local_model, "--skip_existing")
  assert (third.rows, third.errors, third.skipped) == (0, 0, 8)
  # ...unless asked to try failed inputs again.
  fourth = run_job("--input", images / "*.png", "--output", out, "--model",
                   pixel_local_model, "--skip_existing", "--retry_errors")
  assert (fourth.rows, fourth.errors, fourth.skipped) == (0, 1, 7)


def test_skip_existing_needs_an_output_directory(pixel_local_model, tmp_path):
  from pipeline.job.config import ConfigError  # pylint: disable=import-outside-toplevel
  save_image(tmp_path / "a.png", textured_image(10, 10))
  with pytest.raises(ConfigError, match="--skip_existing needs --output to be a directory"):
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "rows", "--model",
            pixel_local_model, "--skip_existing")


def test_error_budget_stops_the_job_early_and_no_parquet_becomes_visible(
    pixel_local_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  for i in range(5):
    save_image(images / f"good{i}.png", textured_image(40, 40, i))
  for i in range(60):
    (images / f"junk{i:02d}.png").write_text("not an image")
  summary = run_job("--input", images / "*", "--output", tmp_path / "out" / "rows",
                    "--model", pixel_local_model, "--max_error_fraction", 0.5)
  assert summary.state == "failed" and summary.exit_status == 3
  assert "max_error_fraction=0.5" in summary.failure
  # The job stopped before Beam's sinks finalized: no Parquet file under the prefix.
  assert glob.glob(str(tmp_path / "out" / "rows-*.parquet")) == []


def test_error_budget_checked_exactly_at_the_end(pixel_local_model, tmp_path):
  for i in range(3):
    save_image(tmp_path / f"good{i}.png", textured_image(40, 40, i))
  (tmp_path / "junk.png").write_text("not an image")
  over = run_job("--input", tmp_path / "*.png", "--output", tmp_path / "a" / "rows",
                 "--model", pixel_local_model, "--max_error_fraction", 0.2)
  assert (over.state, over.exit_status) == ("failed", 3)
  assert "1 of 4 inputs failed (25.0%)" in over.failure
  within = run_job("--input", tmp_path / "*.png", "--output", tmp_path / "b" / "rows",
                   "--model", pixel_local_model, "--max_error_fraction", 0.3)
  assert (within.state, within.exit_status, within.rows) == ("done", 0, 3)
