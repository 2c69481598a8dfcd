"""The `hrnet-beam` command as a user meets it: its help, its quiet output, its progress."""
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from pipeline.cli import COMMANDS
from pipeline.job.options import FLAG_GROUPS, HRNetOptions
from pipeline.job.progress import progress_line, total_text
from transforms.progress import ProgressConfig, ProgressCounts, ProgressReporter, read_reports

from conftest import REPO_ROOT, hrnet_beam

DEMO_MODEL = os.path.join(REPO_ROOT, "models", "demo")
# Lines the libraries print that a user of the job should not have to read past.
NOISE = re.compile(r"^[IWE]\d{4} |absl::InitializeLog|oneDNN|cuInit|cuda|Converting string "
                   r"literal|WriteImpl|Resource module|BatchElements|statecache|Renamed \d+ shards")


def _run(*args, timeout=600, **kwargs):
  return subprocess.run(hrnet_beam(*args), capture_output=True, text=True, timeout=timeout,
                        check=False, **kwargs)


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
  """The demo's sample set (four scenes and a truncated PNG), written by the command."""
  directory = tmp_path_factory.mktemp("demo") / "images"
  done = _run("scenes", "--demo", "--output", directory)
  assert done.returncode == 0, done.stderr
  return directory


def test_help_lists_every_subcommand_one_line_each_without_starting_tensorflow():
  done = _run("--help")
  assert done.returncode == 0
  for name in COMMANDS:
    assert len([line for line in done.stdout.splitlines()
                if line.strip().startswith(name + " ")]) == 1, name
  # Listing the commands imports none of them (and so no TensorFlow).
  probe = subprocess.run(
      [sys.executable, "-c", "import sys; from pipeline.cli import main; main(['--help']); "
       "assert 'tensorflow' not in sys.modules and 'apache_beam' not in sys.modules"],
      capture_output=True, text=True, check=False)
  assert probe.returncode == 0, probe.stderr
  unknown = _run("segment")
  assert unknown.returncode == 2 and "unknown subcommand 'segment'" in unknown.stderr


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"run"}))
def test_every_subcommand_has_help(name):
  done = _run(name, "--help")
  assert done.returncode == 0, done.stderr
  assert f"usage: hrnet-beam {name}" in done.stdout


def test_run_help_groups_the_jobs_flags_before_beams():
  done = _run("run", "--help")
  assert done.returncode == 0, done.stderr
  text = done.stdout
  titles = [title for _, title in FLAG_GROUPS]
  positions = [text.index(title + ":") for title in titles]
  assert positions == sorted(positions)
  beam_start = text.index("Beam: ")
  assert positions[-1] < beam_start and "--runner" in text[beam_start:]
  sections = dict(zip(titles, [text[p:q] for p, q in zip(positions, positions[1:] +
                                                          [beam_start])]))
  expected = {"Inputs": "--input_format", "Model": "--channel_mapping",
              "Tiling": "--tile_overlap", "Outputs": "--mask_geotiff_dir",
              "Robustness": "--skip_existing", "Runner": "--log_level"}
  for title, flag in expected.items():
    section = next(s for t, s in sections.items() if t.startswith(title))
    assert flag in section, (title, flag)
  # Every flag of the job is in one of its groups.
  ours = re.findall(r"^  (--\w+)", "".join(sections.values()), re.M)
  parser_flags = {a.option_strings[0] for a in _job_actions()}
  assert parser_flags == set(ours)


def _job_actions():
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  HRNetOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return [a for a in parser._actions if a.option_strings != ["-h", "--help"]]  # pylint: disable=protected-access


def test_a_misspelt_flag_fails_before_launch(tmp_path):
  done = _run("run", "--input", tmp_path / "*.png", "--output", tmp_path / "out",
              "--tile_sise", "256")
  assert done.returncode == 2
  assert "unknown flag --tile_sise" in done.stderr and "hrnet-beam run --help" in done.stderr


def test_the_demo_job_prints_its_own_lines_only(demo_images, tmp_path):
  done = _run("run", "--input", f"{demo_images}/*", "--model", DEMO_MODEL,
              "--output", tmp_path / "out" / "segmentations")
  assert done.returncode == 0, done.stderr
  lines = (done.stdout + done.stderr).splitlines()
  assert len(lines) <= 10, lines
  assert not [line for line in lines if NOISE.search(line)], lines
  assert any("7 classes" in line and "models/demo" in line for line in lines)
  assert any("1 input pattern, each matching at least one file" in line for line in lines)
  assert any("broken.png" in line and "truncated" in line for line in lines)  # kept
  assert done.stdout.splitlines()[-2].startswith("hrnet-beam done: 6 inputs, 5 rows, 1 errors")
  last = done.stdout.splitlines()[-1]   # then where the time went
  assert last.startswith("hrnet-beam time: ") and "model" in last and "outside the model" in last


def test_worker_processes_stay_quiet_but_their_warnings_show(demo_images, tmp_path):
  """With two local worker processes, the skipped file's warning comes from a worker,
  relayed through Beam's job service: shown plainly, and Beam's own relays are not."""
  done = _run("run", "--input", f"{demo_images}/*", "--model", DEMO_MODEL,
              "--output", tmp_path / "out" / "segmentations", "--direct_num_workers", 2,
              "--direct_running_mode", "multi_processing")
  assert done.returncode == 0, done.stderr
  lines = (done.stdout + done.stderr).splitlines()
  assert not [line for line in lines if NOISE.search(line) or "Worker:" in line], lines
  assert "WARNING: Skipping " in done.stderr and "broken.png" in done.stderr
  assert done.stdout.splitlines()[-2].startswith("hrnet-beam done: 6 inputs, 5 rows, 1 errors")
  assert done.stdout.splitlines()[-1].startswith("hrnet-beam time: ")


def test_log_level_info_shows_the_libraries_logs(demo_images, tmp_path):
  done = _run("run", "--input", f"{demo_images}/0_*", "--model", DEMO_MODEL,
              "--output", tmp_path / "out" / "segmentations", "--log_level", "info")
  assert done.returncode == 0, done.stderr
  assert re.search(r"INFO apache_beam\.", done.stderr)
  assert re.search(r"INFO transforms\.inference\.model: Loaded model", done.stderr)


def _run_on_a_terminal(args, timeout=300) -> str:
  """Runs the command with stdout and stderr on a pseudo-terminal; returns all it wrote."""
  pid, fd = pty.fork()
  if pid == 0:  # the child: the command on the terminal
    os.execv(hrnet_beam()[0], hrnet_beam(*args))
  output, deadline = b"", time.monotonic() + timeout
  while time.monotonic() < deadline:
    ready, _, _ = select.select([fd], [], [], 1.0)
    if not ready:
      continue
    try:
      chunk = os.read(fd, 65536)
    except OSError:  # the child closed the terminal
      break
    if not chunk:
      break
    output += chunk
  _, status = os.waitpid(pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")[-3000:]
  return output.decode(errors="replace")


def test_progress_on_a_terminal_is_one_line_updated_in_place(demo_images, tmp_path):
  output = _run_on_a_terminal(["run", "--input", f"{demo_images}/*", "--model", DEMO_MODEL,
                               "--output", str(tmp_path / "out" / "segmentations")])
  bar = [part for part in output.split("\r") if part.startswith("hrnet-beam: ")
         and "inputs |" in part]
  assert len(bar) >= 2, output
  assert re.search(r"hrnet-beam: 6/6 inputs \|.*\| \d\d:\d\d<\d\d:\d\d, 1 errors, "
                   r"[\d.]+ tiles/s", bar[-1]), bar[-1]
  assert "progress:" not in output   # no plain lines on a terminal
  assert not [line for line in output.splitlines() if NOISE.search(line)]


def test_progress_line_says_when_the_total_may_grow():
  # Two patterns: 1,201 files listed so far, one of them by both; 4 shards, one opened (4
  # records: 3 found beyond the shard itself), and one more file whose bytes hold 1 more.
  counts = ProgressCounts(done=70, errors=3, tiles=412, found=4, resolved=1, listed=1201,
                          patterns=1, checked=1201, duplicates=1, expandable=4)
  line = progress_line(2, counts, elapsed=100.0)
  assert line.startswith("progress: 70/1204+ inputs, 3 errors, 412 tiles, 4.12 tiles/s")
  assert "elapsed 01:40" in line and "ETA 27:00+" in line   # 1134 left at 0.7 inputs/s
  counts.patterns = 2   # every pattern listed, but 3 shards not yet opened
  assert total_text(2, counts) == (1204, True)
  counts.resolved = 4
  assert total_text(2, counts) == (1204, False)
  assert "1204 inputs" in progress_line(2, counts, 100.0)
  counts.listed += 10   # listed, not yet past the shuffle that drops repeats
  assert total_text(2, counts) == (1214, True)


def test_reporters_of_several_processes_add_up(tmp_path):
  config = ProgressConfig(report_dir=str(tmp_path))
  first, second = ProgressReporter(config, "decode"), ProgressReporter(config, "segment")
  first.add(done=2, errors=2)
  second.add(done=3, tiles=30)
  second.add(found=5, resolved=1)
  assert read_reports(str(tmp_path)) == ProgressCounts()  # nothing flushed yet
  first.flush()
  second.flush()
  (tmp_path / "half-written.json").write_text("{")
  assert read_reports(str(tmp_path)) == ProgressCounts(done=5, errors=2, tiles=30, found=5,
                                                       resolved=1)
