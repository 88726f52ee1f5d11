"""Loop overhead: a whole `run.py` run against steps x the bare fused train step, both timed in this process.

  python benchmarks/loop_overhead.py --data_path ../shared/data/mnist.npz            # Split MNIST, 2000 it./task
  python benchmarks/loop_overhead.py --data_path ../shared/data/mnist.npz --on_device false   # the grain path
  python benchmarks/loop_overhead.py --quickstart                                    # configs/quickstart.py
  python benchmarks/loop_overhead.py --startup --data_path ../shared/data/mnist.npz  # launch -> first step
  python benchmarks/loop_overhead.py --overhead_only --data_path ../shared/data/mnist.npz  # the loop's own cost

The run is `cl_jax.run(config, workdir)` exactly as `run.py` calls it (configs/split_mnist.py: 5 tasks, 2000
iterations each, batch 128, evaluation every 500 steps, checkpoints every 1000, logging every 50), timed from the
call to its return: building, compiling, the accuracy row before training, evaluations, checkpoints, reports.
It runs `--repeats` times in a row (the first may compile; later ones hit the persistent compilation cache).

The bare fused step is the same jitted train step, `lax.scan`-fused over 50 pre-staged device batches
(`Setup.multi_step`): pure compute, no input pipeline, no logging. One bare chunk is timed right before each of
the run's own fused chunks (and their time is taken out of the run's), so on a shared machine both see the same
load. The floor is the run's number of steps times the lower of two per-step medians: the bare chunks', and the
run's own fused chunks' (a bare chunk can also share the CPUs with the run's background checkpoint writes, which
are overhead, not compute); run / floor is the loop's overhead factor (goal: <= 1.15). The run's chunks are
synchronised for timing (the loop itself would overlap them with logging), which can only make the run look
slower.

On a loaded machine wall time measures the queue for the CPUs as much as the work, so the same ratio is also
given in CPU time (this process, all threads): run CPU seconds (without the inserted bare chunks) over steps x the
bare chunk's CPU seconds per step. On an idle 2-core machine the two agree when the host work is single-threaded
and the step keeps both cores busy.

`--overhead_only` runs the whole run once with every training chunk made free (each returns the metrics of one
real chunk, whose compute is not counted): the wall and CPU seconds of everything but training, in a fresh
process. Far less noisy than the ratio on a loaded machine, since it does not depend on the step's speed.

`--startup` runs benchmarks/startup.py: a fresh `run.py` launch to its first training step, in phases, with an
empty compilation cache and then with the cache the first launch filled.
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


class BareStep:
  """The jitted train step fused over k pre-staged device batches (`Setup.multi_step`): pure compute."""

  def __init__(self, config, k: int):
    import numpy as np
    from cl_jax import sharding
    from cl_jax.train.loop import build
    setup = build(config)
    b, shape = config.train.batch_size, setup.scenario.input_shape
    rng = np.random.default_rng(0)
    self.k = k
    self.batches = sharding.put_batch({"x": rng.random((k, b, *shape), np.float32),
                                       "y": rng.integers(0, 2, (k, b)).astype(np.int32),
                                       "task": np.zeros((k, b), np.int32)}, setup.mesh, stacked=True)
    self.fn, self.state = setup.multi_step, setup.state
    self.samples = []   # seconds per step
    self.cpu = []       # CPU seconds (this process, all threads) per step
    self()              # compile
    self.samples.clear()
    self.cpu.clear()

  def __call__(self) -> tuple[float, float]:
    """Runs one chunk; returns its (wall, CPU) seconds."""
    import jax
    t, c = time.perf_counter(), time.process_time()
    self.state, m = self.fn(self.state, self.batches)
    jax.block_until_ready(m)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    self.samples.append(seconds / self.k)
    self.cpu.append(cpu / self.k)
    return seconds, cpu


def timed_run(config, workdir, bare: BareStep):
  """The whole run; before each of its fused chunks, one bare chunk is timed (paired samples, same load).

  Returns (run seconds without the inserted bare chunks, results, chunk seconds per step of the run, run CPU
  seconds without the inserted chunks, CPU seconds of the run's own chunks, CPU seconds of the calling thread:
  the host-side work, without XLA's and orbax's worker threads).
  """
  import jax
  import cl_jax
  from cl_jax.data import device
  original = device.maybe_device_plan
  inserted, inserted_cpu, chunk_steps, chunk_cpu, main_cpu = [0.0], [0.0], [], [0.0], [0.0]

  def instrumented(plan, config, setup):
    plan = original(plan, config, setup)
    if plan.train_chunk is None:
      return plan
    real = plan.train_chunk

    def train_chunk(state, t, k, n):
      seconds, cpu = bare()
      inserted[0] += seconds
      inserted_cpu[0] += cpu
      t0, c0 = time.perf_counter(), time.process_time()
      state, metrics = real(state, t, k, n)
      jax.block_until_ready(metrics)
      chunk_steps.append((time.perf_counter() - t0) / n)
      chunk_cpu[0] += time.process_time() - c0
      return state, metrics

    plan.train_chunk = train_chunk
    return plan

  device.maybe_device_plan = instrumented
  try:
    t, c, m = time.perf_counter(), time.process_time(), time.thread_time()
    results = cl_jax.run(config, workdir, overwrite=True, progress=False)
    seconds = time.perf_counter() - t - inserted[0]
    cpu = time.process_time() - c - inserted_cpu[0]
    main_cpu[0] = time.thread_time() - m
  finally:
    device.maybe_device_plan = original
  return seconds, results, chunk_steps, cpu, chunk_cpu[0], main_cpu[0]


def overhead_only(config, workdir) -> dict:
  """The whole run with every training chunk made free: each returns the metrics of one real chunk (whose compute
  is not counted), so what is timed is the loop's own cost — build, compile-cache reads, evaluations, checkpoints,
  records, TensorBoard, results, reports. Returns wall, process CPU and calling-thread CPU seconds."""
  import jax
  import cl_jax
  from cl_jax.data import device
  original = device.maybe_device_plan
  cached, excluded = {}, [0.0, 0.0]

  def instrumented(plan, config, setup):
    plan = original(plan, config, setup)
    real = plan.train_chunk

    def train_chunk(state, t, k, n):
      if n not in cached:
        state, metrics = real(state, t, k, n)
        w, c = time.perf_counter(), time.process_time()
        cached[n] = jax.device_get(metrics)  # the real chunk's compute: not overhead
        excluded[0] += time.perf_counter() - w
        excluded[1] += time.process_time() - c
        return state, metrics
      return state._replace(step=state.step + n), {key: jax.numpy.asarray(v) for key, v in cached[n].items()}

    plan.train_chunk = train_chunk
    return plan

  device.maybe_device_plan = instrumented
  try:
    w, c, m = time.perf_counter(), time.process_time(), time.thread_time()
    cl_jax.run(config, workdir, overwrite=True, progress=False)
    return {"wall_s": time.perf_counter() - w - excluded[0], "cpu_s": time.process_time() - c - excluded[1],
            "thread_cpu_s": time.thread_time() - m, "load": os.getloadavg()[0]}
  finally:
    device.maybe_device_plan = original


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "mnist.npz"))
  p.add_argument("--steps", type=int, default=2000, help="iterations per task (Split MNIST)")
  p.add_argument("--strategy", default="naive")
  p.add_argument("--on_device", default="auto", help="data.on_device: auto | true | false")
  p.add_argument("--quickstart", action="store_true", help="configs/quickstart.py instead of Split MNIST")
  p.add_argument("--repeats", type=int, default=2, help="whole runs, one after the other")
  p.add_argument("--startup", action="store_true", help="time launch -> first step (cold and warm cache)")
  p.add_argument("--overhead_only", action="store_true",
                 help="one run with free training chunks: the loop's own cost (run it in a fresh process)")
  a = p.parse_args()
  if a.startup:  # benchmarks/startup.py: the real run.py launch, in phases
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "startup.py"), "--data_path",
                           a.data_path], check=True)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from cl_jax import compilation_cache
  compilation_cache.enable()
  config = make_config(a)
  if a.overhead_only:
    with tempfile.TemporaryDirectory() as tmp:
      print(json.dumps(overhead_only(config, os.path.join(tmp, "run"))))
    return
  bare = BareStep(config, k=50)
  for _ in range(3):
    bare()
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(a.repeats):
      runs.append(timed_run(config, os.path.join(tmp, f"run{i}"), bare))
  for _ in range(3):
    bare()
  bare_step, step_cpu = statistics.median(bare.samples), statistics.median(bare.cpu)
  # The floor is the faster of the bare step and the run's own fused chunks (the same program with the batch
  # gather inside). A bare chunk timed between two of the run's chunks shares the CPUs with the run's background
  # work (orbax's asynchronous checkpoint writes), which is the run's overhead, not compute: on an idle machine
  # that inflated the bare median to 1.64-1.78 ms against 1.25-1.30 ms for the run's chunks (and its minimum,
  # 1.21-1.26 ms). Taking the lower keeps such interference from hiding overhead.
  run_chunks = [t for r in runs for t in r[2]]
  chunk_step = statistics.median(run_chunks) if run_chunks else float("inf")
  step = min(bare_step, chunk_step)
  total_steps = sum(runs[0][1].extra["steps_per_task"])
  if run_chunks:  # the same for CPU time: the runs' own chunks' CPU seconds per step (median over the runs)
    step_cpu = min(step_cpu, statistics.median(r[4] / total_steps for r in runs))
  floor, floor_cpu = total_steps * step, total_steps * step_cpu
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  name = "configs/quickstart.py" if a.quickstart else f"configs/split_mnist.py ({a.steps} it./task)"
  print(f"## Loop overhead: {name}, strategy {a.strategy}, data.on_device={a.on_device}")
  print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
  print(f"bare fused step: {1e3 * bare_step:.3f} ms (median of {len(bare.samples)} chunks of 50, interleaved with "
        f"the run's chunks; min {1e3 * min(bare.samples):.3f}, max {1e3 * max(bare.samples):.3f}); the runs' own "
        f"fused chunks: {1e3 * chunk_step:.3f} ms/step (median of {len(run_chunks)}); floor: the lower, "
        f"{1e3 * step:.3f} ms x {total_steps} steps = {floor:.1f} s")
  print(f"fused step CPU time: {1e3 * step_cpu:.3f} ms (this process, all threads; the lower of the bare chunks' "
        f"median, {1e3 * statistics.median(bare.cpu):.3f} ms, and the runs' own chunks') -> CPU floor "
        f"{floor_cpu:.1f} s")
  for i, (seconds, results, chunks, cpu, cpu_chunks, cpu_main) in enumerate(runs):
    timing = results.extra["timing"]
    tasks = " ".join(f"{s:.1f}" for s in timing["task_seconds"])
    chunk = f"; its fused chunks {1e3 * statistics.median(chunks):.3f} ms/step" if chunks else ""
    train = (f", of which training ~{statistics.median(chunks) * total_steps:.1f} s (median chunk x steps)"
             if chunks else "")
    print(f"run {i + 1}: {seconds:.1f} s wall{train} (task loop {timing['total_seconds']:.1f} s; per task {tasks})"
          f"{chunk} -> ratio {seconds / floor:.2f}x (task loop only {timing['total_seconds'] / floor:.2f}x); "
          f"CPU {cpu:.1f} s -> CPU ratio {cpu / floor_cpu:.2f}x; ACC {results.acc:.4f}")
    print(f"  CPU outside the training chunks (build, evaluations, checkpoints, records, reports): "
          f"{cpu - cpu_chunks:.2f} s; inside: {cpu_chunks:.1f} s ({1e3 * cpu_chunks / total_steps:.3f} ms/step); "
          f"the calling thread's own CPU (host work): {cpu_main:.2f} s")
  print(json.dumps({"bare_step_ms": 1e3 * bare_step, "run_chunk_step_ms": 1e3 * chunk_step, "floor_step_ms": 1e3 * step,
                    "floor_step_cpu_ms": 1e3 * step_cpu, "steps": total_steps,
                    "runs_s": [r[0] for r in runs], "ratios": [r[0] / floor for r in runs],
                    "runs_cpu_s": [r[3] for r in runs], "cpu_ratios": [r[3] / floor_cpu for r in runs],
                    "cpu_outside_chunks_s": [r[3] - r[4] for r in runs], "main_thread_cpu_s": [r[5] for r in runs],
                    "load": load}))


if __name__ == "__main__":
  main()
