"""Start N real JAX processes on 127.0.0.1 (CPU collectives through gloo): a multi-host launch on one machine.

  outs = launch(["run.py", "--config", "configs/quickstart.py", ...], num_processes=2)

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (what `cl_jax.sharding.
maybe_initialize_distributed` reads) and one CPU device unless `devices_per_process` says otherwise.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(argv, num_processes: int = 2, env: dict | None = None, timeout: float = 600,
           devices_per_process: int = 1) -> list[subprocess.CompletedProcess]:
  """Runs `python *argv` as `num_processes` cooperating processes; returns their CompletedProcess, by process id."""
  port = free_port()
  base = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
              JAX_NUM_PROCESSES=str(num_processes),
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", **(env or {}))
  procs = []
  for i in range(num_processes):
    procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=dict(base, JAX_PROCESS_ID=str(i)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      try:
        stdout, stderr = p.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:  # a hung process: kill it, keep what it printed, report returncode None
        p.kill()
        stdout, stderr = p.communicate()
        p.returncode = None
      outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs
