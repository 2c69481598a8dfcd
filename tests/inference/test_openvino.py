"""The OpenVINO engine: hrnet-beam optimize, then the job on the IR, against TensorFlow."""
import json
import logging
import os
import subprocess
import sys

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
  # Where this CPU lacks bfloat16, the report measured what runs here, and says so.
  assert ("ran at float32 here: this CPU lacks bfloat16" in done.stdout) == (
      precision == "float32")
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


@pytest.mark.parametrize("kind", ["probabilities", "logits"])
def test_post_processing_graph_reproduces_the_qa_definition(kind):
  """OpenVINO's post-processing and the numpy sums after it give what confidence.py
  defines from probabilities: argmax (first of ties), the QA sums, confidence and
  pseudo-label maps; pooling by cell and patch weights equals the float64 sums."""
  import openvino as ov  # pylint: disable=import-outside-toplevel
  from transforms.inference.confidence import (IGNORE_VALUE, reference_qa,  # pylint: disable=import-outside-toplevel
                                               tile_summaries)
  from transforms.inference.openvino_engine import (compile_config,  # pylint: disable=import-outside-toplevel
                                                    post_processing_model)
  rng = np.random.default_rng(3)
  classes, features_dim, batch, height, width = 5, 12, 2, 32, 48
  logits = rng.normal(0, 2, (batch, height, width, classes)).astype(np.float32)
  logits[0, :4, :4, 1:3] = 9.0   # exact ties for the top: argmax takes the first
  logits[1, :3, :3] = [150.0, 0, -50.0, 0, 0][:classes]   # the others' exp underflows to 0
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities = (probabilities / probabilities.sum(-1, keepdims=True)).astype(np.float32)
  scores = probabilities if kind == "probabilities" else logits
  features = rng.normal(size=(batch, height // 4, width // 4, features_dim)).astype(np.float32)
  cell_weights = rng.random((batch, height // 4, width // 4)).astype(np.float32)
  patch_weights = rng.random((batch, 3, height // 4, width // 4)).astype(np.float32)
  pixel_weights = (rng.random((batch, height, width)) > 0.2).astype(np.float32)
  compiled = ov.Core().compile_model(
      post_processing_model(classes, features_dim, kind, True), "CPU",
      compile_config("float32"))   # as the engine compiles it: float32 on any CPU
  out = compiled({"features": features, "cell_weights": cell_weights,
                  "patch_weights": patch_weights, "scores": scores})
  out = {name: out[compiled.output(name)] for name in ("pooled", "patches", "class_ids",
                                                       "stats")}
  np.testing.assert_array_equal(out["class_ids"], probabilities.argmax(-1))
  np.testing.assert_allclose(out["pooled"], np.einsum(
      "bhw,bhwf->bf", cell_weights.astype(np.float64), features), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["patches"], np.einsum(
      "bshw,bhwf->bsf", patch_weights.astype(np.float64), features), rtol=1e-5, atol=1e-5)
  confidence, pseudo, qa, class_confidence = tile_summaries(
      out["class_ids"], out["stats"], pixel_weights, classes, 0.5, 0.4, True)
  for b in range(batch):
    expected = reference_qa(probabilities[b], pixel_weights[b] > 0, 0.5)
    counted = pixel_weights[b].sum()
    for i, name in enumerate(("mean_confidence", "mean_margin", "mean_entropy",
                              "low_confidence_fraction")):
      assert qa[b, i] / counted == pytest.approx(expected[name], abs=1e-5), name
    counts = np.bincount(probabilities[b].argmax(-1)[pixel_weights[b] > 0],
                         minlength=classes)
    np.testing.assert_allclose(class_confidence[b] / np.maximum(counts, 1), [
        0 if c is None else c for c in expected["class_mean_confidence"]], atol=1e-5)
  top = probabilities.max(-1)
  assert np.abs(confidence.astype(int) - np.round(top * 255)).max() <= 1
  np.testing.assert_array_equal(pseudo == IGNORE_VALUE, top < np.float32(0.4))


def test_openvino_engine_matches_tensorflow_post_processing_on_the_same_ir(optimized):
  """The TensorFlow-free engine against the TensorFlow engine's post-processing around the
  same compiled IR (the path --tta takes): same class ids and pseudo-labels, QA sums and
  pooled features equal to float32 rounding."""
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  model = load_hrnet(str(optimized[0] / "int8"))
  assert type(model).__name__ == "OpenVinoHRNet"
  rng = np.random.default_rng(5)
  images = rng.random((2, TILE, TILE, 3)).astype(np.float32)
  cells = (TILE // 4, TILE // 4)
  cell_weights = (rng.random((2, *cells)) > 0.3).astype(np.float32)
  pixel_weights = np.ones((2, TILE, TILE), np.float32)
  pixel_weights[1, :, :40] = 0
  patch_weights = rng.random((2, 4, *cells)).astype(np.float32)
  args = (images, True, True, cell_weights, pixel_weights, 0.5, 0.3)
  ours = model.infer_tiles(*args, patch_weights=patch_weights)
  reference = model._tensorflow_engine().infer_tiles(  # pylint: disable=protected-access
      *args, patch_weights=patch_weights)
  np.testing.assert_array_equal(ours.class_ids, reference.class_ids)
  np.testing.assert_array_equal(ours.pseudo_labels, reference.pseudo_labels)
  assert np.abs(ours.confidence.astype(int) - reference.confidence).max() <= 1
  np.testing.assert_allclose(ours.qa_sums, reference.qa_sums, rtol=1e-5)
  np.testing.assert_allclose(ours.class_confidence_sums, reference.class_confidence_sums,
                             rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(ours.features, reference.features, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ours.patch_features, reference.patch_features, rtol=1e-4,
                             atol=1e-3)
  only_features = model.infer_tiles(images, False, True, cell_weights, pixel_weights)
  assert only_features.class_ids is None
  np.testing.assert_allclose(only_features.features, ours.features, rtol=1e-5, atol=1e-4)


class _CountingRequest:
  """An OpenVINO infer request that counts the inferences it starts."""

  def __init__(self, request):
    self._request, self.started = request, 0

  def start_async(self, *args, **kwargs):
    self.started += 1
    return self._request.start_async(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._request, name)


def test_a_tile_on_the_streams_does_not_depend_on_its_call(optimized):
  """Each tile of a call runs on its own OpenVINO stream: its outputs are the same bytes
  whatever else is in the call, in what order, in calls of 2 or 4 (more than the
  streams); a padded slot (all its weights zero) is not run."""
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  model = load_hrnet(str(optimized[0] / "int8"))
  rng = np.random.default_rng(8)
  tiles = rng.random((3, TILE, TILE, 3)).astype(np.float32)
  cells = (TILE // 4, TILE // 4)

  def call(order):
    images = np.zeros((len(order), TILE, TILE, 3), np.float32)
    cell_weights = np.zeros((len(order), *cells), np.float32)
    pixel_weights = np.zeros((len(order), TILE, TILE), np.float32)
    for slot, i in enumerate(order):
      if i is not None:
        images[slot], cell_weights[slot], pixel_weights[slot] = tiles[i], 1, 1
    out = model.infer_tiles(images, True, True, cell_weights, pixel_weights, 0.5, 0.3)
    return {i: (out.class_ids[slot], out.features[slot], out.qa_sums[slot],
                out.class_confidence_sums[slot], out.pseudo_labels[slot])
            for slot, i in enumerate(order) if i is not None}

  first = call([0, 1])
  requests = model._compiled[("backbone", True, True, None)]  # pylint: disable=protected-access
  counting = [_CountingRequest(r) for r in requests]
  requests[:] = counting
  padded = call([0, None])
  assert sum(r.started for r in counting) == 1
  for other in (call([1, 0]), padded, call([2, 0, 1, 0])):
    for i, values in other.items():
      if i in first:
        for ours, theirs in zip(values, first[i]):
          np.testing.assert_array_equal(ours, theirs)
  assert not np.array_equal(first[0][1], first[1][1])   # the tiles themselves differ


def test_a_job_on_an_optimized_model_never_imports_tensorflow(optimized, images, tmp_path):
  """Start-up on the OpenVINO engine: the launcher's check and the worker load no
  TensorFlow (seconds of import per worker process); --tta still works, through it."""
  code = ("import sys; from pipeline.job import run; "
          "summary = run(sys.argv[1:]); assert summary.rows == 4, summary; "
          "print('TENSORFLOW', 'tensorflow' in sys.modules)")
  common = ["--input", str(images / "*.png"), "--model", str(optimized[0] / "int8"),
            "--tile_size", str(TILE), "--tile_overlap", str(OVERLAP), "--patch_output",
            str(tmp_path / "patches"), "--patch_size", "64"]
  for tta, imported in (("none", False), ("flip", True)):
    done = subprocess.run([sys.executable, "-c", code, *common, "--output",
                           str(tmp_path / tta / "rows"), "--tta", tta],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"TENSORFLOW {imported}" in done.stdout
    rows = read_rows(tmp_path / tta / "rows")
    assert {r["engine"] for r in rows.values()} == {"openvino"}
    assert {r["augmentation"] for r in rows.values()} == {tta}


def test_an_optimized_model_asked_for_a_gpu_stops_with_the_fix(optimized, images, tmp_path):
  with pytest.raises(Exception, match="runs on the CPU .*drop --require_gpu"):
    run_job("--input", images / "0.png", "--output", tmp_path / "rows", "--model",
            optimized[0] / "int8", "--tile_size", TILE, "--require_gpu")


@pytest.fixture(scope="module")
def static_int8(tiny_model, images, tmp_path_factory):
  """The tiny stand-in as int8 IR optimized with static shapes."""
  out = tmp_path_factory.mktemp("static")
  report = optimize(tiny_model, "int8", [str(images / "*.png")], str(out / "int8"),
                    TILE, OVERLAP, calibration_tiles=8, holdout_tiles=4, static_shapes=True)
  return out / "int8", report


def test_static_shapes_compile_per_tile_shape_once_per_machine_and_rows_repeat(
    static_int8, optimized, images, tmp_path):
  model, report = static_int8
  assert read_manifest(str(model))["shapes"] == "static per tile shape"
  assert read_manifest(str(optimized[0] / "int8"))["shapes"] == "dynamic"
  assert report["pixel_agreement"] > 0.7 and report["feature_cosine_mean"] > 0.99
  cache = tmp_path / "cache"
  first = _run(str(model), images, tmp_path / "a" / "rows", "--model_cache_dir", cache)
  blobs = sorted(os.listdir(cache / "openvino-blobs"))
  # The four images' grid gives tiles of several shapes: a blob for each compiled variant.
  assert len(blobs) >= 3
  again = _run(str(model), images, tmp_path / "b" / "rows", "--model_cache_dir", cache,
               "--direct_num_workers", 2, "--direct_running_mode", "multi_processing")
  assert sorted(os.listdir(cache / "openvino-blobs")) == blobs   # read back, none added
  dynamic = _run(str(optimized[0] / "int8"), images, tmp_path / "d" / "rows")
  for image_id, row in first.items():
    for column in ("mask_png", "pooled_features", "class_counts", "mean_confidence"):
      assert row[column] == again[image_id][column], column
    assert np.mean(row["mask"] == dynamic[image_id]["mask"]) > 0.9
  metadata = pq.read_schema(next((tmp_path / "a").glob("rows-*.parquet"))).metadata
  manifest = json.loads(metadata[b"hrnet_beam.optimized_model_manifest"])
  assert manifest["shapes"] == "static per tile shape"


def test_static_shapes_keep_the_most_recent_compilations(static_int8, tmp_path, monkeypatch):
  from transforms.inference import openvino_engine  # pylint: disable=import-outside-toplevel
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(openvino_engine, "MAX_STATIC_VARIANTS", 2)
  model = load_hrnet(str(static_int8[0]), str(tmp_path / "cache"))
  rng = np.random.default_rng(4)
  sides = [(64, 96), (96, 64), (128, 128)]
  tiles = {side: rng.random((1, *side, 3)).astype(np.float32) for side in sides}
  before = {side: model.run(tiles[side]) for side in sides}
  assert model.compiled_shapes == [(96, 64), (128, 128)]     # (64, 96) compiled first, out
  for side in sides:     # compiled again (from the cache) where evicted: the same outputs
    for ours, theirs in zip(model.run(tiles[side]), before[side]):
      np.testing.assert_array_equal(ours, theirs)
    assert len(model.compiled_shapes) <= 2


def test_a_cache_that_cannot_be_written_costs_time_not_the_job(optimized, tmp_path, caplog):
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  with caplog.at_level(logging.WARNING):
    model = load_hrnet(str(optimized[0] / "float32"), str(blocker / "cache"))
  assert model.blob_cache is None and "cannot be written" in caplog.text
  scores, _ = model.run(np.zeros((1, 64, 64, 3), np.float32))
  assert scores.shape == (1, 64, 64, 7)
