"""The shape of the code: layers with arrows pointing down, no import circles, one run skeleton, kinds as parts."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _graph():
  grimp = pytest.importorskip("grimp")
  return grimp.build_graph("cl_jax", cache_dir=None)


def _cycles(graph) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), i.e. every import circle."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.find_modules_directly_imported_by(v):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for module in sorted(graph.modules):
    if module not in index:
      visit(module)
  return found


def test_no_two_modules_import_each_other_directly_or_through_others():
  """Function-level imports count: a lazy import is still an arrow."""
  assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
  class Toy:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    modules = set(edges)

    def find_modules_directly_imported_by(self, m):
      return self.edges[m]
  assert _cycles(Toy()) == [["a", "b", "c"]]


def test_import_contract_holds():
  """.importlinter: the layers, top to bottom (the same check .ci/run makes with `lint-imports`)."""
  pytest.importorskip("importlinter")
  out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  assert "1 kept, 0 broken" in out.stdout


def test_one_run_skeleton_plus_one_entry_per_kind():
  """`def run(` appears once in the skeleton and once in each kind's module, nowhere else in cl_jax."""
  from cl_jax.kinds import KINDS
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "cl_jax")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        with open(path) as f:
          n = len(re.findall(r"^\s*def run\(", f.read(), flags=re.M))
        if n:
          found[os.path.relpath(path, ROOT)] = n
  expected = {"cl_jax/runner.py": 1, **{module.replace(".", "/") + ".py": 1 for module in KINDS.values()}}
  assert found == expected
