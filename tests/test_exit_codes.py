"""The failure taxonomy (cl_jax/errors.py), each ending produced for real: a full disk mid-run (74, one `error:`
line, the checkpoints before it intact), SIGTERM before jax is imported (75), SIGTERM during a merge run (75, and
the rerun completes), a divergence before the first checkpoint (3, saying so), and a lost peer of a two-process run
(69 within the heartbeat timeout, one `error:` line). The exit-code table of errors.py's docstring and README's are
the same text."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cl_jax import errors, faults
from cl_jax.cli import main
from multihost_util import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Split Digits, 2 tasks x 8 steps, a rolling checkpoint every 4 steps: a real run in about a second.
ARGS = ["--config", "configs/quickstart.py", "--config.scenario.num_tasks=2", "--config.train.steps_per_task=8",
        "--config.model.hidden=[16]", "--config.train.batch_size=32", "--config.checkpoint.every_steps=4",
        "--config.eval.every_steps=0", "--config.train.log_every_steps=4", "--no_progress"]


def error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("error:")]


def results(workdir) -> dict:
  r = json.loads((workdir / "results.json").read_text())
  r.pop("timing")
  r.pop("provenance", None)
  return r


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run: what a resumed run must reproduce, and the merge test's input."""
  w = tmp_path_factory.mktemp("exit") / "straight"
  assert main(ARGS + ["--workdir", str(w)]) == 0
  return w


def test_exit_code_tables_agree():
  table = errors.exit_code_table()
  assert table in errors.__doc__
  with open(os.path.join(ROOT, "README.md")) as f:
    assert table in f.read()
  codes = [code for code, _, _ in errors.EXIT_CODES]
  assert codes == sorted(set(codes))  # one row per code
  for cls in (errors.ConfigError, errors.DivergenceError, errors.WorkdirLocked, errors.PeerLost, errors.IOFailure,
              errors.Preempted):
    assert any(cls.exit_code == code and cls.__name__ in name for code, name, _ in errors.EXIT_CODES), cls


def test_disk_full_mid_run_exits_74_with_one_line_and_the_rerun_resumes(straight, tmp_path, capsys, monkeypatch):
  w = tmp_path / "w"
  monkeypatch.setenv(faults.DISK_FULL_ENV, "6")  # after step 6: the rolling checkpoint of step 4 is on disk
  try:
    code = main(ARGS + ["--workdir", str(w)])
  finally:
    faults.undo()
  err = capsys.readouterr().err
  assert code == errors.IOFailure.exit_code, err[-3000:]
  assert len(error_lines(err)) == 1 and "Traceback" not in err, err[-3000:]
  assert "no space left on device" in error_lines(err)[0] and "ENOSPC" in error_lines(err)[0]
  assert str(w) in error_lines(err)[0]  # the path that failed
  # orbax's tracebacks are not on stderr but in the detail log, which the full workdir could not take: the line says
  # where it went instead.
  detail = re.search(r"library messages? in (\S+)\)$", error_lines(err)[0]).group(1)
  assert not detail.startswith(str(w)) and "Traceback" in open(detail).read()
  os.remove(detail)
  assert (w / "checkpoints" / "rolling" / "4" / "_CHECKPOINT_METADATA").is_file()
  assert not (w / "results.json").exists()
  monkeypatch.delenv(faults.DISK_FULL_ENV)
  assert main(ARGS + ["--workdir", str(w)]) == 0
  out = capsys.readouterr().out
  assert "from step 4" in out  # the checkpoint before the failure was intact, and used
  assert results(w) == results(straight)


def wait_for_handler(proc, signum, timeout=30.0) -> None:
  """Until `proc` catches `signum` (Linux: the SigCgt mask of /proc/PID/status)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{proc.pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
      mask = 0
    if mask >> (signum - 1) & 1:
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.002)
  raise AssertionError("run.py never installed its handler")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/PID/status")
def test_sigterm_before_jax_is_imported_exits_75(tmp_path):
  w = tmp_path / "w"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # -X importtime reports every import on stderr as it finishes: whether jax was imported before the signal.
  proc = subprocess.Popen([sys.executable, "-X", "importtime", "run.py", *ARGS, "--workdir", str(w)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_handler(proc, signal.SIGTERM)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.Preempted.exit_code, err[-3000:]
  assert not any(line.endswith("| jax") for line in err.splitlines())  # jax's import had not finished
  lines = [line for line in err.splitlines() if not line.startswith("import time:")]
  assert lines == [lines[-1]] and lines[-1].startswith("error: preempted by signal 15"), err[-3000:]
  assert not w.exists()  # nothing written


def test_sigterm_during_a_merge_exits_75_and_the_rerun_completes(straight, tmp_path, capsys, monkeypatch):
  out = tmp_path / "merge"
  argv = ["--config", "configs/merge.py:method=linear", f"--config.merge.models=['{straight}:task=2']", "--workdir",
          str(out), "--no_progress"]
  monkeypatch.setenv(faults.SIGNAL_ENV, "0")  # SIGTERM once the merge run holds its workdir
  assert main(argv) == errors.Preempted.exit_code
  err = capsys.readouterr().err
  assert len(error_lines(err)) == 1 and error_lines(err)[0].startswith("error: preempted by signal 15"), err
  assert not (out / "results.json").exists() and not (out / ".lock").exists()
  monkeypatch.delenv(faults.SIGNAL_ENV)
  assert main(argv) == 0
  assert json.loads((out / "results.json").read_text())["method"] == "linear"


def test_divergence_before_the_first_checkpoint_says_so(tmp_path, capsys, monkeypatch):
  w = tmp_path / "w"
  monkeypatch.setenv(faults.NAN_ENV, "2")  # the first checkpoint would be at step 4
  assert main(ARGS + ["--workdir", str(w)]) == errors.DivergenceError.exit_code
  (line,) = error_lines(capsys.readouterr().err)
  assert "diverged" in line and "no checkpoint was written yet" in line and "intact" not in line
  assert not (w / "checkpoints" / "rolling").exists() and not (w / "checkpoints" / "tasks").exists()


def test_a_lost_peer_ends_the_other_process_with_69(tmp_path):
  w = tmp_path / "mh"
  # Process 1 dies alone (SIGKILL) once the run holds its workdir, before its first step (dying later would cost
  # the test its compilations, not change what happens); process 0 then waits in a collective that never completes.
  # Its coordination service notices the missing heartbeats after 1 s, and its supervisor reports it.
  outs = launch(["run.py", *ARGS, "--config.distributed.heartbeat_timeout_s=1", "--workdir", str(w)],
                num_processes=2, env={faults.KILL_ENV: "0:1"}, timeout=120)
  assert outs[1].returncode == -signal.SIGKILL, outs[1].stderr[-3000:]
  survivor = outs[0]
  assert survivor.returncode == errors.PeerLost.exit_code, survivor.stderr[-3000:]  # None: it hung
  assert len(error_lines(survivor.stderr)) == 1, survivor.stderr[-3000:]
  assert error_lines(survivor.stderr)[0].startswith("error: peer process lost")
  assert "Check failure" not in survivor.stderr and "coordination_service" not in survivor.stderr
  # The runtime's own words are kept in the detail log: the coordination service's (its abort) or gloo's (a
  # collective that saw the connection close first, raised as an exception).
  detail = (w / "logs" / "stderr-detail.log").read_text()
  assert "stopped sending heartbeats" in detail or "Connection closed by peer" in detail, detail[-3000:]
