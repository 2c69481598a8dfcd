"""The OpenVINO engine: hrnet-beam optimize, then the job on the IR, against TensorFlow."""
import json
import logging
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import hrnet_beam, read_rows, run_job, save_image, textured_image
from pipeline.cli.optimize import optimize
from pipeline.job.config import ConfigError
from transforms.inference.openvino_engine import (MANIFEST, effective_precision,
                                                  read_manifest)
from transforms.inference.precision import PrecisionUnsupportedError

TILE, OVERLAP = 128, 32


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  directory = tmp_path_factory.mktemp("ov_images")
  for i, (height, width) in enumerate([(200, 260), (256, 256), (150, 330), (300, 200)]):
    save_image(directory / f"{i}.png", textured_image(height, width, seed=40 + i))
  return directory


@pytest.fixture(scope="module")
def optimized(tiny_model, images, tmp_path_factory):
  """The tiny stand-in as float32 and int8 IR."""
  out = tmp_path_factory.mktemp("optimized")
  reports = {}
  for precision in ("float32", "int8"):
    reports[precision] = optimize(tiny_model, precision, [str(images / "*.png")],
                                  str(out / precision), TILE, OVERLAP, calibration_tiles=8,
                                  holdout_tiles=4)
  return out, reports


def _run(model, images, out, *flags):
  summary = run_job("--input", images / "*.png", "--output", out, "--model", model,
                    "--tile_size", TILE, "--tile_overlap", OVERLAP, *flags)
  assert summary.errors == 0 and summary.rows == 4
  return read_rows(out)


def test_optimize_writes_ir_manifest_labels_and_a_held_out_report(optimized, tiny_model,
                                                                  images):
  out, reports = optimized
  for precision, report in reports.items():
    files = set(os.listdir(out / precision))
    assert {"model.xml", "model.bin", MANIFEST, "labels.json", "agreement.json"} <= files
    manifest = read_manifest(str(out / precision))
    assert manifest["precision"] == precision and manifest["source_model"] == tiny_model
    assert len(manifest["source_sha256"]) == 64 and manifest["versions"]["openvino"]
    assert (manifest["num_classes"], manifest["feature_dim"]) == (7, 120)
    assert report["held_out_tiles"] == 4 and report["engine"] == "openvino"
    assert report["precision"] == precision and set(report["iou_per_class"]) == set(
        json.loads((out / precision / "labels.json").read_text())["classes"][i]["name"]
        for i in range(7))
  int8 = read_manifest(str(out / "int8"))
  assert int8["calibration"]["tiles"] == 8 and int8["calibration"]["patterns"] == [
      str(images / "*.png")]
  assert int8["kept_in_float"] and "nncf" in int8["versions"]
  assert read_manifest(str(out / "float32"))["calibration"] is None
  # float32 IR is TensorFlow float32 up to rounding; int8 strays, but little.
  assert reports["float32"]["pixel_agreement"] > 0.999
  assert reports["float32"]["feature_cosine_min"] > 0.99999
  assert reports["int8"]["pixel_agreement"] > 0.7    # random weights: many near-ties
  assert reports["int8"]["feature_cosine_mean"] > 0.99


def test_job_on_the_ir_matches_tensorflow_and_records_the_engine(optimized, tiny_model,
                                                                 images, tmp_path):
  out, _ = optimized
  reference = _run(tiny_model, images, tmp_path / "tf" / "rows")
  rows = _run(str(out / "float32"), images, tmp_path / "ov" / "rows")
  for image_id, row in rows.items():
    twin = reference[image_id]
    assert (row["engine"], row["precision"]) == ("openvino", "float32")
    assert twin["engine"] == "tensorflow"
    assert np.mean(row["mask"] == twin["mask"]) > 0.999
    np.testing.assert_allclose(row["pooled_features"], twin["pooled_features"], rtol=1e-3,
                               atol=1e-4)
    assert row["mean_confidence"] == pytest.approx(twin["mean_confidence"], abs=1e-4)
  metadata = pq.read_schema(next((tmp_path / "ov").glob("rows-*.parquet"))).metadata
  assert metadata[b"hrnet_beam.engine"] == b"openvino"
  assert metadata[b"hrnet_beam.model_batch_size"] == b"2"   # the optimized default
  manifest = json.loads(metadata[b"hrnet_beam.optimized_model_manifest"])
  assert manifest["source_model"] == tiny_model and manifest["precision"] == "float32"


def test_int8_rows_are_deterministic_across_runs_batches_and_workers(optimized, images,
                                                                      tmp_path):
  model = str(optimized[0] / "int8")
  first = _run(model, images, tmp_path / "a" / "rows", "--batch_size", 1)
  second = _run(model, images, tmp_path / "b" / "rows", "--batch_size", 4,
                "--direct_num_workers", 2, "--direct_running_mode", "multi_processing")
  for image_id, row in first.items():
    assert row["precision"] == "int8"
    assert row["mask_png"] == second[image_id]["mask_png"]
    assert row["pooled_features"] == second[image_id]["pooled_features"]
    assert row["class_counts"] == second[image_id]["class_counts"]


def test_pixel_local_ir_is_exact_across_tilings(pixel_local_model, images, tmp_path):
  """Tiles of every shape the grid picks give the untiled answer, as with TensorFlow."""
  optimize(pixel_local_model, "float32", [str(images / "*.png")], str(tmp_path / "pl"),
           TILE, OVERLAP, holdout_tiles=2)
  tiled = _run(str(tmp_path / "pl"), images, tmp_path / "t" / "rows")
  whole = _run(str(tmp_path / "pl"), images, tmp_path / "w" / "rows", "--tile_size", 512)
  for image_id, row in tiled.items():
    assert row["mask_png"] == whole[image_id]["mask_png"]
    np.testing.assert_allclose(row["pooled_features"], whole[image_id]["pooled_features"],
                               rtol=1e-5, atol=1e-6)


def test_an_ir_that_does_not_fit_fails_before_launch(optimized, tiny_model, images, tmp_path):
  out, _ = optimized
  common = ["--input", images / "0.png", "--output", tmp_path / "o", "--tile_size", TILE,
            "--tile_overlap", OVERLAP]
  with pytest.raises(ConfigError, match="drop --precision bfloat16"):
    run_job(*common, "--model", out / "float32", "--precision", "bfloat16")
  labels = tmp_path / "labels.json"
  labels.write_text(json.dumps({"classes": [{"name": "a", "color": [1, 2, 3]}]}))
  with pytest.raises(ConfigError, match="name 1 classes but model .* outputs 7"):
    run_job(*common, "--model", out / "float32", "--labels_file", labels)
  # A fixed-size IR (made here by reshaping the converted model) serves one tile size.
  import openvino as ov  # pylint: disable=import-outside-toplevel
  fixed = tmp_path / "fixed"
  fixed.mkdir()
  model = ov.Core().read_model(str(out / "float32" / "model.xml"))
  model.reshape([1, TILE, TILE, 3])
  ov.save_model(model, str(fixed / "model.xml"), compress_to_fp16=False)
  for name in (MANIFEST, "labels.json"):
    (fixed / name).write_bytes((out / "float32" / name).read_bytes())
  with pytest.raises(ConfigError, match=f"takes only {TILE}x{TILE} inputs"):
    run_job(*common, "--model", fixed)
  summary = run_job(*common, "--model", fixed, "--tile_grid", "fixed")
  assert summary.rows == 1


def test_bfloat16_falls_back_where_the_cpu_lacks_it(caplog):
  assert effective_precision("bfloat16", "float32", frozenset({"avx512_bf16"})) == "bfloat16"
  with caplog.at_level(logging.WARNING):
    assert effective_precision("bfloat16", "float32", frozenset({"avx2"})) == "float32"
  assert "neither AVX512-BF16 nor AMX" in caplog.text
  with pytest.raises(PrecisionUnsupportedError, match="--precision_fallback float32"):
    effective_precision("bfloat16", "fail", frozenset({"avx2"}))
  assert effective_precision("int8", "fail", frozenset()) == "int8"


def test_optimize_command_to_gcs_and_the_job_from_there(tiny_model, images, bucket, tmp_path):
  done = subprocess.run(hrnet_beam("optimize", "--model", tiny_model, "--precision",
                                   "bfloat16", "--calibration", images / "*.png", "--to",
                                   f"{bucket}/opt/bf16", "--tile_size", TILE,
                                   "--holdout_tiles", 2), capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "OpenVINO bfloat16 vs TensorFlow float32 on 2 tiles" in done.stdout
  rows = _run(f"{bucket}/opt/bf16", images, tmp_path / "rows")
  precision = "bfloat16" if effective_precision("bfloat16", "float32") == "bfloat16" \
      else "float32"
  assert {r["precision"] for r in rows.values()} == {precision}
  done = subprocess.run(hrnet_beam("optimize", "--model", tiny_model, "--precision", "int8",
                                   "--calibration", images / "0.png", "--to", tmp_path / "x",
                                   "--tile_size", TILE), capture_output=True, text=True,
                        check=False)
  assert done.returncode == 2 and "lower --calibration_tiles" in done.stderr


def test_optimize_converts_the_head_found_in_a_hub_style_model(tiny_model_unfused, images,
                                                                tmp_path):
  """Models with only predict and get_features (as on TF Hub) convert as one pass too:
  get_features and the head found among their variables."""
  report = optimize(tiny_model_unfused, "float32", [str(images / "*.png")],
                    str(tmp_path / "unfused"), TILE, OVERLAP, holdout_tiles=2)
  manifest = read_manifest(str(tmp_path / "unfused"))
  assert manifest["one_pass"] != "two passes" and "head" in manifest["one_pass"]
  assert report["pixel_agreement"] > 0.999 and report["feature_cosine_min"] > 0.99999
