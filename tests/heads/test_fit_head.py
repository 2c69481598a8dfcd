"""fit-head and rank-models on the demo model and synthetic scenes with a class it never
saw (pools): the new model runs through the job, polygons and an export; bad input is
named before training."""
import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, hrnet_beam, read_rows, run_job
from pipeline.cli import fit_head, rank_models
from pipeline.cli.export import export
from pipeline.standin.scenes import write_scenes

DEMO = os.path.join(REPO_ROOT, "models", "demo")
SIDE = 256


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("heads")
  write_scenes(str(tmp / "scenes"), 6, SIDE, SIDE, seed=500, kind="suburban", pools=True)
  return tmp


def _args(tmp, *extra):
  return ["--model", DEMO, "--images", str(tmp / "scenes" / "scene_???.png"),
          "--truth", str(tmp / "scenes" / "*.labels.png"), "--truth_suffix", ".labels",
          "--truth_labels", str(tmp / "scenes" / "labels.json"), "--pixels_per_image", "400",
          "--holdout", "0.34", *map(str, extra)]


@pytest.fixture(scope="module")
def fitted(scenes):
  to = scenes / "pool_model"
  assert fit_head.main(_args(scenes, "--to", to)) == 0
  return to


def test_the_fitted_model_learns_the_new_class_and_says_how_it_was_made(scenes, fitted):
  report = json.loads((fitted / "fit_report.json").read_text())
  held = report["held_out"]
  assert held["images"] == 2 and report["classes"][6] == "pool"
  assert held["per_class"]["pool"]["new_head_iou"] > 0.3
  assert held["per_class"]["pool"]["base_head_iou"] is None     # the demo model has no pool
  assert held["base_head_miou_on_shared"] > 0.5 and held["new_head_miou_on_shared"] > 0.5
  assert [c["fraction"] for c in report["learning_curve"]] == [0.25, 0.5, 1.0]
  assert set(report["timings"]) >= {"sample_features_s", "train_s", "total_s"}
  labels = json.loads((fitted / "labels.json").read_text())
  assert labels["head"]["base_model"] == DEMO and labels["head"]["seed"] == 0
  assert len(labels["head"]["training_images"]) == 4
  assert labels["head"]["sample_pixels"] == sum(labels["head"]["sample_pixels_per_class"].values())


def test_the_fitted_model_runs_through_the_job_polygons_and_an_export(scenes, fitted, tmp_path):
  out = tmp_path / "rows"
  summary = run_job("--input", scenes / "scenes" / "scene_00[01].png", "--output", out,
                    "--model", fitted, "--tile_size", 128, "--tile_overlap", 32,
                    "--polygons_output", tmp_path / "polygons",
                    "--outputs", "masks,features,confidence")
  assert summary.rows == 2 and summary.errors == 0
  rows = read_rows(out)
  metadata = pq.read_schema(next(iter(sorted(tmp_path.glob("rows-*.parquet"))))).metadata
  assert json.loads(metadata[b"hrnet_beam.class_names"])[6] == "pool"
  assert b"fit-head" in metadata[b"hrnet_beam.labels_note"]
  assert metadata[b"hrnet_beam.scores"] == b"probabilities"
  assert any((r["mask"] == 6).any() for r in rows.values())        # pools found
  polygons = pq.read_table(sorted(tmp_path.glob("polygons-*.parquet"))[0]).to_pylist()
  assert "pool" in {p["class_name"] for p in polygons}
  result = export(str(out), "coco", str(tmp_path / "coco"))
  coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
  assert result["images"] == 2 and coco["categories"][6]["name"] == "pool"


def test_fitting_is_deterministic_for_a_seed(scenes, fitted, tmp_path):
  assert fit_head.main(_args(scenes, "--to", tmp_path / "again")) == 0
  first = json.loads((fitted / "fit_report.json").read_text())
  again = json.loads((tmp_path / "again" / "fit_report.json").read_text())
  for report in (first, again):
    report.pop("timings")
    report.pop("model")
  assert first == again
  from transforms.heads.features import FeatureModel  # pylint: disable=import-outside-toplevel
  image = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
  models = [FeatureModel(str(d)) for d in (fitted, tmp_path / "again")]
  scores = [m.module.predict(image).numpy() for m in models]
  np.testing.assert_array_equal(*scores)


def test_bad_input_is_named_before_training(scenes, tmp_path, capsys):
  labels = json.loads((scenes / "scenes" / "labels.json").read_text())
  labels["classes"].append({"name": "solar_panel", "color": [9, 9, 9]})
  (tmp_path / "more.json").write_text(json.dumps(labels))
  args = _args(scenes, "--to", tmp_path / "m")
  args[args.index("--truth_labels") + 1] = str(tmp_path / "more.json")
  assert fit_head.main(args) == 2
  err = capsys.readouterr().err
  assert "'solar_panel' (0 pixels)" in err and "too few labelled pixels" in err
  assert not (tmp_path / "m").exists()
  args = _args(scenes, "--to", tmp_path / "m")
  args[args.index("--truth") + 1] = str(tmp_path / "nothing*.png")
  assert fit_head.main(args) == 2 and "matches no file" in capsys.readouterr().err
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  module = tf.Module()
  module.predict = tf.function(lambda images: images,
                               input_signature=[tf.TensorSpec([None, None, None, 3])])
  tf.saved_model.save(module, str(tmp_path / "no_features"))
  args = _args(scenes, "--to", tmp_path / "m")
  args[args.index("--model") + 1] = str(tmp_path / "no_features")
  assert fit_head.main(args) == 2 and "no get_features" in capsys.readouterr().err


def test_rank_models_puts_the_trained_model_above_random_weights(scenes, tmp_path):
  random_model = tmp_path / "random"
  done = subprocess.run(hrnet_beam("export-model", "--output", random_model, "--width", 8,
                                   "--depth", "reduced", "--num_classes", 7),
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  args = _args(scenes, "--report", tmp_path / "rank")
  args[args.index("--model"):args.index("--model") + 2] = ["--models", f"{DEMO},{random_model}"]
  assert rank_models.main(args) == 0
  report = json.loads((tmp_path / "rank" / "ranking.json").read_text())
  assert [s["handle"] for s in report["ranked_by_logme"]] == [DEMO, str(random_model)]
  assert report["orders_agree"]
  assert report["ranked_by_logme"][0]["held_out_head_miou"] > report["ranked_by_logme"][1][
      "held_out_head_miou"]


def test_images_truth_and_model_from_gcs(scenes, bucket, tmp_path):
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  for path in sorted((scenes / "scenes").iterdir()):
    with open(path, "rb") as f, FileSystems.create(f"{bucket}/labeled/{path.name}") as out:
      out.write(f.read())
  args = ["--model", DEMO, "--images", f"{bucket}/labeled/scene_00?.png", "--truth",
          f"{bucket}/labeled/*.labels.png", "--truth_suffix", ".labels", "--truth_labels",
          f"{bucket}/labeled/labels.json", "--pixels_per_image", "400", "--holdout", "0.34", "--to",
          tmp_path / "from_gcs"]
  assert fit_head.main([str(a) for a in args]) == 0
  report = json.loads((tmp_path / "from_gcs" / "fit_report.json").read_text())
  assert report["training_images"][0].startswith(f"{bucket}/labeled/")
  assert len(report["training_images"]) == 4 and report["held_out"]["images"] == 2


def test_the_fitted_model_optimizes_and_its_rows_index(scenes, fitted, tmp_path):
  from pipeline.cli.index import index  # pylint: disable=import-outside-toplevel
  from pipeline.cli.optimize import optimize  # pylint: disable=import-outside-toplevel
  report = optimize(str(fitted), "float32", [str(scenes / "scenes" / "scene_00?.png")],
                    str(tmp_path / "ir"), tile_size=128, tile_overlap=32,
                    calibration_tiles=2, holdout_tiles=2)
  assert report["pixel_agreement"] > 0.999 and "pool" in report["iou_per_class"]
  out = tmp_path / "rows"
  summary = run_job("--input", scenes / "scenes" / "scene_00?.png", "--output", out,
                    "--model", tmp_path / "ir", "--tile_size", 128, "--tile_overlap", 32)
  assert summary.rows == 6 and summary.errors == 0
  rows = read_rows(out)
  assert {r["engine"] for r in rows.values()} == {"openvino"}
  built = index(str(out), str(tmp_path / "index"))
  assert built is not None and (tmp_path / "index").exists()
  # pylint: disable=import-outside-toplevel
  from transforms.exports.rows import row_files
  from transforms.index.search import Searcher
  from transforms.serving.app import JobOutput, make_server
  import threading
  import urllib.request
  httpd = make_server(JobOutput(row_files(str(out)), Searcher(str(tmp_path / "index"))),
                      "127.0.0.1", 0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_address[1]}/api/info",
                              timeout=30) as response:
    info = json.loads(response.read())
  httpd.shutdown()
  assert info["images"] == 6 and info["class_names"][6] == "pool"


FIT_IN_CHILD = r"""
import sys
from pipeline.cli import fit_head
assert fit_head.main(sys.argv[1:]) == 0
with open("/proc/self/status") as f:
  print(next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM")))
"""


def test_fitting_memory_does_not_grow_with_the_number_of_images(tmp_path):
  """Peak RSS of fit-head on 6 and on 24 scenes of 512x512 (a sample of 300 pixels each):
  images are read one at a time, so only the sample (about 150 KB an image) may grow."""
  import sys  # pylint: disable=import-outside-toplevel
  peaks = {}
  for count in (6, 24):
    scenes = tmp_path / f"s{count}"
    write_scenes(str(scenes), count, 512, 512, seed=600, kind="suburban", pools=True)
    done = subprocess.run(
        [sys.executable, "-c", FIT_IN_CHILD, "--model", DEMO, "--images",
         str(scenes / "scene_???.png"), "--truth", str(scenes / "*.labels.png"),
         "--truth_suffix", ".labels", "--truth_labels", str(scenes / "labels.json"),
         "--pixels_per_image", "300", "--holdout", "0.34", "--to", str(tmp_path / f"m{count}")],
        capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks[count] = int(done.stdout.strip().splitlines()[-1])
  print(f"fit-head peak RSS: 6 scenes {peaks[6] >> 20} MiB, 24 scenes {peaks[24] >> 20} MiB")
  assert peaks[24] - peaks[6] < 64 << 20, peaks
