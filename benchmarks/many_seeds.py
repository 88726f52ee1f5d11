"""N seeds as one program against the same N seeds run one after the other, timed in this process.

  python benchmarks/many_seeds.py --data_path ../shared/data/mnist.npz --num_seeds 10 --steps 200

Both sides are whole `cl_jax.run` calls on configs/split_mnist.py (2x400 MLP, batch 128, class-IL, naive) with
`train.steps_per_task=--steps` (the paper's 2000 is allowed; shorter keeps the sequential side affordable):
  one program one run with `train.num_seeds=N` (the runs vmapped on accelerators, a `lax.map` on CPU),
  sequential  N runs with `seed=0..N-1`, one after the other (each loads its data, builds and evaluates).
A warm-up of each (one vmapped run, one sequential run) comes first, so both sides read compiled programs from
the persistent cache, as a rerun does. Reported: the wall-time ratio vmapped / sequential (goal <= 0.5 for N=10),
and the same ratio over the task loops alone (`timing.total_seconds`: training, evaluation, checkpoints).
The per-run accuracies of both sides are printed too: the same seeds give the same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(a, seed: int = 0, num_seeds: int = 1):
  from configs.split_mnist import get_config
  c = get_config(f"strategy={a.strategy}")
  c.data.path = a.data_path
  c.train.steps_per_task = a.steps
  c.seed = seed
  c.train.num_seeds = num_seeds
  return c


def timed(config, workdir):
  import cl_jax
  t = time.perf_counter()
  r = cl_jax.run(config, workdir, overwrite=True, progress=False)
  return time.perf_counter() - t, r


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "mnist.npz"))
  p.add_argument("--num_seeds", type=int, default=10)
  p.add_argument("--steps", type=int, default=200, help="iterations per task")
  p.add_argument("--strategy", default="naive")
  a = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  n = a.num_seeds
  with tempfile.TemporaryDirectory() as tmp:
    timed(make_config(a, 0, n), os.path.join(tmp, "warm_vmapped"))
    timed(make_config(a, 0), os.path.join(tmp, "warm_sequential"))
    seq = [timed(make_config(a, s), os.path.join(tmp, f"seed{s}")) for s in range(n)]
    vm_seconds, vm = timed(make_config(a, 0, n), os.path.join(tmp, "vmapped"))
  seq_seconds = sum(s for s, _ in seq)
  seq_loop = sum(r.extra["timing"]["total_seconds"] for _, r in seq)
  vm_loop = vm.extra["timing"]["total_seconds"]
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"## Many seeds: Split MNIST 2x400 MLP, {a.strategy}, {a.steps} it./task, N={n}")
  print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
  print(f"sequential: {seq_seconds:.1f} s wall ({seq_seconds / n:.1f} s a run; task loops {seq_loop:.1f} s)")
  print(f"one program: {vm_seconds:.1f} s wall (task loop {vm_loop:.1f} s)")
  print(f"ratio one program / sequential: {vm_seconds / seq_seconds:.3f} wall, {vm_loop / seq_loop:.3f} task loops "
        f"(goal <= 0.5)")
  seq_acc = [r.acc for _, r in seq]
  vm_acc = [run["acc"] for run in vm.extra["runs"]]
  print("ACC per seed, sequential:  " + " ".join(f"{x:.4f}" for x in seq_acc))
  print("ACC per seed, one program: " + " ".join(f"{x:.4f}" for x in vm_acc))
  print(json.dumps({"n": n, "steps": a.steps, "sequential_s": seq_seconds, "vmapped_s": vm_seconds,
                    "ratio_wall": vm_seconds / seq_seconds, "ratio_loop": vm_loop / seq_loop, "load": load,
                    "acc_mean_std": vm.extra["settings"][0]["acc"]}))


if __name__ == "__main__":
  main()
