"""Faults a real run survives, each through `python run.py` on the quickstart (Split Digits, 5 tasks x 20 steps):
a crash (SIGKILL) mid-task, preemption (SIGTERM / SIGINT), a corrupt newest checkpoint, a second run on a locked
workdir, a kill before the first checkpoint, divergence, and resuming stateful strategies (EWC's Fisher and
anchors, a replay buffer). Each interrupted run must end as the uninterrupted one: the same results.json (all but
`timing`) and a byte-identical metrics.jsonl."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import metrics_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.train.steps_per_task=20", "--config.model.hidden=[32]", "--config.checkpoint.every_steps=8",
        "--config.eval.every_steps=10", "--no_progress"]
HOOKS = ("CL_JAX_TEST_KILL_AT_STEP", "CL_JAX_TEST_NAN_AT_STEP", "CL_JAX_TEST_SIGNAL_AT_STEP")


def run_py(workdir, config="configs/quickstart.py", extra=(), **hooks):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for k in HOOKS:
    env.pop(k, None)
  env.update({f"CL_JAX_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
  return subprocess.run([sys.executable, "run.py", "--config", config, *ARGS, *extra, "--workdir", str(workdir)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  r.pop("timing")
  return r


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted quickstart run every interrupted one must reproduce."""
  w = tmp_path_factory.mktemp("straight")
  out = run_py(w)
  assert out.returncode == 0, out.stderr[-2000:]
  return w


@pytest.fixture(scope="module")
def killed_at_50(tmp_path_factory):
  """A run SIGKILLed at step 50 (task 3; the newest checkpoint is the rolling one at step 48), left as it died.
  Tests resume (or corrupt, then resume) their own copy of it."""
  w = tmp_path_factory.mktemp("killed") / "w"
  assert run_py(w, kill_at_step=50).returncode == -signal.SIGKILL
  assert not (w / "results.json").exists()
  return w


def copy_of(workdir, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(workdir, w, symlinks=True)
  return w


def assert_same_run(workdir, reference):
  assert results(workdir) == results(reference)
  assert metrics_bytes(workdir) == metrics_bytes(reference)


def test_kill_mid_task_then_resume_gives_identical_results(tmp_path, straight, killed_at_50):
  w = copy_of(killed_at_50, tmp_path)
  out = run_py(w)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Resuming" in out.stdout and "from step 48" in out.stdout
  assert_same_run(w, straight)  # results.json but timing; metrics.jsonl byte for byte (each step once)
  assert len([l for l in metrics_bytes(w).decode().splitlines() if '"train"' in l]) == 100
  # TensorBoard (train scalars every train.log_every_steps = 10 steps): the killed run's step 50 is in its event
  # file, and the resumed run's file starts with a purge at 49 and writes 50 again, so a reader shows each once.
  steps = tensorboard_steps(w / "tensorboard", "train/loss")
  assert steps == list(range(10, 101, 10)), steps


def tensorboard_steps(logdir, tag):
  """The steps of `tag` a TensorBoard reader shows: events in file order, a SessionLog START at step s (what
  `purge_step` writes) dropping the earlier events at steps >= s."""
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted(logdir.iterdir()):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        steps = [s for s in steps if s < event.step]
      elif event.HasField("summary"):
        steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_sigterm_saves_a_checkpoint_exits_75_and_the_rerun_is_identical(tmp_path, straight):
  w = tmp_path / "w"
  # Step 53 is mid-task 3 (20 steps a task), past the rolling checkpoint at 48. The loop stops at the next step
  # boundary (53 one step at a time; the end of the fused chunk when batches are drawn on device).
  out = run_py(w, signal_at_step="53")
  assert out.returncode == 75, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: preempted"), out.stderr[-2000:]
  step = int(re.search(r"at step (\d+)", last).group(1))
  assert 53 <= step < 60 and (w / "checkpoints" / "rolling" / str(step)).is_dir()
  assert not (w / "results.json").exists() and not (w / ".lock").exists()
  again = run_py(w)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"from step {step}" in again.stdout
  assert_same_run(w, straight)
  timing = json.loads((w / "results.json").read_text())["timing"]
  # Wall time adds up across the restart: the interrupted task counts its time before and after it.
  assert len(timing["task_seconds"]) == 5 and 0 < sum(timing["task_seconds"]) <= timing["total_seconds"]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, straight, killed_at_50):
  w = copy_of(killed_at_50, tmp_path)
  newest = w / "checkpoints" / "rolling" / "48"
  blobs = sorted((newest / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(blobs[-1], "r+b") as f:  # a truncated array file
    f.truncate(8)
  (w / "checkpoints" / "rolling" / "56.orbax-checkpoint-tmp-99").mkdir()  # a save killed half-way
  out = run_py(w)
  assert out.returncode == 0, out.stderr[-2000:]
  assert str(newest) in out.stderr and "56.orbax-checkpoint-tmp-99" in out.stderr
  assert "from step 40" in out.stdout  # the task-boundary checkpoint before it
  assert_same_run(w, straight)


def test_checkpoint_without_metadata_is_skipped(tmp_path):
  """In-process: the newest checkpoint lost its metadata file -> restore warns and takes the one before."""
  import jax
  import jax.numpy as jnp
  from cl_jax.checkpoint import Checkpoints, abstract_like
  state = {"w": jnp.arange(4.0)}
  ck = Checkpoints(str(tmp_path))
  ck.save(1, state, {"n": 1}, kind="rolling")
  ck.save(2, jax.tree.map(lambda x: x + 1, state), {"n": 2}, kind="rolling")
  ck.wait()
  os.remove(tmp_path / "checkpoints" / "rolling" / "2" / "_CHECKPOINT_METADATA")
  shard = jax.tree.map(lambda x: x.sharding, state)
  with pytest.warns(UserWarning, match=r"rolling/2 is unreadable \(no _CHECKPOINT_METADATA"):
    restored, meta = ck.restore(abstract_like(state, shard))
  assert meta == {"n": 1} and np.asarray(restored["w"]).tolist() == [0.0, 1.0, 2.0, 3.0]
  assert (tmp_path / "checkpoints" / "unreadable" / "rolling-2").is_dir()
  ck.close()


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
  import socket
  import cl_jax
  from cl_jax.errors import WorkdirLocked
  from cl_jax.workdir import Lock
  from conftest import tiny_config
  w = tmp_path / "w"
  w.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (w / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "start": "t"}))
    with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}"):
      cl_jax.run(tiny_config(steps=5), str(w), progress=False)
    assert sorted(p.name for p in w.iterdir()) == [".lock"]  # untouched
  finally:
    holder.kill()
    holder.wait()
  # The holder is dead now: its lock is stale and the next run takes it over.
  lock = Lock(str(w))
  with pytest.warns(UserWarning, match="stale lock"):
    lock.acquire()
  assert json.loads((w / ".lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (w / ".lock").exists()


def test_second_live_run_on_the_same_workdir_is_refused(tmp_path):
  from cl_jax.errors import WorkdirLocked
  from cl_jax.workdir import Lock
  w = tmp_path / "w"
  with Lock(str(w)):
    with pytest.raises(WorkdirLocked, match="in use by a live run"):
      Lock(str(w)).acquire()


def test_kill_before_the_first_checkpoint_leaves_an_identical_log(tmp_path, straight):
  w = tmp_path / "w"
  # Killed right after step 8, before the first checkpoint (due at step 8) is written.
  assert run_py(w, kill_at_step=8).returncode == -signal.SIGKILL
  assert not (w / "checkpoints" / "rolling" / "8").exists() and (w / "metrics.jsonl").stat().st_size > 0
  out = run_py(w)
  assert out.returncode == 0, out.stderr[-2000:]
  assert_same_run(w, straight)


def test_nan_mid_task_exits_3_keeps_the_checkpoint_and_resumes(tmp_path, straight):
  w = tmp_path / "w"
  out = run_py(w, nan_at_step=50)
  assert out.returncode == 3, out.stderr[-2000:]
  assert "diverged" in out.stderr and re.search(r"step (49|50)", out.stderr)
  rolling = sorted(int(p.name) for p in (w / "checkpoints" / "rolling").iterdir())
  assert rolling[-1] == 48  # nothing of the diverged state was saved
  for line in (w / "metrics.jsonl").read_text().splitlines():
    json.loads(line)  # strict JSON throughout
  again = run_py(w)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "from step 48" in again.stdout
  assert_same_run(w, straight)


def test_huge_lr_diverges_with_a_message_not_infinity(tmp_path):
  import cl_jax
  from cl_jax.errors import DivergenceError
  from conftest import tiny_config
  with pytest.raises(DivergenceError, match="diverged") as e:
    cl_jax.run(tiny_config(steps=20, **{"optim.lr": 1e6}), str(tmp_path / "w"), progress=False)
  assert e.value.exit_code == 3
  text = (tmp_path / "w" / "metrics.jsonl").read_text()
  assert "Infinity" not in text and "NaN" not in text
  assert not (tmp_path / "w" / "results.json").exists()


def test_preemption_flag_restores_the_previous_handlers():
  from cl_jax.train.loop import PreemptionFlag
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with PreemptionFlag() as flag:
    signal.raise_signal(signal.SIGINT)   # Ctrl-C: a flag, not a KeyboardInterrupt mid-step
    assert flag.is_set() and flag.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step boundary
      signal.raise_signal(signal.SIGINT)
  assert {s: signal.getsignal(s) for s in before} == before


def test_ewc_and_replay_resume_mid_task_identically(tmp_path, monkeypatch):
  """A chain holding a Fisher, anchors and a replay buffer, preempted mid-task 3 and resumed in-process."""
  import cl_jax
  from cl_jax.errors import Preempted
  from conftest import tiny_config
  config = lambda: tiny_config("ewc+replay", steps=20, **{"checkpoint.every_steps": 8, "eval.every_steps": 10,
                                                          "replay.capacity": 64, "replay.batch_size": 16})
  straight = cl_jax.run(config(), str(tmp_path / "straight"), progress=False)
  monkeypatch.setenv("CL_JAX_TEST_SIGNAL_AT_STEP", "50")
  with pytest.raises(Preempted):
    cl_jax.run(config(), str(tmp_path / "resumed"), progress=False)
  monkeypatch.delenv("CL_JAX_TEST_SIGNAL_AT_STEP")
  resumed = cl_jax.run(config(), str(tmp_path / "resumed"), progress=False)
  a, b = straight.as_dict(), resumed.as_dict()
  a.pop("timing"), b.pop("timing")
  assert a == b
  assert metrics_bytes(tmp_path / "straight") == metrics_bytes(tmp_path / "resumed")
  naive = cl_jax.run(tiny_config("naive", steps=20), str(tmp_path / "naive"), progress=False)
  assert straight.bwt > naive.bwt  # the strategy state is in play (so resuming it is tested)


def test_unusable_workdir_is_refused_by_path_before_any_work(tmp_path):
  """A workdir that is a file, or lies under a file: WorkdirError (exit 2) naming the path; nothing written."""
  import cl_jax
  from cl_jax.errors import WorkdirError
  from cl_jax.workdir import check_usable
  from conftest import tiny_config
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me")
  for bad, needle in [(a_file, "is a file"), (a_file / "run", "lies under")]:
    with pytest.raises(WorkdirError, match=needle) as e:
      cl_jax.run(tiny_config(steps=5), str(bad), progress=False)
    assert str(a_file) in str(e.value) and e.value.exit_code == 2
  assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(WorkdirError, match="not writable"):
      check_usable(str(locked / "run"))
