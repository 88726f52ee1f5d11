"""A run killed mid-task (SIGKILL) and restarted on its workdir ends with the same results.json."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/quickstart.py", "--config.train.steps_per_task=20", "--config.model.hidden=[32]",
        "--config.checkpoint.every_steps=8", "--config.eval.every_steps=10", "--no_progress"]


def _run(workdir, kill_at=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("CL_JAX_TEST_KILL_AT_STEP", None)
  if kill_at is not None:
    env["CL_JAX_TEST_KILL_AT_STEP"] = str(kill_at)
  return subprocess.run([sys.executable, "run.py", *ARGS, "--workdir", str(workdir)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  r.pop("timing")
  return r


def test_kill_mid_task_then_resume_gives_identical_results(tmp_path):
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  assert _run(straight).returncode == 0
  # Step 50 is in task 3 (20 steps a task); the newest checkpoint then is the rolling one at step 48.
  killed = _run(crashed, kill_at=50)
  assert killed.returncode == -signal.SIGKILL
  assert not (crashed / "results.json").exists()
  resumed = _run(crashed)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resuming" in resumed.stdout and "from step 48" in resumed.stdout
  assert _results(crashed) == _results(straight)
  # The metrics log has each step exactly once, as the uninterrupted run's.
  def train_steps(w):
    with open(w / "metrics.jsonl") as f:
      return [(r["step"], round(r["loss"], 6)) for r in map(json.loads, f) if r["type"] == "train"]
  assert train_steps(crashed) == train_steps(straight)
  assert len(train_steps(straight)) == 100
