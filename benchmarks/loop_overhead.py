"""Loop overhead: a whole `run.py` run against steps x the bare fused train step, both timed in this process.

  python benchmarks/loop_overhead.py --data_path ../shared/data/mnist.npz            # Split MNIST, 2000 it./task
  python benchmarks/loop_overhead.py --data_path ../shared/data/mnist.npz --on_device false   # the grain path
  python benchmarks/loop_overhead.py --quickstart                                    # configs/quickstart.py

The run is `cl_jax.run(config, workdir)` exactly as `run.py` calls it (configs/split_mnist.py: 5 tasks, 2000
iterations each, batch 128, evaluation every 500 steps, checkpoints every 1000, logging every 50), timed from the
call to its return: building, compiling, the accuracy row before training, evaluations, checkpoints, reports.
It runs `--repeats` times in a row (the first may compile; later ones hit the persistent compilation cache).

The bare fused step is the same jitted train step, `lax.scan`-fused over K pre-staged device batches
(`Setup.multi_step`): pure compute, no input pipeline, no logging. Its per-step median (timed before and after
the runs, pooled, so load from other processes hits both) times the run's number of steps is the floor; the
ratio run / floor is the loop's overhead factor (goal: <= 1.15).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def make_config(a):
  from cl_jax.config import set_overrides
  if a.quickstart:
    from configs.quickstart import get_config
    c = get_config(f"strategy={a.strategy}")
  else:
    from configs.split_mnist import get_config
    c = get_config(f"strategy={a.strategy}")
    c.data.path = a.data_path
    c.train.steps_per_task = a.steps
  set_overrides(c, {"data.on_device": a.on_device})
  return c


def bare_step_seconds(config, k: int = 50, repeats: int = 5) -> float:
  """Median seconds per step of the jitted train step fused over k pre-staged device batches."""
  import jax
  import numpy as np
  from cl_jax import sharding
  from cl_jax.train.loop import build
  setup = build(config)
  b = config.train.batch_size
  shape = setup.scenario.input_shape
  rng = np.random.default_rng(0)
  batches = sharding.put_batch({"x": rng.random((k, b, *shape), np.float32),
                                "y": rng.integers(0, 2, (k, b)).astype(np.int32),
                                "task": np.zeros((k, b), np.int32)}, setup.mesh, stacked=True)
  state = setup.state
  state, m = setup.multi_step(state, batches)   # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = setup.multi_step(state, batches)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / k)
  return times


def timed_run(config, workdir):
  import cl_jax
  t = time.perf_counter()
  results = cl_jax.run(config, workdir, overwrite=True, progress=False)
  return time.perf_counter() - t, results


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "mnist.npz"))
  p.add_argument("--steps", type=int, default=2000, help="iterations per task (Split MNIST)")
  p.add_argument("--strategy", default="naive")
  p.add_argument("--on_device", default="auto", help="data.on_device: auto | true | false")
  p.add_argument("--quickstart", action="store_true", help="configs/quickstart.py instead of Split MNIST")
  p.add_argument("--repeats", type=int, default=2, help="whole runs, one after the other")
  a = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from cl_jax import compilation_cache
  compilation_cache.enable()
  config = make_config(a)
  samples = bare_step_seconds(config)
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(a.repeats):
      seconds, results = timed_run(config, os.path.join(tmp, f"run{i}"))
      runs.append((seconds, results))
  samples += bare_step_seconds(config)
  step = statistics.median(samples)
  total_steps = sum(runs[0][1].extra["steps_per_task"])
  floor = total_steps * step
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  name = "configs/quickstart.py" if a.quickstart else f"configs/split_mnist.py ({a.steps} it./task)"
  print(f"## Loop overhead: {name}, strategy {a.strategy}, data.on_device={a.on_device}")
  print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
  print(f"bare fused step: {1e3 * step:.3f} ms (median of {len(samples)}; min {1e3 * min(samples):.3f}, "
        f"max {1e3 * max(samples):.3f}); {total_steps} steps -> floor {floor:.1f} s")
  for i, (seconds, results) in enumerate(runs):
    timing = results.extra["timing"]
    tasks = " ".join(f"{s:.1f}" for s in timing["task_seconds"])
    print(f"run {i + 1}: {seconds:.1f} s wall (loop {timing['total_seconds']:.1f} s; per task {tasks}) -> "
          f"ratio {seconds / floor:.2f}x (loop only {timing['total_seconds'] / floor:.2f}x); ACC {results.acc:.4f}")
  print(json.dumps({"bare_step_ms": 1e3 * step, "steps": total_steps,
                    "runs_s": [s for s, _ in runs], "ratios": [s / floor for s, _ in runs], "load": load}))


if __name__ == "__main__":
  main()
