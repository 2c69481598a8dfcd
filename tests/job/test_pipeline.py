"""The whole job on the local runner: real files in, real Parquet and JSON lines out."""
import contextlib
import io
import json
from pathlib import Path
import re
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tifffile
from PIL import Image

from pipeline.job.config import ConfigError
from transforms.reading.decode import decode_image

from conftest import (REPO_ROOT, NUM_CLASSES, TINY_WIDTH, read_errors, read_rows, run_job,
                      save_image, textured_image)
from inputs import png_declaring


@pytest.fixture(scope="module")
def mixed_run(tiny_model, tmp_path_factory):
  """One job over good images of every kind and broken files of every kind."""
  root = tmp_path_factory.mktemp("mixed")
  images = root / "images"
  images.mkdir()
  good = {
      "a.png": save_image(images / "a.png", textured_image(300, 400, 1)),
      "b.jpg": save_image(images / "b.jpg", textured_image(520, 700, 2), quality=92),
      "d.png": save_image(images / "d.png", textured_image(64, 64, 4, channels=1)[:, :, 0]),
      "tiny.png": save_image(images / "tiny.png", textured_image(1, 1, 5)),
  }
  rgb16 = (textured_image(130, 90, 3).astype(np.uint16) * 257)
  tifffile.imwrite(images / "c.tif", rgb16, photometric="rgb")
  good["c.tif"] = str(images / "c.tif")
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(textured_image(60, 120, 6)).save(images / "rotated.jpg",
                                                   exif=exif.tobytes())
  good["rotated.jpg"] = str(images / "rotated.jpg")
  bad = {"broken.png": "unreadable", "empty.png": "empty file",
         "notes.png": "unreadable image", "bomb.png": "--max_pixels"}
  (images / "broken.png").write_bytes(open(good["a.png"], "rb").read()[:3000])
  (images / "empty.png").write_bytes(b"")
  (images / "notes.png").write_text("not an image\n")
  (images / "bomb.png").write_bytes(png_declaring(200_000, 200_000))
  output = root / "out" / "segmentations"
  progress = io.StringIO()
  with contextlib.redirect_stderr(progress):
    # Two overlapping patterns: a.png is matched twice and must be read once.
    summary = run_job("--input", images / "*", "--input", images / "a.*", "--output", output,
                      "--model", tiny_model, "--tile_size", 256, "--tile_overlap", 64,
                      "--batch_size", 3, "--progress", "lines", "--progress_interval", 0.05)
  return dict(summary=summary, output=str(output), good=good, bad=bad, images=images,
              rows=read_rows(output), errors=read_errors(f"{output}-errors"),
              progress=progress.getvalue().splitlines(), model=tiny_model)


def test_every_input_ends_in_exactly_one_output(mixed_run):
  rows, errors = mixed_run["rows"], mixed_run["errors"]
  sources = sorted(list(rows) + [e["source"] for e in errors])
  everything = sorted(str(p) for p in mixed_run["images"].iterdir())
  assert sources == everything
  summary = mixed_run["summary"]
  assert (summary.inputs, summary.rows, summary.errors) == (len(everything), len(rows),
                                                            len(errors))
  assert sorted(rows) == sorted(mixed_run["good"].values())


def test_bad_files_are_reported_with_stage_and_reason(mixed_run):
  by_name = {os.path.basename(e["source"]): e for e in mixed_run["errors"]}
  assert set(by_name) == set(mixed_run["bad"])
  for name, reason in mixed_run["bad"].items():
    assert by_name[name]["stage"] == "decode"
    assert reason in by_name[name]["reason"]
    assert by_name[name]["image_id"] == by_name[name]["source"]


def test_rows_have_native_size_masks_counts_and_features(mixed_run):
  for source, row in mixed_run["rows"].items():
    with open(source, "rb") as f:
      height, width = decode_image(f.read(), 10**8).shape[:2]
    assert (row["height"], row["width"]) == (height, width)
    assert row["mask"].shape == (height, width) and row["mask"].dtype == np.uint8
    assert row["class_counts"] == np.bincount(row["mask"].ravel(),
                                              minlength=NUM_CLASSES).tolist()
    assert sum(row["class_counts"]) == height * width
    assert len(row["pooled_features"]) == 15 * TINY_WIDTH
    assert np.isfinite(row["pooled_features"]).all()
    assert row["image_id"] == row["source"] == source
    assert row["model"] == mixed_run["model"]
  rotated = mixed_run["rows"][mixed_run["good"]["rotated.jpg"]]
  assert (rotated["height"], rotated["width"]) == (120, 60)  # EXIF orientation applied
  big = mixed_run["rows"][mixed_run["good"]["b.jpg"]]
  assert len(np.unique(big["mask"])) >= 3  # several tiles, a model that is not degenerate


def test_file_metadata_lets_a_reader_interpret_rows(mixed_run):
  files = [f for f in os.listdir(os.path.dirname(mixed_run["output"])) if f.endswith(".parquet")]
  assert files and all(f.startswith("segmentations-") and "-of-" in f for f in files)
  schema = pq.read_schema(os.path.join(os.path.dirname(mixed_run["output"]), files[0]))
  meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
  with open(os.path.join(mixed_run["model"], "labels.json"), encoding="utf-8") as f:
    labels = json.load(f)
  assert json.loads(meta["hrnet_beam.class_names"]) == [c["name"] for c in labels["classes"]]
  assert json.loads(meta["hrnet_beam.palette"]) == [c["color"] for c in labels["classes"]]
  assert meta["hrnet_beam.model"] == mixed_run["model"]
  assert meta["hrnet_beam.feature_dim"] == str(15 * TINY_WIDTH)
  assert (meta["hrnet_beam.tile_size"], meta["hrnet_beam.tile_overlap"]) == ("256", "64")
  assert str(schema.field("height").type) == "int32"
  vector = schema.field("pooled_features")
  assert vector.type == pa.list_(pa.float32(), 15 * TINY_WIDTH) and not vector.nullable
  assert vector.metadata[b"hrnet_beam.model"].decode() == mixed_run["model"]
  assert [f.name for f in schema.field("class_fractions").type] == [
      c["name"] for c in labels["classes"]]


def test_model_loaded_once_for_the_whole_run(mixed_run):
  metrics = mixed_run["summary"].metrics
  assert metrics["load_model_latency_milli_secs.count"] == 1
  assert len(metrics["model_load_ids"]) == 1
  assert metrics["tiles"] > len(mixed_run["good"])  # several batches went through it


def test_progress_is_reported_while_working(mixed_run):
  """Plain lines (not a terminal): done of the pre-launch total, errors, tiles/s, ETA; the
  file matched by both patterns counts once."""
  lines = [m for m in mixed_run["progress"] if m.startswith("progress:")]
  total = len(list(mixed_run["images"].iterdir()))
  assert len(lines) >= 2 and "tiles/s" in lines[-1] and "ETA" in lines[-1]
  assert lines[-1].startswith(f"progress: {total}/{total} inputs, {len(mixed_run['bad'])} errors")
  assert any(not line.startswith(f"progress: {total}/") for line in lines)  # seen mid-way


def _direct_oracle(model_dir, image):
  """What the pixel-local model says for the whole image in one call, without the pipeline."""
  module = tf.saved_model.load(model_dir)
  unit = image.astype(np.float32)[None] / 255
  mask = np.argmax(module.predict(unit).numpy()[0], axis=-1).astype(np.uint8)
  cells = module.get_features(unit).numpy()[0].astype(np.float64)
  per_pixel = np.repeat(np.repeat(cells, 4, 0), 4, 1)[:image.shape[0], :image.shape[1]]
  return mask, per_pixel.mean(axis=(0, 1))


def test_tiled_equals_untiled_exactly_with_a_pixel_local_model(pixel_local_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  arrays = {}
  for i, (height, width) in enumerate([(300, 250), (256, 384), (97, 513), (128, 128)]):
    arrays[save_image(images / f"im{i}.png", textured_image(height, width, 10 + i))] = (
        textured_image(height, width, 10 + i))
  runs = {}
  for name, tile, overlap in (("tiled", 128, 32), ("untiled", 1024, 0)):
    summary = run_job("--input", images / "*.png", "--output", tmp_path / name / "rows",
                      "--model", pixel_local_model, "--tile_size", tile,
                      "--tile_overlap", overlap)
    assert summary.rows == len(arrays) and summary.errors == 0
    runs[name] = read_rows(tmp_path / name / "rows")
  assert runs["tiled"][next(iter(arrays))]["image_id"]  # rows keyed by source
  for source, image in arrays.items():
    tiled, untiled = runs["tiled"][source], runs["untiled"][source]
    np.testing.assert_array_equal(tiled["mask"], untiled["mask"])
    assert tiled["class_counts"] == untiled["class_counts"]
    np.testing.assert_allclose(tiled["pooled_features"], untiled["pooled_features"], rtol=1e-6)
    mask, pooled = _direct_oracle(pixel_local_model, image)
    np.testing.assert_array_equal(tiled["mask"], mask)
    np.testing.assert_allclose(tiled["pooled_features"], pooled, rtol=1e-5)
    assert len(np.unique(mask)) >= 2


@pytest.mark.parametrize("outputs", ["masks", "features"])
def test_outputs_flag_computes_only_what_is_asked(pixel_local_model, tmp_path, outputs):
  save_image(tmp_path / "one.png", textured_image(100, 140, 3))
  summary = run_job("--input", tmp_path / "one.png", "--output", tmp_path / "out",
                    "--model", pixel_local_model, "--outputs", outputs)
  assert summary.rows == 1
  row = next(iter(read_rows(tmp_path / "out").values()))
  assert (row["mask_png"] is not None) == (outputs == "masks")
  assert (row["class_counts"] is not None) == (outputs == "masks")
  assert (row["pooled_features"] is not None) == (outputs == "features")


def _expect_config_error(match, *args):
  with pytest.raises(ConfigError, match=match):
    run_job(*args)


def test_input_pattern_that_matches_nothing_fails_before_launch(tmp_path, pixel_local_model):
  save_image(tmp_path / "ok.png", textured_image(10, 10))
  pattern = str(tmp_path / "missing" / "*.png")
  _expect_config_error(re.escape(f"--input '{pattern}' matches no file"), "--input", tmp_path / "ok.png",
                       "--input", pattern, "--output", tmp_path / "out", "--model",
                       pixel_local_model)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("flags,match", [
    (["--tile_size", "100"], "--tile_size 100: use a multiple of 32"),
    (["--tile_overlap", "512"], "--tile_overlap 512"),
    (["--tile_overlap", "10"], "--tile_overlap 10"),
    (["--outputs", "masks,probabilities"], "--outputs 'masks,probabilities'"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
])
def test_bad_flags_fail_before_launch_saying_what_to_fix(tmp_path, pixel_local_model, flags,
                                                         match):
  save_image(tmp_path / "ok.png", textured_image(10, 10))
  _expect_config_error(match, "--input", tmp_path / "ok.png", "--output", tmp_path / "out",
                       "--model", pixel_local_model, *flags)


def test_missing_required_flags(tmp_path):
  _expect_config_error("--input is required", "--output", tmp_path / "out")
  _expect_config_error("--output is required", "--input", tmp_path / "x.png")


def test_unloadable_model_fails_before_any_image_is_read(tmp_path):
  save_image(tmp_path / "ok.png", textured_image(10, 10))
  _expect_config_error(r"Cannot load model .*nowhere.*stage the model", "--input",
                       tmp_path / "ok.png", "--output", tmp_path / "out",
                       "--model", tmp_path / "nowhere")


def test_labels_that_do_not_match_the_model_fail_before_launch(tmp_path, pixel_local_model):
  save_image(tmp_path / "ok.png", textured_image(10, 10))
  labels = tmp_path / "labels.json"
  labels.write_text(json.dumps({"classes": [{"name": "a", "color": [1, 2, 3]}]}))
  _expect_config_error("name 1 classes but model .* outputs 7", "--input", tmp_path / "ok.png",
                       "--output", tmp_path / "out", "--model", pixel_local_model,
                       "--labels_file", labels)


def test_command_line_exits_2_with_the_message(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pipeline", "--input", str(tmp_path / "none*.png"),
       "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
      cwd=REPO_ROOT)
  assert result.returncode == 2
  assert "matches no file" in result.stderr and "none*.png" in result.stderr


@pytest.mark.parametrize("share,loads", [(False, 2), (True, 1)])
def test_model_loads_once_per_process_or_once_per_machine_when_shared(
    tiny_model, tmp_path, share, loads):
  for i in range(6):
    save_image(tmp_path / f"{i}.png", textured_image(200, 300, i))
  flags = ["--share_model_across_processes"] if share else []
  summary = run_job("--input", tmp_path / "*.png", "--output", tmp_path / "out" / "rows",
                    "--model", tiny_model, "--direct_num_workers", 2,
                    "--direct_running_mode", "multi_processing", *flags)
  assert (summary.rows, summary.errors) == (6, 0)
  # Beam records one load-latency sample per real load: once per worker process, or
  # once for the machine when shared; never per bundle or per DoFn instance.
  assert summary.metrics["load_model_latency_milli_secs.count"] == loads
  # The job's own count agrees, across processes (a string set of ids did not: Beam's
  # local runner kept one worker's set), and every tile is counted by the copy it ran on.
  ids = summary.metrics["model_load_ids"]
  assert len(ids) == loads
  assert sum(summary.metrics[f"tiles_by_model_copy_{i}"] for i in ids) == (
      summary.metrics["tiles_inferred"])


def test_a_shared_model_gives_the_rows_of_a_model_in_the_process(tiny_model, tmp_path):
  """Callers of a shared model send their tiles' own pixels, scaled and mapped in the
  model's process (a quarter of the bytes through the RPC): the rows are the same bytes."""
  for i, (height, width) in enumerate([(200, 300), (130, 90), (256, 256)]):
    save_image(tmp_path / f"{i}.png", textured_image(height, width, i))
  common = ["--input", tmp_path / "*.png", "--model", tiny_model, "--tile_size", 128,
            "--outputs", "masks,features,confidence", "--channel_mapping", "rg_mean"]
  run_job(*common, "--output", tmp_path / "plain" / "rows")
  summary = run_job(*common, "--output", tmp_path / "shared" / "rows",
                    "--share_model_across_processes")
  assert summary.metrics["tiles_inferred"] > 3
  plain, shared = read_rows(tmp_path / "plain" / "rows"), read_rows(tmp_path / "shared" / "rows")
  assert sorted(plain) == sorted(shared) and len(plain) == 3
  for image_id, row in plain.items():
    for column, value in row.items():
      if column in ("mask", "run_id"):
        continue
      if isinstance(value, np.ndarray) or column == "mask_png":
        np.testing.assert_array_equal(np.asarray(value), np.asarray(shared[image_id][column]))
      else:
        assert value == shared[image_id][column], (image_id, column)


def test_channel_mapping_comes_from_the_labels_file_and_the_flag(pixel_local_model, tmp_path):
  image = textured_image(64, 96, 5)
  image[:, :, :2] &= 0xFE  # R + G even: the mapped image is exact in uint8
  mapped = image.copy()
  mapped[:, :, 2] = (image[:, :, 0].astype(int) + image[:, :, 1]) // 2
  save_image(tmp_path / "original.png", image)
  save_image(tmp_path / "mapped.png", mapped)
  labels = json.loads((Path(pixel_local_model) / "labels.json").read_text())
  labels["channel_mapping"] = "rg_mean"
  (tmp_path / "labels.json").write_text(json.dumps(labels))
  run_job("--input", tmp_path / "original.png", "--output", tmp_path / "a" / "rows",
          "--model", pixel_local_model, "--labels_file", tmp_path / "labels.json")
  run_job("--input", tmp_path / "mapped.png", "--output", tmp_path / "b" / "rows",
          "--model", pixel_local_model)
  run_job("--input", tmp_path / "original.png", "--output", tmp_path / "c" / "rows",
          "--model", pixel_local_model, "--labels_file", tmp_path / "labels.json",
          "--channel_mapping", "rgb")
  by_file = {}
  for name in "abc":
    by_file[name] = next(iter(read_rows(tmp_path / name / "rows").values()))
  np.testing.assert_array_equal(by_file["a"]["mask"], by_file["b"]["mask"])
  assert not np.array_equal(by_file["a"]["mask"], by_file["c"]["mask"])
  files = list((tmp_path / "a").glob("*.parquet"))
  assert pq.read_schema(files[0]).metadata[b"hrnet_beam.channel_mapping"] == b"rg_mean"
  _expect_config_error("channel mapping 'bgr'", "--input", tmp_path / "original.png",
                       "--output", tmp_path / "d", "--model", pixel_local_model,
                       "--channel_mapping", "bgr")


def _stage_in_hub_cache(model_dir, handle, cache):
  """Pre-stages a model where tensorflow_hub keeps a downloaded handle (no network)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  target = cache / hashlib.sha1(handle.encode()).hexdigest()
  shutil.copytree(model_dir, target)
  (target / "labels.json").unlink(missing_ok=True)   # labels must come from the package


def _serve_as_suite_model(model_dir, name, tmp_path, monkeypatch):
  """Makes `--model name` load model_dir, as if downloaded; returns the handle."""
  from transforms import labels as labels_lib  # pylint: disable=import-outside-toplevel
  handle = labels_lib.resolve_model_name(name)
  _stage_in_hub_cache(model_dir, handle, tmp_path / "tfhub")
  monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
  save_image(tmp_path / "a.png", textured_image(96, 96, seed=1))
  return handle


def test_suite_short_names_resolve_to_hub_handles_and_their_labels(tiny_model, tmp_path,
                                                                   monkeypatch):
  from transforms import labels as labels_lib  # pylint: disable=import-outside-toplevel
  names = labels_lib.model_suite()["names"]
  assert len(names) == 17 and len(set(names)) == 17
  assert labels_lib.resolve_model_name("city") == \
      "https://tfhub.dev/google/HRNet/city-hrnetv2-w48/1"
  handle = _serve_as_suite_model(tiny_model, "isprs", tmp_path, monkeypatch)
  out = tmp_path / "out" / "rows"
  summary = run_job("--input", tmp_path / "a.png", "--output", out, "--model", "isprs",
                    "--tile_size", "64", "--tile_overlap", "0")
  assert summary.rows == 1
  row = next(iter(read_rows(out).values()))
  assert row["model"] == handle
  metadata = pq.read_schema(next(Path(out).parent.glob("rows-*.parquet"))).metadata
  isprs = labels_lib.packaged_labels("isprs")
  assert json.loads(metadata[b"hrnet_beam.class_names"]) == list(isprs.class_names)
  assert metadata[b"hrnet_beam.channel_mapping"] == b"rg_mean"


def test_packaged_labels_that_do_not_fit_the_model_fail_before_launch(tmp_path, monkeypatch):
  """A 5-class model behind the isprs handle: the 7 ISPRS labels cannot describe it."""
  from pipeline.standin import hrnet  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / "five"
  hrnet.export_pixel_local(5, 15 * TINY_WIDTH, str(model_dir))
  _serve_as_suite_model(model_dir, "isprs", tmp_path, monkeypatch)
  with pytest.raises(ConfigError, match="name 7 classes but model .*isprs.* outputs 5"):
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "o" / "rows", "--model",
            "isprs")


def test_unknown_short_model_name_lists_the_suite(tmp_path):
  save_image(tmp_path / "a.png", textured_image(64, 64, seed=1))
  with pytest.raises(ConfigError, match="not a short name of the HRNet suite .*ade20k.*vkitti2"):
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "o" / "rows", "--model",
            "isprz")


def test_every_suite_model_has_its_labels_file_transcribed_whole():
  """Each of the 17 names finds its file by handle; the list is as long as FOI says."""
  from transforms import labels as labels_lib  # pylint: disable=import-outside-toplevel
  from transforms.tiling.channels import parse_channel_mapping  # pylint: disable=import-outside-toplevel
  for name in labels_lib.model_suite()["names"]:
    handle = labels_lib.resolve_model_name(name)
    labels = labels_lib.labels_for_handle(handle)
    assert labels is not None, f"no packaged labels file for {name}"
    with open(os.path.join(labels_lib.LABELS_DIR, f"{name}.json"), encoding="utf-8") as f:
      data = json.load(f)
    assert data["handle"] == handle and "fids_metadata_segmentation" in data["source"]
    assert labels.num_classes == data["source_num_classes"], name
    assert len(set(labels.class_names)) == labels.num_classes, f"{name}: repeated names"
    assert len(labels.palette) == labels.num_classes
    assert labels.class_names[0].lower() in ("background", "unlabeled"), name
    assert len(set(labels.palette)) > labels.num_classes // 2, f"{name}: palette collapsed"
    parse_channel_mapping(labels.channel_mapping)
    assert (labels.channel_mapping == "rg_mean") == (name == "isprs")


@pytest.mark.parametrize("model_classes, fits", [(16, True), (17, False), (15, False)])
def test_suite_labels_fit_only_a_model_with_one_output_per_class(model_classes, fits):
  from transforms import labels as labels_lib  # pylint: disable=import-outside-toplevel
  isaid = labels_lib.labels_for_handle(labels_lib.resolve_model_name("isaid"))
  assert isaid.num_classes == 16 and isaid.class_names[1] == "ship"
  assert labels_lib.fits_model(isaid, model_classes) is fits


def test_a_labels_file_that_pads_the_model_with_an_added_class_is_refused():
  from transforms import labels as labels_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="added_class is not supported"):
    labels_lib.parse_labels({"classes": [{"name": "a", "color": [1, 2, 3]}],
                             "added_class": {"name": "b", "color": [0, 0, 0]}}, "x.json")


@pytest.mark.parametrize("outputs", [32, 33])
def test_a_suite_model_gets_its_class_names_or_is_refused_before_launch(
    outputs, tmp_path, monkeypatch):
  """camvid: FOI lists 32 classes. A 32-output model gets them; a 33-output one is refused."""
  from pipeline.standin import hrnet  # pylint: disable=import-outside-toplevel
  from transforms import labels as labels_lib  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / "camvid"
  hrnet.export_pixel_local(outputs, 15 * TINY_WIDTH, str(model_dir))
  _serve_as_suite_model(model_dir, "camvid", tmp_path, monkeypatch)
  out = tmp_path / "out" / "rows"
  args = ("--input", tmp_path / "a.png", "--output", out, "--model", "camvid",
          "--tile_size", "64", "--tile_overlap", "0")
  if outputs == 33:
    _expect_config_error("name 32 classes but model .*camvid.* outputs 33: pass "
                         "--labels_file with one class per output", *args)
    assert not list((tmp_path / "out").glob("*.parquet"))
    return
  run_job(*args)
  metadata = pq.read_schema(next(Path(out).parent.glob("rows-*.parquet"))).metadata
  names = json.loads(metadata[b"hrnet_beam.class_names"])
  assert names == list(labels_lib.packaged_labels("camvid").class_names)
  assert names[:3] == ["background", "Animal", "Archway"] and names[-1] == "Wall"
