"""The notebooks in notebooks/ run top to bottom, and are committed without outputs.

Each notebook reads two environment variables in its first code cell: CL_JAX_NOTEBOOK_QUICK=1 shrinks every run to
a few steps (the cells and the API they call are what is tested here, not the numbers of a full run), and
CL_JAX_NOTEBOOK_WORKDIR puts the run directories under pytest's tmp_path. The kernel starts in the repository root,
as `jupyter` does when started there. The assertions read the runs' results.json files and the executed outputs, and
hold them to numbers computed outside the notebook: each notebook run's results equal a direct `cl_jax.run` of the
config in its workdir (same seed, same numbers), summaries equal the formulas applied to the matrix here, and runs
that share a prefix of training share those rows exactly.
"""
from __future__ import annotations

import json
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


def rerun(path: pathlib.Path, workdir: pathlib.Path):
  """`cl_jax.run` of the config the notebook's run in `path` saved (its config.json), in a fresh `workdir`."""
  import ml_collections

  import cl_jax
  with open(path / "config.json") as f:
    config = ml_collections.ConfigDict(json.load(f))
  return cl_jax.run(config, str(workdir), progress=False)


def summaries(r):
  """ACC, BWT and forgetting of an accuracy matrix (row 0 before training, row j after task j), written out here."""
  import numpy as np
  r = np.asarray(r, np.float64)
  t = r.shape[1]
  acc = r[t].mean()
  bwt = np.mean([r[t, i] - r[i + 1, i] for i in range(t - 1)])
  forgetting = np.mean([max(r[j, i] for j in range(i + 1, t)) - r[t, i] for i in range(t - 1)])
  return acc, bwt, forgetting


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
  import numpy as np
  nb = execute("quickstart", tmp_path / "nb", monkeypatch)
  names = ("naive", "ewc", "replay", "swapped")
  runs = {name: results_json(tmp_path / "nb" / name) for name in names}
  for name, r in runs.items():
    matrix = np.asarray(r["accuracy_matrix"])
    assert matrix.shape == (6, 5), name  # row 0 before training, one row per task of the 5
    np.testing.assert_allclose((r["acc"], r["bwt"], r["forgetting"]), summaries(matrix), atol=1e-12, err_msg=name)
  # The notebook's run is the library's run: the same config through cl_jax.run gives the same numbers (one run
  # of the four: each rerun costs as much as the notebook's own).
  direct = rerun(tmp_path / "nb" / "swapped", tmp_path / "direct")
  np.testing.assert_allclose(direct.accuracy_matrix, runs["swapped"]["accuracy_matrix"], atol=1e-6)
  assert runs["swapped"]["strategy"] == "ewc+replay"
  # Row 0 (before training: the same init) is the same for every strategy; EWC's penalty is zero until its first
  # anchor, so after task 1 it equals naive fine-tuning too.
  naive = np.asarray(runs["naive"]["accuracy_matrix"])
  for name in ("ewc", "replay", "swapped"):
    np.testing.assert_array_equal(np.asarray(runs[name]["accuracy_matrix"])[0], naive[0], err_msg=name)
  np.testing.assert_allclose(np.asarray(runs["ewc"]["accuracy_matrix"])[1], naive[1], atol=1e-6)
  # Class-incremental: naive fine-tuning forgets every old task; a replay buffer keeps some of them.
  assert runs["naive"]["bwt"] < -0.5
  assert runs["replay"]["acc"] > runs["naive"]["acc"] + 0.1
  assert len(outputs(nb, "image/png")) >= 4  # the three .plot() figures and the swapped strategy's
  table = [md for md in outputs(nb, "text/markdown") if md.startswith("| strategy | ACC (%) | BWT (%)")]
  assert table and f"| `replay` | {100 * runs['replay']['acc']:.1f} |" in table[0]
  assert f"| `naive` | {100 * runs['naive']['acc']:.1f} | {100 * runs['naive']['bwt']:+.1f} |" in table[0]


def test_continual_pretraining(tmp_path, monkeypatch):
  nb = execute("continual_pretraining", tmp_path / "nb", monkeypatch)
  r = results_json(tmp_path / "nb" / "cpt_70_30")
  assert r["kind"] == "lm" and r["mixture"] == "70_30"
  base, final = r["test"]["base"], r["test"]["final"]
  # 70% code in every adaptation batch: the code perplexity falls even in a 20-step run.
  assert final["domain/perplexity"] < base["domain/perplexity"]
  # The monitor's record is consistent with itself: the kept step is one it evaluated, and every general metric has
  # a test interval of the kept and the final model against the base (lower end <= estimate <= upper end).
  assert r["best_step"] in [h["step"] for h in r["history"]]
  for model in ("best", "final"):
    for metric, interval in r["test_intervals"][model].items():
      assert metric in base and interval["lo"] <= interval["estimate"] <= interval["hi"], (model, metric)
  assert outputs(nb, "image/png")  # the regression monitor's figure
  tables = [h for h in outputs(nb, "text/html") if "<th>adapted (70/30)</th>" in h]
  assert tables and tables[0].count("<tr>") == 4  # header + one row per prompt
  # The imported Hugging Face model (tests/fixtures/hf/llama): adapted the same way, exported back in HF layout.
  assert len(tables) == 2 and results_json(tmp_path / "nb" / "cpt_hf")["kind"] == "lm"
  assert (tmp_path / "nb" / "cpt_hf" / "hf" / "model.safetensors").is_file()


def test_merging(tmp_path, monkeypatch):
  import numpy as np
  nb = execute("merging", tmp_path, monkeypatch)
  seq = np.asarray(results_json(tmp_path / "sequential")["accuracy_matrix"])
  spec = {k: np.asarray(results_json(tmp_path / f"specialist_{k}")["accuracy_matrix"]) for k in (2, 3)}
  assert seq.shape == spec[2].shape == spec[3].shape == (4, 3)
  # Every model trains task 1 from the same init first, so rows 0-1 agree exactly; a task a specialist skips
  # (train.tasks) changes nothing, so its row repeats the one before.
  np.testing.assert_array_equal(spec[2][:2], seq[:2])
  np.testing.assert_array_equal(spec[3][:2], seq[:2])
  np.testing.assert_array_equal(spec[2][2], seq[2])  # specialist 2 is the sequential run up to task 2
  np.testing.assert_array_equal(spec[2][3], spec[2][2])
  np.testing.assert_array_equal(spec[3][2], spec[3][1])
  # Each specialist trained task 1 and its own task only (train.tasks=[1, k]): better on its task than the other.
  assert spec[2][-1][1] > spec[3][-1][1] + 0.2 and spec[3][-1][2] > spec[2][-1][2] + 0.2
  for method in ("task_arithmetic", "ties", "slerp"):
    r = results_json(tmp_path / f"merged_{method}")
    matrix = np.asarray(r["accuracy_matrix"])
    assert matrix.shape == (1, 3) and r["acc"] == matrix.mean(), method
    # The merge runner re-evaluates each input: the task loop's rows at the referenced boundaries, exactly.
    inputs = {ref.rsplit("/", 1)[-1]: row for ref, row in r["inputs"].items()}
    if "sequential:task=1" in inputs:
      np.testing.assert_allclose(inputs["sequential:task=1"], seq[1], atol=1e-9)
    np.testing.assert_allclose(inputs["specialist_2:task=2"], spec[2][2], atol=1e-9)
    np.testing.assert_allclose(inputs["specialist_3:task=3"], spec[3][3], atol=1e-9)
  ties = results_json(tmp_path / "merged_ties")
  direct = rerun(tmp_path / "merged_ties", tmp_path / "direct_ties")
  np.testing.assert_allclose(direct.accuracy_matrix, ties["accuracy_matrix"], atol=1e-9)
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
