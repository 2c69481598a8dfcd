"""The project installs as Dataflow installs it: from the sdist that --setup_file ships, and
from a wheel (not editable), working from any directory."""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import REPO_ROOT, read_rows, save_image, textured_image


def _tracked_package_files() -> list:
  """Every file of the packages that git tracks: modules and the data they read."""
  listed = subprocess.run(["git", "ls-files", "pipeline", "transforms"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout.split()
  assert listed, "git lists no package files"
  return sorted(listed)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The sdist (python setup.py sdist, what --setup_file runs) and a wheel built from it."""
  out = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)],
                 cwd=REPO_ROOT, check=True, capture_output=True)
  sdist = glob.glob(str(out / "*.tar.gz"))[0]
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--quiet", "--wheel-dir", str(out), sdist], check=True, capture_output=True)
  wheel = glob.glob(str(out / "*.whl"))[0]
  return sdist, wheel


def test_sdist_and_wheel_hold_every_module_and_data_file(built):
  sdist, wheel = built
  with tarfile.open(sdist) as archive:
    in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
  with zipfile.ZipFile(wheel) as archive:
    in_wheel = set(archive.namelist())
  wanted = _tracked_package_files()
  assert any(name.endswith(".json") for name in wanted)   # the labels files, at least
  assert [name for name in wanted if name not in in_sdist] == []
  assert [name for name in wanted if name not in in_wheel] == []
  assert any(name.endswith("entry_points.txt") for name in in_wheel)


def test_installed_wheel_runs_the_job_from_another_directory(built, tiny_model, tmp_path):
  """Installed into a directory of its own (not this checkout), the job reads its packaged
  labels and runs; the console script is there."""
  _, wheel = built
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                  "--target", str(target), wheel], check=True, capture_output=True)
  work = tmp_path / "elsewhere"
  work.mkdir()
  save_image(work / "a.png", textured_image(96, 128, 3))
  environment = dict(os.environ, PYTHONPATH=str(target))
  check = subprocess.run(
      [sys.executable, "-c",
       "import pipeline, transforms\n"
       "from transforms import labels\n"
       "from pipeline.standin import scenes\n"
       f"assert pipeline.__file__.startswith({str(target)!r}), pipeline.__file__\n"
       f"assert transforms.__file__.startswith({str(target)!r}), transforms.__file__\n"
       "assert labels.labels_for_handle(labels.resolve_model_name('isprs')).num_classes == 7\n"
       "assert len(labels.model_suite()['names']) == 17\n"
       "assert scenes.scene_labels()['classes']\n"],
      cwd=work, env=environment, capture_output=True, text=True, check=False)
  assert check.returncode == 0, check.stderr
  script = target / "bin" / "hrnet-beam"
  assert script.exists()
  done = subprocess.run(
      [str(script), "run", "--input", "a.png", "--output", "out/rows", "--model", tiny_model],
      cwd=work, env=environment, capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "hrnet-beam done: 1 inputs, 1 rows, 0 errors" in done.stdout
  assert list(read_rows(work / "out" / "rows")) == ["a.png"]
