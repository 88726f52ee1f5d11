"""Timing helpers shared by the benchmarks: medians over repeats, peak matmul FLOP/s measured in-run."""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, repeats: int = 7, warmup: int = 2) -> float:
  """Median wall time of `fn()` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def peak_matmul_flops(n: int = 2048, repeats: int = 7) -> float:
  """The machine's achievable float32 matmul FLOP/s: a jitted n x n x n matmul (2 n^3 FLOPs), median."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / median_seconds(lambda: f(a, b).block_until_ready(), repeats)


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 1) -> dict:
  """Median seconds of each `fns[name]()`, timed round-robin so that load from other processes hits all alike.

  Ratios between entries (ours vs a baseline, achieved vs peak) are what the benchmarks report: on a shared
  machine they are far steadier than any absolute time.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_fn(n: int = 2048):
  """(fn, flops): a jitted n x n x n float32 matmul, the yardstick for the machine's peak FLOP/s."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return (lambda: f(a, b).block_until_ready()), 2 * n ** 3


def emit(lines, out: str | None) -> str:
  """A benchmark's report: printed, and written to `out` (its folder made) unless `out` is empty."""
  text = "\n".join(lines) + "\n"
  print(text)
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
  return text
