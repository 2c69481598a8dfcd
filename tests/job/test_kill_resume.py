"""Killed jobs resume: SIGKILL a multi-process local job several times, rerun with
--skip_existing until it finishes, and nothing is lost, doubled or half-written."""
import glob
import json
import os
import random
import re
import signal
import subprocess
import time

import pyarrow.parquet as pq

from conftest import hrnet_beam, read_errors, save_image, textured_image

IMAGES, BROKEN, KILLS = 300, 3, 3


def _finished_files(out) -> set:
  return set(glob.glob(f"{out}/*-of-*.parquet") + glob.glob(f"{out}/*-of-*.jsonl"))


def test_a_job_killed_at_random_moments_resumes_to_exactly_one_output_per_input(
    pixel_local_model, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  for i in range(IMAGES):
    save_image(images / f"{i:03d}.png", textured_image(24, 32, i))
  for i in range(BROKEN):
    (images / f"broken{i}.png").write_bytes(b"not an image")
  inputs = sorted(str(p) for p in images.iterdir())
  out = tmp_path / "out"
  command = hrnet_beam("run", "--input", images / "*", "--output", f"{out}/", "--model",
                       pixel_local_model, "--skip_existing", "--progress", "off",
                       "--direct_num_workers", 2, "--direct_running_mode", "multi_processing")
  # Kill at a random moment of the work, then (the dangerous moments) as soon as a run
  # starts renaming its finished files into place, until some output is there to skip.
  rng = random.Random(18)
  moments = [rng.uniform(1.0, 10.0)] + ["finalizing"] * (KILLS - 1)
  outcomes, stdout = [], ""
  for moment in moments + [None] * 4:
    before = _finished_files(out)
    job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    if moment == "finalizing":
      while job.poll() is None and _finished_files(out) == before:
        time.sleep(0.01)
    elif moment is not None:
      time.sleep(moment)
    if moment is not None and job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)   # the launcher and its worker processes
    stdout, stderr = job.communicate(timeout=600)
    outcomes.append((moment, job.returncode, len(_finished_files(out))))
    if moment is None:
      assert job.returncode == 0, stderr[-3000:]
      break
  assert sum(1 for _, code, _ in outcomes if code == -signal.SIGKILL) >= 2, outcomes
  # The killed runs left finished files behind, and the last run skipped what they hold.
  skipped = int(re.search(r"(\d+) skipped", stdout).group(1))
  assert 0 < skipped < len(inputs), (stdout, outcomes)
  print("kill_resume outcomes (moment, exit, finished files):", outcomes, "skipped", skipped)

  row_files = sorted(glob.glob(f"{out}/segmentations-*-of-*.parquet"))
  rows = []
  for path in row_files:   # every visible file is whole: it opens and reads
    rows += pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
  errors = [e["image_id"] for e in read_errors(f"{out}/errors")]
  assert len(rows) == len(set(rows)), "a row was written twice"
  assert len(errors) == len(set(errors)), "an error was written twice"
  assert not set(rows) & set(errors)
  assert sorted(rows + errors) == inputs
  assert len(errors) == BROKEN
  for path in glob.glob(f"{out}/errors-*.jsonl"):
    with open(path, encoding="utf-8") as f:
      assert all(json.loads(line) for line in f if line.strip())
