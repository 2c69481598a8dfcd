"""The layout's one rule, checked on the imports themselves: reusable transforms never import
the job or the commands, the job never imports the commands, and neither imports the
stand-in model code."""
import ast
import os

import pytest

from conftest import REPO_ROOT

FORBIDDEN = {
    "transforms": ("pipeline",),
    "pipeline/job": ("pipeline.cli", "pipeline.standin"),
}


def _imports(path: str) -> set:
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
  return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_import_crosses_the_layout(folder):
  checked = 0
  for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        bad = [module for module in _imports(path)
               if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder])]
        assert not bad, f"{os.path.relpath(path, REPO_ROOT)} imports {bad}"
        checked += 1
  assert checked >= 5
