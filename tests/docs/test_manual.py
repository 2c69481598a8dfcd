"""The manual cannot drift: its generated pages match the code, the site builds in strict
mode, and every command in README.md and the task pages is parsed by its real parser;
the blocks not marked `<!-- not run: REASON -->` are run, in order, on demo data."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from pipeline.cli import main as hrnet_beam
from pipeline.cli.reference import check_command, generate

DOCS = os.path.join(REPO_ROOT, "docs")
NOT_RUN = re.compile(r"<!--.*\bnot run: ([^>]+?) -->\s*$")


def _task_pages() -> list:
  """README.md, then the task pages in the site's nav order (the reference is generated)."""
  with open(os.path.join(REPO_ROOT, "mkdocs.yml"), encoding="utf-8") as f:
    nav = re.findall(r"^\s*- (?:[^:\n]+: )?([\w/.-]+\.md)\s*$", f.read(), re.M)
  return ["README.md"] + [f"docs/{page}" for page in nav if not page.startswith("reference/")]


def _blocks(path: str) -> list:
  """(line, reason not run or None, [command words]) per ```bash block of the page."""
  with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
    lines = f.read().split("\n")
  blocks, i = [], 0
  while i < len(lines):
    if lines[i].strip() == "```bash":
      start, body = i, []
      i += 1
      while lines[i].strip() != "```":
        body.append(lines[i])
        i += 1
      before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
      marked = NOT_RUN.search(before)
      text = re.sub(r"\\\n", " ", "\n".join(body))
      commands = []
      for line in text.split("\n"):
        words = shlex.split(line, comments=True)
        if words and words[0] in ("hrnet-beam", ".venv/bin/hrnet-beam"):
          commands.append(words[1:])
      blocks.append((start + 1, marked.group(1) if marked else None, commands))
    i += 1
  return blocks


ALL = [(page, line, reason, words) for page in _task_pages()
       for line, reason, commands in _blocks(page) for words in commands]


def test_generated_reference_pages_are_up_to_date():
  for path, text in generate().items():
    with open(os.path.join(DOCS, path), encoding="utf-8") as f:
      assert f.read() == text, f"docs/{path} is out of date: run `make docs`"


def test_the_site_builds_strict_and_fails_on_a_broken_link(tmp_path):
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
  built = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=env, check=False)
  assert built.returncode == 0, built.stdout + built.stderr
  for page in ("index.html", "reference/commands.html", "labeling/evaluate.html"):
    assert (tmp_path / "site" / page).exists(), page
  # the same build with one broken link must fail (the check means something)
  copy = tmp_path / "copy"
  shutil.copytree(DOCS, copy / "docs")
  with open(copy / "docs" / "search.md", "a", encoding="utf-8") as f:
    f.write("\nSee [nowhere](no-such-page.md).\n")
  with open(os.path.join(REPO_ROOT, "mkdocs.yml"), encoding="utf-8") as f:
    (copy / "mkdocs.yml").write_text(f.read())
  broken = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "s2")],
                          cwd=copy, capture_output=True, text=True, env=env, check=False)
  assert broken.returncode != 0 and "no-such-page.md" in broken.stdout + broken.stderr


def test_every_command_in_the_pages_parses():
  assert len(ALL) >= 40, len(ALL)
  problems = []
  for page, line, _, words in ALL:
    try:
      check_command(words)
    except ValueError as e:
      problems.append(f"{page}:{line}: {e}")
  assert not problems, "\n".join(problems)
  with pytest.raises(ValueError, match="--tile_sise"):   # a renamed flag is caught
    check_command(["run", "--input", "x", "--output", "y", "--tile_sise", "512"])


def test_the_commands_of_the_pages_run_on_demo_data(tmp_path, monkeypatch):
  """Each page's runnable blocks in a fresh folder that holds only the models (and the
  demo images for the pages that start from `make demo`'s), in the order they appear."""
  ran = 0
  for page in _task_pages():
    blocks = [(line, words) for line, reason, commands in _blocks(page) if reason is None
              for words in commands]
    if not blocks:
      continue
    sandbox = tmp_path / page.replace("/", "_")
    sandbox.mkdir()
    (sandbox / "models").mkdir()   # what the pages write under models/ stays here
    os.symlink(os.path.join(REPO_ROOT, "models", "demo"), sandbox / "models" / "demo")
    monkeypatch.chdir(sandbox)
    if page != "README.md":
      assert hrnet_beam(["scenes", "--demo", "--output", "demo-output/images"]) == 0
    for line, words in blocks:
      status = hrnet_beam(list(words))
      assert status == 0, f"{page}:{line}: hrnet-beam {' '.join(words)} exited {status}"
      ran += 1
  assert ran >= 20, ran
  reasons = {reason for page in _task_pages() for _, reason, _ in _blocks(page) if reason}
  assert all(len(reason) > 10 for reason in reasons), reasons
