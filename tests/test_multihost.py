"""Two real processes on 127.0.0.1 (CPU collectives) run a classic config as a two-host job: each feeds its own
half of every global batch, only process 0 writes the outputs, and both killed after a checkpoint resume."""
import json
import os
import signal

import numpy as np
import pytest

from multihost_util import launch

ARGS = ["--config", "configs/quickstart.py", "--config.train.steps_per_task=16", "--config.model.hidden=[32]",
        "--config.scenario.num_tasks=2", "--config.checkpoint.every_steps=8", "--config.eval.every_steps=0",
        "--no_progress"]


def _launch(workdir, **env):
  outs = launch(["run.py", *ARGS, "--workdir", str(workdir)], num_processes=2, env=env)
  return outs


def _results(workdir):
  r = json.loads((workdir / "results.json").read_text())
  r.pop("timing")
  return r


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  w = tmp_path_factory.mktemp("mh") / "run"
  outs = _launch(w)
  for i, o in enumerate(outs):
    assert o.returncode == 0, f"process {i}:\n{o.stderr[-3000:]}"
  return w, outs


def test_two_processes_match_one_and_write_each_output_once(two_process_run, tmp_path):
  import cl_jax
  from cl_jax.cli import build_config
  w, outs = two_process_run
  assert all("mesh {'data': 2, 'fsdp': 1}" in o.stdout for o in outs)  # one device per process, one mesh
  config, _ = build_config(ARGS + ["--workdir", str(tmp_path / "one")])
  one = cl_jax.run(config, str(tmp_path / "one"), progress=False)
  two = _results(w)
  # Same global batches in the same order; only the reduction order of the two halves differs.
  np.testing.assert_allclose(two["accuracy_matrix"], one.accuracy_matrix, atol=0.02)
  lines = (w / "metrics.jsonl").read_text().splitlines()
  train = [json.loads(l) for l in lines if '"train"' in l]
  assert [r["step"] for r in train] == list(range(1, 33))  # each step once (not once per process)
  ref = [r["loss"] for r in one.metrics("train")]
  np.testing.assert_allclose([r["loss"] for r in train], ref, rtol=2e-3, atol=2e-4)
  assert len(os.listdir(w / "tensorboard")) == 1
  assert sorted(os.listdir(w / "checkpoints" / "tasks")) == ["16", "32"]
  assert not (w / ".lock").exists()


def test_both_processes_killed_after_a_checkpoint_resume_to_the_same_results(two_process_run, tmp_path):
  w, _ = two_process_run
  crashed = tmp_path / "crashed"
  killed = _launch(crashed, CL_JAX_TEST_KILL_AT_STEP="27")  # mid-task 2, after the rolling checkpoint at 24
  assert all(o.returncode == -signal.SIGKILL for o in killed), [o.stderr[-2000:] for o in killed]
  resumed = _launch(crashed)
  for i, o in enumerate(resumed):
    assert o.returncode == 0, f"process {i}:\n{o.stderr[-3000:]}"
    assert "from step 24" in o.stdout
  assert _results(crashed) == _results(w)
  assert (crashed / "metrics.jsonl").read_bytes() == (w / "metrics.jsonl").read_bytes()
