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
