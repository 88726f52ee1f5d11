"""The notebooks in notebooks/ run top to bottom, and are committed without outputs.

Each notebook reads two environment variables in its first code cell: CL_JAX_NOTEBOOK_QUICK=1 shrinks every run to
a few steps (the cells and the API they call are what is tested here, not the numbers of a full run), and
CL_JAX_NOTEBOOK_WORKDIR puts the run directories under pytest's tmp_path. The kernel starts in the repository root,
as `jupyter` does when started there. The assertions read the runs' results.json files and the executed outputs.
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = ("quickstart", "continual_pretraining", "merging")


def execute(name: str, workdir: pathlib.Path, monkeypatch) -> nbformat.NotebookNode:
  """Runs notebooks/<name>.ipynb in a fresh kernel; a cell that raises fails the test with its traceback."""
  monkeypatch.setenv("CL_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("CL_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  return nb


def outputs(nb, mime: str) -> list[str]:
  """Every output of `mime` (e.g. 'image/png', 'text/markdown') in the executed notebook, in order."""
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if mime in out.get("data", {}):
        found.append(out["data"][mime])
  return found


def results_json(path: pathlib.Path) -> dict:
  with open(path / "results.json") as f:
    return json.load(f)


def test_committed_notebooks_have_no_outputs():
  paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
  assert sorted(p.stem for p in paths) == sorted(NAMES)
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == "code":
        assert cell.outputs == [], f"{path.name} cell {i}: outputs are committed (clear them before committing)"
        assert cell.execution_count is None, f"{path.name} cell {i}: execution_count={cell.execution_count}"


def test_quickstart(tmp_path, monkeypatch):
  nb = execute("quickstart", tmp_path, monkeypatch)
  runs = {name: results_json(tmp_path / name) for name in ("naive", "ewc", "replay", "swapped")}
  for name, r in runs.items():
    matrix = r["accuracy_matrix"]
    assert len(matrix) == len(matrix[0]) + 1, name  # row 0 before training, one row per task
    assert 0.0 <= r["acc"] <= 1.0 and -1.0 <= r["bwt"] <= 1.0, (name, r["acc"], r["bwt"])
  # Class-incremental: naive fine-tuning forgets every old task; a replay buffer keeps some of them.
  assert runs["naive"]["bwt"] < -0.5
  assert runs["replay"]["acc"] > runs["naive"]["acc"] + 0.1
  assert len(outputs(nb, "image/png")) >= 4  # the three .plot() figures and the swapped strategy's
  table = [md for md in outputs(nb, "text/markdown") if md.startswith("| strategy | ACC (%) | BWT (%)")]
  assert table and f"| `replay` | {100 * runs['replay']['acc']:.1f} |" in table[0]


def test_continual_pretraining(tmp_path, monkeypatch):
  nb = execute("continual_pretraining", tmp_path, monkeypatch)
  r = results_json(tmp_path / "cpt_70_30")
  assert r["kind"] == "lm" and r["mixture"] == "70_30"
  base, final = r["test"]["base"], r["test"]["final"]
  # 70% code in every adaptation batch: the code perplexity falls even in a 20-step run.
  assert final["domain/perplexity"] < base["domain/perplexity"]
  assert outputs(nb, "image/png")  # the regression monitor's figure
  tables = [h for h in outputs(nb, "text/html") if "<th>adapted (70/30)</th>" in h]
  assert tables and tables[0].count("<tr>") == 4  # header + one row per prompt
  # The imported Hugging Face model (tests/fixtures/hf/llama): adapted the same way, exported back in HF layout.
  assert len(tables) == 2 and results_json(tmp_path / "cpt_hf")["kind"] == "lm"
  assert (tmp_path / "cpt_hf" / "hf" / "model.safetensors").is_file()


def test_merging(tmp_path, monkeypatch):
  nb = execute("merging", tmp_path, monkeypatch)
  spec = {k: results_json(tmp_path / f"specialist_{k}")["accuracy_matrix"][-1] for k in (2, 3)}
  # Each specialist trained task 1 and its own task only (train.tasks=[1, k]): better on its task than the other.
  assert spec[2][1] > spec[3][1] + 0.2 and spec[3][2] > spec[2][2] + 0.2
  for method in ("task_arithmetic", "ties", "slerp"):
    matrix = results_json(tmp_path / f"merged_{method}")["accuracy_matrix"]
    assert len(matrix) == 1 and len(matrix[0]) == 3 and all(0.0 <= a <= 1.0 for a in matrix[0]), method
  assert len(outputs(nb, "image/png")) == 2  # the per-task bars and the lambda sweep


def test_train_tasks_trains_only_the_listed_tasks(tmp_path):
  """`train.tasks` (what the merging notebook's specialists use): unlisted tasks run 0 steps, are still evaluated."""
  import numpy as np

  import cl_jax
  from conftest import tiny_config
  config = tiny_config(steps=20)
  config.scenario.kind = "task"
  config.train.tasks = [1, 3]
  r = cl_jax.run(config, str(tmp_path / "run"), progress=False)
  assert r.extra["steps_per_task"] == [20, 0, 20, 0, 0]
  m = np.asarray(r.accuracy_matrix)
  np.testing.assert_array_equal(m[2], m[1])  # task 2 skipped: the same params, the same accuracies
  assert m[3, 2] > m[2, 2] + 0.2            # task 3 trained
