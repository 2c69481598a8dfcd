"""Where a job's time goes: per-stage counters, the closing line and --stats_output."""
import json
import os

import pytest

from conftest import REPO_ROOT, run_job, save_image
from pipeline.standin import scenes
from transforms import timing


def test_stage_seconds_take_the_model_out_of_the_handlers_time():
  counters = {"stage_us_tile_outputs": 5_000_000, "stage_us_model": 4_000_000,
              "stage_us_read": 250_000, "tiles": 10}
  seconds = timing.stage_seconds(counters)
  assert seconds["tile_outputs"] == pytest.approx(1.0) and seconds["model"] == 4.0
  assert seconds["polygons"] == 0 and set(seconds) == set(timing.STAGE_NAMES)
  document = timing.stats(counters, 10, wall_seconds=6.0, in_one_process=True)
  assert document["outside_model_ms_per_tile"] == pytest.approx(125.0)
  assert document["stage_seconds"]["other"] == pytest.approx(0.75)
  line = timing.time_line(document)
  assert line.startswith("hrnet-beam time: ") and "model 4.0 s" in line
  assert "125.0 ms a tile outside the model (10 tiles)" in line
  with pytest.raises(ValueError):
    timing.counter_name("decoding")


def test_a_job_reports_each_stage_as_metrics_a_line_and_json(tmp_path, capsys):
  for seed in range(2):
    image, _ = scenes.generate_scene(320, 384, 40 + seed)
    save_image(tmp_path / f"s{seed}.png", image)
  stats = tmp_path / "stats" / "time.json"
  os.makedirs(stats.parent)
  summary = run_job("--input", tmp_path / "*.png", "--model",
                    os.path.join(REPO_ROOT, "models", "demo"), "--output",
                    tmp_path / "out" / "rows", "--polygons_output", tmp_path / "out" / "poly",
                    "--patch_output", tmp_path / "out" / "patches", "--patch_size", "64",
                    "--stats_output", stats, "--progress", "off")
  assert summary.exit_status == 0 and summary.rows == 2
  for stage in ("read", "tiling", "model", "stitch", "polygons", "patches", "write"):
    assert summary.metrics.get(timing.counter_name(stage), 0) > 0, stage   # Beam counters
  document = json.loads(stats.read_text())
  assert document["tiles"] == summary.metrics["tiles"] > 0
  seconds = document["stage_seconds"]
  assert set(timing.STAGE_NAMES) <= set(seconds)
  assert seconds["model"] > 0 and seconds["polygons"] > 0 and seconds["read"] > 0
  # one process: the stages and what they leave add up to the wall time
  assert sum(seconds.values()) == pytest.approx(document["wall_seconds"], rel=0.02, abs=0.05)
  assert document["outside_model_ms_per_tile"] == pytest.approx(
      1000 * sum(s for k, s in seconds.items() if k not in ("model", "other"))
      / document["tiles"], rel=0.01, abs=0.5)   # the document's seconds are rounded
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if l.startswith("hrnet-beam time: "))
  assert "model" in line and "a tile outside the model" in line
