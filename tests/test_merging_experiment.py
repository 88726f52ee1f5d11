"""experiments/merging_vs_sequential.py is configs + cl_jax.run: a tiny end-to-end record, and `model.init_from`."""
import json
import os

import jax
import numpy as np
import pytest

import cl_jax
from cl_jax import checkpoint
from cl_jax.errors import ConfigError
from configs import merging_specialists
from experiments import merging_vs_sequential as experiment

TINY = ["--quick", "--rows", "specialists,sequential", "--hidden", "32", "--base_steps", "40", "--steps", "40",
        "--batch", "32", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("merging")
  out = root / "out" / "merging.md"
  record = experiment.main(TINY + ["--workdir", str(root / "runs"), "--out", str(out)])
  return record, root, out


def test_record_has_accuracies_and_specialists_beat_the_base(run):
  record, _, out = run
  res = record["results"]
  assert set(res) == {"base (task 1 only)", "sequential", *(f"specialist {k} (full FT)" for k in range(2, 6))}
  for name, rows in res.items():
    for kind in ("task_il", "class_il"):
      assert len(rows[kind]) == 5 and all(0.0 <= a <= 1.0 for a in rows[kind]), (name, kind, rows[kind])
  for k in range(2, 6):  # fine-tuned from the base on task k alone: better than the base there
    assert res[f"specialist {k} (full FT)"]["task_il"][k - 1] > res["base (task 1 only)"]["task_il"][k - 1] + 0.1
  assert res["sequential"]["task_il"][4] > res["base (task 1 only)"]["task_il"][4] + 0.1
  with open(os.path.splitext(out)[0] + ".json") as f:
    assert json.load(f)["results"] == res
  assert os.path.isfile(os.path.splitext(out)[0] + ".png")
  assert experiment.main(["--report_only", "--out", str(out)]) is None  # the report rebuilds from the .json


def test_init_from_starts_from_the_named_checkpoint(run, tmp_path):
  _, root, _ = run
  base = str(root / "runs" / "base")
  copy = str(tmp_path / "copy")
  c = merging_specialists.get_config(f"hidden=32,steps=2,batch=32,tasks=5,init_from={base}:task=1")
  r = cl_jax.run(c, copy, overwrite=True, progress=False)
  # Task 1 is not trained here (train.tasks=[5]): after it the model is the base's checkpoint, bit for bit.
  np.testing.assert_allclose(r.accuracy_matrix[1], cl_jax.Results.load(base).accuracy_matrix[1], atol=1e-6)
  for a, b in zip(*(jax.tree.leaves(checkpoint.boundary_params(p, 1)) for p in (base, copy))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ref, message", [("{root}/nowhere", "no such checkpoint or run directory"),
                                          ("{root}/runs/base:task=4", "task=4, but the run has")])
def test_init_from_that_does_not_exist_is_a_config_error(run, tmp_path, ref, message):
  _, root, _ = run
  c = merging_specialists.get_config(f"hidden=32,init_from={ref.format(root=root)}")
  with pytest.raises(ConfigError, match=f"model.init_from=.*{message}"):
    cl_jax.run(c, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")
