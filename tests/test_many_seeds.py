"""Many runs as one program: each run equals the same seed (and setting) run alone; results hold every run."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [r for r in map(json.loads, f) if r["type"] == "train"]
  return np.asarray([r["loss"] for r in recs], np.float64)   # [steps] or [steps, runs]


def _config(**overrides):
  # Replay: every run has its own buffer, filled by its own after_task with its own key.
  return tiny_config("replay", steps=12, **{"model.hidden": [32], "replay.capacity": 40, "replay.batch_size": 16,
                                            "train.log_every_steps": 12, **overrides})


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
  from cl_jax import run
  workdir = tmp_path_factory.mktemp("seeds")
  return run(_config(seed=3, **{"train.num_seeds": 3}), str(workdir), progress=False)


@pytest.fixture(scope="module")
def alone_weight_3(tmp_path_factory):
  """One run at replay.weight=3.0: what a sweep's setting, or a one-setting sweep, must equal."""
  from cl_jax import run
  return run(_config(**{"replay.weight": 3.0}), str(tmp_path_factory.mktemp("alone_weight_3")), progress=False)


def test_each_run_equals_its_seed_run_alone(three_seeds, tmp_path):
  from cl_jax import run
  many = _train_losses(three_seeds.workdir)
  assert many.shape == (60, 3)
  for i in (0, 2):  # seeds 3 and 5
    alone = run(_config(seed=3 + i), str(tmp_path / f"alone{i}"), progress=False)
    np.testing.assert_allclose(many[:, i], _train_losses(alone.workdir), rtol=2e-4, atol=1e-5)
    run_record = three_seeds.extra["runs"][i]
    assert run_record["seed"] == 3 + i
    np.testing.assert_allclose(run_record["accuracy_matrix"], alone.accuracy_matrix, atol=0.02)
  # The runs differ from each other (own init and data order): the check above could fail.
  assert np.abs(many[:, 0] - many[:, 1]).max() > 1e-2


def test_results_hold_every_run_and_the_spread(three_seeds):
  with open(os.path.join(three_seeds.workdir, "results.json")) as f:
    r = json.load(f)
  assert [run["seed"] for run in r["runs"]] == [3, 4, 5]
  accs = [run["acc"] for run in r["runs"]]
  stats = r["settings"][0]["acc"]
  assert stats["n"] == 3
  assert stats["mean"] == pytest.approx(np.mean(accs))
  assert stats["std"] == pytest.approx(np.std(accs, ddof=1))
  assert stats["ci95"] == pytest.approx(4.303 * np.std(accs, ddof=1) / np.sqrt(3), rel=1e-3)  # t(0.975, 2)
  assert r["acc"] == pytest.approx(stats["mean"])
  np.testing.assert_allclose(r["accuracy_matrix"], np.mean([run["accuracy_matrix"] for run in r["runs"]], 0))


def test_a_sweep_setting_equals_that_setting_run_alone(tmp_path, alone_weight_3):
  from cl_jax import run
  swept = run(_config(**{"train.sweep": "replay.weight=0.0,3.0"}), str(tmp_path / "sweep"), progress=False)
  assert [s["overrides"] for s in swept.extra["settings"]] == [{"replay.weight": 0.0}, {"replay.weight": 3.0}]
  losses = _train_losses(swept.workdir)
  np.testing.assert_allclose(losses[:, 1], _train_losses(alone_weight_3.workdir), rtol=2e-4, atol=1e-5)
  assert np.abs(losses[12:, 0] - losses[12:, 1]).max() > 1e-2   # replay weight matters once the buffer fills


def test_a_one_setting_sweep_sets_its_value_in_a_single_run(tmp_path, alone_weight_3):
  # One seed and one setting run as a plain single run; the sweep's value must still apply.
  from cl_jax import run
  one = run(_config(**{"train.sweep": "replay.weight=3.0"}), str(tmp_path / "one"), progress=False)
  alone = alone_weight_3
  default = run(_config(**{"replay.weight": 0.0}), str(tmp_path / "default"), progress=False)
  np.testing.assert_allclose(_train_losses(one.workdir), _train_losses(alone.workdir), rtol=2e-4, atol=1e-5)
  assert np.abs(_train_losses(one.workdir)[12:] - _train_losses(default.workdir)[12:]).max() > 1e-2
  with open(os.path.join(one.workdir, "results.json")) as f:
    r = json.load(f)
  assert r["overrides"] == {"replay.weight": 3.0} and r["strategy_config"]["replay"]["weight"] == 3.0
  with open(os.path.join(one.workdir, "config.json")) as f:
    assert json.load(f)["train"]["sweep"] == "replay.weight=3.0"   # the config as given, for resume and caches


def test_bad_sweeps_are_config_errors():
  from cl_jax.config import ConfigError
  from cl_jax.kinds import validate
  for sweep, match in (("model.hidden=1,2", "cannot be swept"), ("replay.weight", "expected"),
                       ("replay.nothing=1", "unknown config key"), ("replay.weight=a,b", "not a valid float"),
                       ("replay.weight=-1", "replay.weight")):
    with pytest.raises(ConfigError, match=match):
      validate(_config(**{"train.sweep": sweep}))
  with pytest.raises(ConfigError, match="train.num_seeds"):
    validate(_config(**{"train.num_seeds": 0}))


def test_many_seeds_resume_after_a_kill(tmp_path):
  """SIGKILL mid-task, rerun: the same results.json as the uninterrupted run (device-resident batches)."""
  args = ["--config", "configs/quickstart.py", "--config.train.steps_per_task=20", "--config.model.hidden=[32]",
          "--config.checkpoint.every_steps=8", "--config.eval.every_steps=0", "--config.train.num_seeds=2",
          "--config.data.on_device=true", "--no_progress"]

  def launch(workdir, kill_at=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("CL_JAX_TEST_KILL_AT_STEP", None)
    if kill_at is not None:
      env["CL_JAX_TEST_KILL_AT_STEP"] = str(kill_at)
    return subprocess.run([sys.executable, "run.py", *args, "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

  def results(workdir):
    with open(workdir / "results.json") as f:
      r = json.load(f)
    r.pop("timing")
    return r

  from cl_jax.cli import main  # the uninterrupted run, in this process (same code path as run.py)
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  assert main([*args, "--workdir", str(straight)]) == 0
  assert launch(crashed, kill_at=30).returncode == -signal.SIGKILL
  resumed = launch(crashed)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "from step 28" in resumed.stdout
  assert results(crashed) == results(straight)


def test_vmapped_and_mapped_runs_agree(three_seeds, tmp_path, monkeypatch):
  """Accelerators vmap the runs, CPUs map over them (`seeds.use_vmap`): the same numbers either way."""
  from cl_jax import run
  monkeypatch.setenv("CL_JAX_RUNS", "vmap")
  vmapped = run(_config(seed=3, **{"train.num_seeds": 2}), str(tmp_path / "vmap"), progress=False)
  np.testing.assert_allclose(_train_losses(vmapped.workdir), _train_losses(three_seeds.workdir)[:, :2],
                             rtol=2e-4, atol=1e-5)


def test_seeds_past_the_prng_limit_are_refused():
  """PRNGKey(2**32) is PRNGKey(0): a run of seeds that crosses the limit would silently repeat seed 0's run."""
  from conftest import tiny_config
  from cl_jax.errors import ConfigError
  from cl_jax.kinds import validate
  c = tiny_config(**{"train.num_seeds": 2})
  c.seed = 2**32 - 2
  validate(c)  # seeds 2**32 - 2 and 2**32 - 1: within the limit
  c.seed = 2**32 - 1
  with pytest.raises(ConfigError, match=r"^train.num_seeds=2: the seeds 4294967295..4294967296 pass"):
    validate(c)
