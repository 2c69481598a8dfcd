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


def _import_statements(path: str):
  """(module, names imported from it) per import in the file, top level or not."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module, tuple(alias.name for alias in node.names)


def _imports(path: str) -> set:
  return {module for module, _ in _import_statements(path)}


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


def _module_graph() -> dict:
  """{module: project modules it imports (at the top or inside functions)}, over
  pipeline/, transforms/ and benchmarks/. `from package import name` counts as an import
  of package.name where that is a module; a module's own parent packages are not edges."""
  modules = {}
  for folder in ("pipeline", "transforms", "benchmarks"):
    for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(root, name)
          module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
          modules[module.removesuffix(".__init__")] = path
  graph = {}
  for module, path in modules.items():
    targets = set()
    for imported, names in _import_statements(path):
      targets.add(imported)
      targets.update(f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules)
    graph[module] = {t for t in targets if t in modules and t != module and
                     not module.startswith(t + ".")}
  return graph


def _a_circle(graph: dict):
  """One import circle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    stack.pop()
    state[module] = "done"
    return None
  for module in sorted(graph):
    if module not in state:
      found = visit(module)
      if found:
        return found
  return None


def test_no_module_imports_itself_in_a_circle():
  graph = _module_graph()
  assert len(graph) > 50
  circle = _a_circle(graph)
  assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_check_finds_a_circle():
  assert _a_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _a_circle({"a": {"b"}, "b": set()}) is None


def _module_entries(call, root: str) -> list:
  """The project modules `call` enters, in order: a call into a module from another
  project module is one entry (calls through libraries count from the last project frame)."""
  import sys  # pylint: disable=import-outside-toplevel
  stack, entries = [], []

  def module_of(frame):
    path = frame.f_code.co_filename
    if not path.startswith(root + os.sep) or os.sep + "." in path[len(root):]:
      return None
    return os.path.relpath(path, root)

  def profile(frame, event, _):
    if event == "call":
      module = module_of(frame)
      caller = next((m for m in reversed(stack) if m), None)
      if module and module != caller:
        entries.append(f"{module}:{frame.f_code.co_name}")
      stack.append(module)
    elif event == "return" and stack:
      stack.pop()
  sys.setprofile(profile)
  try:
    call()
  finally:
    sys.setprofile(None)
  return entries


@pytest.mark.parametrize("model", ["tiny_model", "tiny_model_unfused"])
def test_each_concern_of_the_config_is_validated_in_one_pass(model, request, tmp_path):
  """Following the flags through job_config_from_options enters each module once: the
  runner, tiling, inputs, outputs and model each have one pass, not a round trip between
  helpers. labels.py alone is entered twice: a short name is resolved before the model
  loads, and its labels are known only once the model has said its classes."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from pipeline.job.options import HRNetOptions  # pylint: disable=import-outside-toplevel
  from pipeline.job.validate import job_config_from_options  # pylint: disable=import-outside-toplevel
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
  options = HRNetOptions([
      "--input", str(tmp_path / "*.png"), "--output", f"{tmp_path}/out/",
      "--model", request.getfixturevalue(model), "--outputs", "masks,features",
      "--polygons_output", f"{tmp_path}/out/", "--patch_output", f"{tmp_path}/out/",
      "--tta", "flip", "--stats_output", str(tmp_path / "stats.json")])
  entries = [e for e in _module_entries(lambda: job_config_from_options(options), REPO_ROOT)
             if not e.startswith("tests/")]
  modules = [entry.split(":")[0] for entry in entries]
  assert modules[0] == "pipeline/job/validate.py" and len(modules) >= 10, entries
  again = {m: modules.count(m) for m in set(modules)
           if modules.count(m) > (2 if m == "transforms/labels.py" else 1)}
  assert not again, f"entered more than once: {again}; entries: {' -> '.join(entries)}"


def test_the_entry_count_sees_a_round_trip():
  """The tracer itself: a module entered, left and entered again counts twice."""
  from pipeline.job import outputs  # pylint: disable=import-outside-toplevel
  entries = _module_entries(lambda: (outputs.is_directory("a/"), outputs.is_directory("b")),
                            REPO_ROOT)
  assert [e.split(":")[0] for e in entries].count("pipeline/job/outputs.py") == 2, entries
