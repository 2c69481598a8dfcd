"""Confidence and QA: probabilities or logits found at load, QA columns equal a numpy
reference, tiling does not change them, pseudo-labels and their ignore value."""
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from transforms import labels as labels_lib
from transforms.inference.confidence import (IGNORE_VALUE, LOGITS, PROBABILITIES,
                                             image_qa, pseudo_label, reference_qa,
                                             scores_kind)
from transforms.types import NODATA_CLASS

from conftest import read_rows, run_job, save_image, textured_image
from inputs import write_geotiff

QA_COLUMNS = ("mean_confidence", "mean_margin", "mean_entropy", "low_confidence_fraction")


def _png(data):
  return np.asarray(Image.open(io.BytesIO(data)))


def _scores(model_dir, image):
  """predict on the image in one piece, as float32 probabilities or logits."""
  module = tf.saved_model.load(model_dir)
  return module.predict(image.astype(np.float32)[None] / 255).numpy()[0]


def _assert_qa(row, expected, tolerance=1e-5):
  for column in QA_COLUMNS:
    assert row[column] == pytest.approx(expected[column], abs=tolerance), column
  for got, want in zip(row["class_mean_confidence"], expected["class_mean_confidence"]):
    assert (got is None) == (want is None)
    if want is not None:
      assert got == pytest.approx(want, abs=tolerance)


def test_scores_kind_tells_probabilities_from_logits():
  probabilities = np.full((4, 5, 3), 1 / 3)
  assert scores_kind(probabilities) == PROBABILITIES
  assert scores_kind(probabilities * 2) == LOGITS
  assert scores_kind(np.log(probabilities)) == LOGITS


def test_image_qa_is_exact_on_a_small_case():
  p = np.array([[[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]],
                [[0.1, 0.1, 0.8], [0.5, 0.5, 0.0]]])
  qa = reference_qa(p, None, threshold=0.6)
  assert qa["mean_confidence"] == pytest.approx((0.7 + 0.4 + 0.8 + 0.5) / 4)
  assert qa["mean_margin"] == pytest.approx((0.5 + 0.05 + 0.7 + 0.0) / 4)
  assert qa["low_confidence_fraction"] == 0.5
  entropy = [-(x * np.log(x)).sum() / np.log(3) for x in
             (np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.35, 0.25]), np.array([0.1, 0.1, 0.8]),
              np.array([0.5, 0.5]))]
  assert qa["mean_entropy"] == pytest.approx(np.mean(entropy))
  assert qa["class_mean_confidence"] == pytest.approx([(0.7 + 0.4 + 0.5) / 3, None, 0.8])
  assert image_qa(np.zeros(4), np.zeros(3), np.zeros(3), 0)["mean_confidence"] is None


def test_qa_columns_equal_the_reference_and_tiling_does_not_change_them(
    pixel_local_model, tmp_path):
  """Pixel-local model (it outputs probabilities): a tiled run, an untiled run and numpy
  on the whole image agree; nodata (alpha 0) is left out of every number."""
  rgb = textured_image(150, 210, 4)
  alpha = np.full(rgb.shape[:2], 255, np.uint8)
  alpha[:40, :70] = 0
  path = write_geotiff(tmp_path / "a.tif", rgb, alpha=alpha)
  probabilities = _scores(pixel_local_model, rgb)
  expected = reference_qa(probabilities, alpha > 0, threshold=0.4)
  rows = {}
  for tile in (64, 256):
    out = tmp_path / f"tile{tile}" / "rows"
    run_job("--input", path, "--output", out, "--model", pixel_local_model, "--tile_size",
            tile, "--tile_overlap", 0 if tile == 256 else 32, "--confidence_threshold", 0.4,
            "--outputs", "masks,confidence", "--ignore_below", 0.3)
    rows[tile] = next(iter(read_rows(out).values()))
    _assert_qa(rows[tile], expected)
    metadata = pq.read_schema(f"{out}-00000-of-00001.parquet").metadata
    assert metadata[b"hrnet_beam.scores"] == PROBABILITIES.encode()
    assert metadata[b"hrnet_beam.ignore_value"] == str(IGNORE_VALUE).encode()
  for column in QA_COLUMNS:
    assert rows[64][column] == pytest.approx(rows[256][column], abs=1e-6)
  confidence = probabilities.max(-1)
  ids = np.where(alpha > 0, probabilities.argmax(-1), NODATA_CLASS).astype(np.uint8)
  for row in rows.values():
    expected_confidence = np.where(alpha > 0, np.round(confidence * 255), 0)
    assert np.array_equal(_png(row["confidence_png"]), expected_confidence.astype(np.uint8))
    pseudo = _png(row["pseudo_label_png"])
    assert np.array_equal(pseudo, pseudo_label(ids, confidence, np.float32(0.3)))
    assert (pseudo == IGNORE_VALUE).any() and (pseudo == NODATA_CLASS).any()
    assert np.array_equal(row["mask"], ids)   # the plain mask stays as it is


def test_logits_get_a_softmax_where_the_model_runs(tiny_model, tmp_path):
  """The stand-in HRNet returns logits: one tile covering the image is the reference."""
  image = textured_image(64, 96, 7)
  path = save_image(tmp_path / "a.png", image)
  run_job("--input", path, "--output", tmp_path / "rows", "--model", tiny_model,
          "--tile_size", 128, "--tile_overlap", 0, "--outputs", "masks")
  row = next(iter(read_rows(tmp_path / "rows").values()))
  logits = _scores(tiny_model, image)   # the fit grid's one tile is the image (64 x 96)
  assert scores_kind(logits) == LOGITS
  probabilities = tf.nn.softmax(logits).numpy()
  _assert_qa(row, reference_qa(probabilities, None, threshold=0.5), tolerance=1e-4)
  assert pq.read_schema(tmp_path / "rows-00000-of-00001.parquet").metadata[
      b"hrnet_beam.scores"] == LOGITS.encode()
  assert row["confidence_png"] is None and row["pseudo_label_png"] is None


def test_the_ignore_value_is_never_nodata_nor_a_class_id_of_any_suite_model():
  names = labels_lib.model_suite()["names"]
  assert len(names) == 17
  for name in names:
    labels = labels_lib.packaged_labels(name)
    assert IGNORE_VALUE != NODATA_CLASS and IGNORE_VALUE >= labels.num_classes, name


def test_confidence_needs_masks_and_ignore_below_a_probability(pixel_local_model, tmp_path):
  from pipeline.job.config import ConfigError  # pylint: disable=import-outside-toplevel
  path = save_image(tmp_path / "a.png", textured_image(20, 20))
  common = ("--input", path, "--output", tmp_path / "rows", "--model", pixel_local_model)
  with pytest.raises(ConfigError, match="confidence comes with masks"):
    run_job(*common, "--outputs", "features,confidence")
  with pytest.raises(ConfigError, match="--ignore_below 1.5"):
    run_job(*common, "--ignore_below", 1.5)
  with pytest.raises(ConfigError, match="--ignore_below needs masks"):
    run_job(*common, "--outputs", "features", "--ignore_below", 0.5)


def test_tta_flags_parse_and_read_back():
  from transforms.augmentation import Augmentation, parse  # pylint: disable=import-outside-toplevel
  assert parse("flip") == Augmentation(True, (1.0,))
  assert parse("flip,scales=1.25,0.75") == Augmentation(True, (0.75, 1.0, 1.25))
  assert parse("scales=0.5").passes == 2 and parse("flip,scales=0.5,2").passes == 6
  for text in ("flip", "scales=0.75,1,1.25", "flip,scales=0.5,1"):
    assert parse(parse(text).describe()) == parse(text)
  for bad in ("flop", "scales=x", "scales=0", "flip,scales=9"):
    with pytest.raises(ValueError, match="--tta"):
      parse(bad)


def test_flip_tta_on_a_mirror_symmetric_input_equals_no_tta(pixel_local_model, tmp_path):
  half = textured_image(96, 64, 11)
  path = save_image(tmp_path / "sym.png", np.concatenate([half, half[:, ::-1]], axis=1))
  rows = {}
  for tta in ("none", "flip"):
    run_job("--input", path, "--output", tmp_path / tta / "rows", "--model",
            pixel_local_model, "--tile_size", 128, "--tile_overlap", 0, "--tta", tta,
            "--outputs", "masks,features,confidence")
    rows[tta] = next(iter(read_rows(tmp_path / tta / "rows").values()))
  assert rows["flip"]["augmentation"] == "flip" and rows["none"]["augmentation"] == "none"
  for column in ("mask_png", "confidence_png", "pooled_features", *QA_COLUMNS):
    assert rows["flip"][column] == rows["none"][column], column


def test_multi_scale_tta_changes_masks_and_stays_deterministic(tiny_model, tmp_path):
  path = save_image(tmp_path / "a.png", textured_image(160, 200, 12))
  rows = []
  for run in range(2):
    out = tmp_path / f"run{run}" / "rows"
    run_job("--input", path, "--output", out, "--model", tiny_model, "--tile_size", 128,
            "--tile_overlap", 32, "--tta", "flip,scales=0.75,1.25")
    rows.append(next(iter(read_rows(out).values())))
  plain = tmp_path / "plain" / "rows"
  run_job("--input", path, "--output", plain, "--model", tiny_model, "--tile_size", 128,
          "--tile_overlap", 32)
  plain_row = next(iter(read_rows(plain).values()))
  assert rows[0]["augmentation"] == "flip,scales=0.75,1,1.25"
  assert rows[0]["mask_png"] == rows[1]["mask_png"]
  assert rows[0]["pooled_features"] == rows[1]["pooled_features"]
  assert rows[0]["mean_confidence"] == rows[1]["mean_confidence"]
  assert rows[0]["mask_png"] != plain_row["mask_png"]
  # Features come from the tile as it is: the same as without augmentation.
  np.testing.assert_allclose(rows[0]["pooled_features"], plain_row["pooled_features"],
                             rtol=1e-5, atol=1e-6)


def test_confidence_is_the_second_band_of_mask_cogs_and_renders(pixel_local_model, tmp_path):
  import rasterio  # pylint: disable=import-outside-toplevel
  from pipeline.cli.render import render  # pylint: disable=import-outside-toplevel
  path = write_geotiff(tmp_path / "g.tif", textured_image(80, 120, 5))
  out = tmp_path / "rows"
  run_job("--input", path, "--output", out, "--model", pixel_local_model, "--outputs",
          "masks,confidence", "--mask_geotiff_dir", tmp_path / "cogs")
  row = next(iter(read_rows(out).values()))
  with rasterio.open(row["mask_geotiff"]) as cog:
    assert cog.count == 2 and cog.descriptions[1].startswith("confidence")
    assert np.array_equal(cog.read(1), row["mask"])
    assert np.array_equal(cog.read(2), np.minimum(_png(row["confidence_png"]), 254))
  written = render(str(out), str(tmp_path / "overlays"), confidence=True)
  picture = np.asarray(Image.open([w for w in written if w.endswith(".confidence.png")][0]))
  assert picture.shape == (80, 120, 3)
  with pytest.raises(ValueError, match="--outputs masks,confidence"):
    run_job("--input", path, "--output", tmp_path / "plain", "--model", pixel_local_model)
    render(str(tmp_path / "plain"), str(tmp_path / "o2"), confidence=True)
