"""Start-up: from launching `run.py` on Split MNIST to its first training step, in fresh processes.

  python benchmarks/startup.py --data_path ../shared/data/mnist.npz              # cold cache, then 2 warm launches
  python benchmarks/startup.py --data_path ../shared/data/mnist.npz --warm 5     # more warm launches
  python benchmarks/startup.py --data_path ../shared/data/mnist.npz --profile /tmp/startup.prof   # cProfile a warm one

Each launch is the real command line, `run.py --config configs/split_mnist.py --config.data.path=... --workdir
<new dir>`, run by `python -c` with one hook: the task loop's fused-chunk call is wrapped to take timestamps (the
child exits right after its second chunk). Nothing is preloaded: the clock starts in this process right before the
child is spawned, so interpreter start and every import count. Phases (seconds from launch):

  imports      `cl_jax.cli` imported (jax, the config system)
  built        the run's plan is ready: config validated, workdir checked, data loaded and put on device, model,
               optimizer, sharded state, jitted programs (compiled on the first call, below)
  eval row 0   the accuracy row before training is written (its program compiled or read from the cache)
  dispatched   the first fused chunk is compiled (or read from the cache) and enqueued: training starts
  first step   dispatched + one step (the second chunk's time / K)

The first launch runs with an empty persistent compilation cache (a fresh `CL_JAX_COMPILATION_CACHE` directory),
the next ones with the cache it filled: what a user's second launch of a config sees. The data file's own caches
(cl_jax.data.sources) are left as they are; `--cold_data` clears them before the first launch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
marks, cpu = {}, {}
def mark(name):
  marks.setdefault(name, time.time())
  cpu.setdefault(name, time.process_time())
from cl_jax.cli import main
mark("imports")
from cl_jax.data import device
original = device.maybe_device_plan

def instrumented(plan, config, setup):
  plan = original(plan, config, setup)
  mark("built")
  real_chunk, real_eval = plan.train_chunk, plan.evaluate
  calls = []

  def evaluate(state, t):
    out = real_eval(state, t)
    mark("eval row 0")
    return out

  def train_chunk(state, t, k, n):
    import jax
    t0 = time.time()
    state, metrics = real_chunk(state, t, k, n)
    if not calls:
      mark("dispatched")
    jax.block_until_ready(metrics)
    calls.append((t0, time.time(), n))
    if len(calls) == 2:
      (a0, a1, n1), (b0, b1, n2) = calls
      marks["step"] = (b1 - b0) / n2
      marks["chunk"] = n1
      marks["cpu"] = cpu
      print("STARTUP " + json.dumps(marks), flush=True)
      if os.environ.get("CL_JAX_STARTUP_PROFILE"):
        raise SystemExit(0)  # unwinds, so cProfile writes its file
      os._exit(0)
    return state, metrics

  plan.train_chunk, plan.evaluate = train_chunk, evaluate
  return plan

device.maybe_device_plan = instrumented
sys.exit(main(sys.argv[1:]))
"""

PHASES = ("imports", "built", "eval row 0", "dispatched")


def launch(data_path: str, env: dict, workdir: str, profile: str | None = None) -> dict:
  child = os.path.join(os.path.dirname(workdir), "startup_child.py")
  with open(child, "w") as f:
    f.write(CHILD)
  argv = ["--config", "configs/split_mnist.py", f"--config.data.path={data_path}", "--workdir", workdir]
  prefix = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
  env = dict(env, CL_JAX_STARTUP_PROFILE="1") if profile else env
  t0 = time.time()
  out = subprocess.run(prefix + [child] + argv, env=env, capture_output=True, text=True, cwd=ROOT)
  line = [l for l in out.stdout.splitlines() if l.startswith("STARTUP ")]
  if not line:
    raise RuntimeError(f"the child did not reach its first step (exit {out.returncode}):\n{out.stderr[-3000:]}")
  marks = json.loads(line[0][len("STARTUP "):])
  times = {p: marks[p] - t0 for p in PHASES}
  times["first step"] = times["dispatched"] + marks["step"]
  times["step"] = marks["step"]
  times["cpu"] = marks["cpu"]["dispatched"]  # CPU seconds of the child (all threads) up to the dispatch
  return times


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "mnist.npz"))
  p.add_argument("--warm", type=int, default=2, help="launches after the cold one (warm compilation cache)")
  p.add_argument("--cold_data", action="store_true", help="clear the data file caches before the first launch")
  p.add_argument("--profile", default="", help="cProfile the last warm launch into this file")
  a = p.parse_args()
  data = os.path.abspath(a.data_path)
  if a.cold_data:
    from cl_jax.data import sources
    sources.clear_file_cache()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
               CL_JAX_COMPILATION_CACHE=os.path.join(tmp, "jax_cache"))
    for i in range(1 + a.warm):
      label = "cold cache" if i == 0 else "warm cache"
      profile = a.profile if (a.profile and i == a.warm) else None
      times = launch(data, env, os.path.join(tmp, f"run{i}"), profile)
      load = os.getloadavg()[0]
      rows.append((label, times, load))
      print(f"{label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items() if k not in ("step", "cpu"))
            + f" (CPU {times['cpu']:.2f} s to the dispatch; step {1e3 * times['step']:.2f} ms; load {load:.1f})",
            flush=True)
  warm = [t["first step"] for label, t, _ in rows if label == "warm cache"]
  print(f"## Start-up of Split MNIST (run.py, launch -> first training step) on {os.cpu_count()} CPUs")
  print("| launch | " + " | ".join(PHASES) + " | first step | CPU s to dispatch | load |")
  print("|---" * (len(PHASES) + 4) + "|")
  for label, t, load in rows:
    print(f"| {label} | " + " | ".join(f"{t[p]:.2f} s" for p in PHASES) + f" | **{t['first step']:.2f} s** | "
          f"{t['cpu']:.2f} | {load:.1f} |")
  if warm:
    print(f"warm launches: median {statistics.median(warm):.2f} s, best {min(warm):.2f} s (goal <= 5 s)")
  print(json.dumps({"rows": [{"launch": label, **t, "load": load} for label, t, load in rows]}))


if __name__ == "__main__":
  main()
