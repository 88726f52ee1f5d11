"""run.py --config configs/merge.py: merge a run's task checkpoints, evaluate every task, refuse bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cl_jax.cli import main


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  from cl_jax.kinds import base_config
  from cl_jax import run
  c = base_config()
  c.data.name = "digits"
  c.scenario.num_tasks = 2
  c.scenario.kind = "task"
  c.model.hidden = [32]
  c.train.steps_per_task = 30
  c.train.batch_size = 32
  c.eval.batch_size = 256
  workdir = str(tmp_path_factory.mktemp("src") / "run")
  results = run(c, workdir, progress=False)
  return workdir, np.asarray(results.accuracy_matrix)


def test_merge_cli_reproduces_inputs_and_merges(source_run, tmp_path):
  src, matrix = source_run
  out = str(tmp_path / "ties")
  assert main(["--config", f"configs/merge.py:method=ties,run={src},tasks=2", "--workdir", out,
               "--config.merge.density=0.5", "--no_progress"]) == 0
  res = json.load(open(os.path.join(out, "results.json")))
  # The runner's evaluation of each input equals the task loop's accuracy-matrix rows.
  np.testing.assert_allclose(res["inputs"][f"{src}:task=1"], matrix[1], atol=1e-9)
  np.testing.assert_allclose(res["inputs"][f"{src}:task=2"], matrix[2], atol=1e-9)
  assert len(res["accuracy"]) == 2 and os.path.isdir(os.path.join(out, "merged"))
  assert res["provenance"]["process_count"] == 1 and res["provenance"]["config_sha256"]  # every kind records it
  # One results type: the merged model is an accuracy-matrix row, read back by cl_jax.Results.
  import cl_jax
  loaded = cl_jax.Results.load(out)
  assert loaded.kind == "merge" and loaded.accuracy_matrix.shape == (1, 2)
  np.testing.assert_allclose(loaded.accuracy_matrix[0], res["accuracy"])
  assert loaded.acc == pytest.approx(np.mean(res["accuracy"]))
  # A linear merge of one model is that model; the saved merged params load back as a params directory.
  out2 = str(tmp_path / "lin")
  assert main(["--config", "configs/merge.py:method=linear", "--workdir", out2, "--no_progress",
               f"--config.merge.models=['{src}:task=2', '{os.path.join(out, 'merged')}']",
               "--config.merge.weights=[1.0, 0.0]"]) == 0
  res2 = json.load(open(os.path.join(out2, "results.json")))
  np.testing.assert_allclose(res2["accuracy"], matrix[2], atol=1e-9)
  np.testing.assert_allclose(res2["inputs"][os.path.join(out, "merged")], res["accuracy"], atol=1e-9)


@pytest.mark.parametrize("override, message", [
    ("--config.merge.density=1.5", "merge.density"),
    ("--config.merge.method=soup", "merge.method"),
    ("--config.merge.base=/nonexistent/run:task=1", "no such checkpoint"),
])
def test_bad_input_is_refused_before_writing(source_run, tmp_path, capsys, override, message):
  src, _ = source_run
  out = str(tmp_path / "bad")
  assert main(["--config", f"configs/merge.py:method=ties,run={src},tasks=2", "--workdir", out, override]) == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(out)


def test_mismatched_trees_are_refused_before_writing(source_run, tmp_path, capsys):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  src, _ = source_run
  wrong = str(tmp_path / "wrong")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(wrong, {"dense_0": {"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros((32,))}})
  out = str(tmp_path / "bad")
  assert main(["--config", "configs/merge.py:method=linear", "--workdir", out,
               f"--config.merge.models=['{src}:task=2', '{wrong}']"]) == 2
  assert "head" in capsys.readouterr().err  # the path the second tree lacks is named
  assert not os.path.exists(out)


def test_slerp_depth_schedule(source_run, tmp_path, capsys):
  src, matrix = source_run
  out = str(tmp_path / "slerp")
  # t = 0 everywhere (head by `t`, dense_0 by the depth schedule) returns the first model.
  assert main(["--config", f"configs/merge.py:method=slerp,run={src},tasks=2", "--workdir", out, "--config.merge.t=0.0",
               "--config.merge.t_layers=[0.0, 0.0]", "--no_progress"]) == 0
  res = json.load(open(os.path.join(out, "results.json")))
  np.testing.assert_allclose(res["accuracy"], matrix[1], atol=1e-9)
  # t = 1 returns the second; an anchor outside [0, 1] is refused.
  assert main(["--config", f"configs/merge.py:method=slerp,run={src},tasks=2", "--workdir", out + "1",
               "--config.merge.t=1.0", "--config.merge.t_layers=[1.0]", "--no_progress"]) == 0
  res = json.load(open(os.path.join(out + "1", "results.json")))
  np.testing.assert_allclose(res["accuracy"], matrix[2], atol=1e-9)
  capsys.readouterr()
  assert main(["--config", f"configs/merge.py:method=slerp,run={src},tasks=2", "--workdir", out + "2",
               "--config.merge.t_layers=[0.0, 1.5]"]) == 2
  assert "merge.t_layers" in capsys.readouterr().err
