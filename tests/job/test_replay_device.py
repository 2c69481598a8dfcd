"""The host-ceiling benchmark's replay device (benchmarks/replay_job.py): a real loaded
model whose repeated calls are replayed, so that a job on repeated scenes pays the device
once per distinct call and writes the rows the model gives."""
import shutil

import numpy as np

from benchmarks.replay_job import ReplayModel, main as replay_main
from transforms.inference.model import load_hrnet
from conftest import read_rows, run_job, save_image, textured_image


def test_a_repeated_call_is_replayed_with_the_models_own_outputs(tiny_model, tmp_path):
  inner = load_hrnet(tiny_model, str(tmp_path / "cache"))
  model = ReplayModel(inner)
  images = textured_image(64, 64)[None].astype(np.float32) / 255
  cells = np.ones((1, 16, 16), np.float32)
  pixels = np.ones((1, 64, 64), np.float32)
  direct = inner.infer_tiles(images, True, True, cells, pixels, 0.5, None)
  first = model.infer_tiles(images, True, True, cells, pixels, 0.5, None)
  again = model.infer_tiles(images.copy(), True, True, cells, pixels, 0.5, None)
  assert model.call_counts() == {"computed": 1, "replayed": 1}
  for outputs in (first, again):
    np.testing.assert_array_equal(outputs.class_ids, direct.class_ids)
    np.testing.assert_array_equal(outputs.features, direct.features)
  other = images.copy()
  other[0, 0, 0, 0] = 1 - other[0, 0, 0, 0]   # one value differs: a call of its own
  model.infer_tiles(other, True, True, cells, pixels, 0.5, None)
  model.infer_tiles(images, True, True, cells, pixels, 0.4, None)   # another threshold
  assert model.call_counts() == {"computed": 3, "replayed": 1}


def test_a_job_on_the_replay_device_writes_the_rows_of_the_model(tiny_model, tmp_path):
  scenes = tmp_path / "scenes"
  scenes.mkdir()
  save_image(scenes / "a0.png", textured_image(150, 170, seed=1))
  save_image(scenes / "b0.png", textured_image(150, 170, seed=2))
  for copy in ("a1", "a2", "b1"):   # the same pixels under other names
    shutil.copy(scenes / f"{copy[0]}0.png", scenes / f"{copy}.png")
  flags = ["--input", str(scenes / "*.png"), "--model", tiny_model, "--model_cache_dir",
           str(tmp_path / "cache"), "--tile_size", "96", "--tile_overlap", "32",
           "--progress", "off"]
  run_job(*flags, "--output", tmp_path / "model" / "rows")
  ReplayModel.loaded.clear()
  assert replay_main(flags + ["--output", str(tmp_path / "replay" / "rows")]) == 0
  assert len(ReplayModel.loaded) == 1
  counts = ReplayModel.loaded[0].call_counts()
  assert counts["replayed"] > 0 and counts["computed"] > 0
  assert counts["replayed"] >= counts["computed"]   # 5 scenes, 2 distinct
  expected = read_rows(tmp_path / "model" / "rows")
  replayed = read_rows(tmp_path / "replay" / "rows")
  assert sorted(replayed) == sorted(expected) and len(expected) == 5
  for image_id, row in expected.items():
    assert replayed[image_id]["mask_png"] == row["mask_png"]
    assert replayed[image_id]["pooled_features"] == row["pooled_features"]
