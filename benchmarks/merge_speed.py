"""Merge time of a ~100M-parameter pytree per method, relative to one elementwise pass over it.

  python benchmarks/merge_speed.py                 # 1e8 params, 3 models, writes results/merge_speed.md
  python benchmarks/merge_speed.py --params 1e6    # quick check

The tree is `--large` big float32 matrices holding ~98 % of the parameters plus small vectors (biases,
norms), like a transformer's params. The reference is one jitted elementwise pass `a + b` over two
such trees (reads 2 trees, writes 1); a merge of M models reads M + 1 trees (base included) and writes
1, so memory traffic alone puts it at ~(M + 2) / 3 of the reference. Each figure is the median
over `--repeats` timed calls of `cl_jax.merging.merge` (validation and dispatch included) after one
compile-and-warm-up call, each ended with `block_until_ready`. Goal (issue 4): TIES within 5x, with
the sort-free sampled top-k threshold on the large tensors.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax

from benchmarks.common import emit
import jax.numpy as jnp

from cl_jax import merging  # noqa: E402


def make_params(key, n_params: int, n_large: int, scale: float = 1.0):
  """n_large matrices [rows, cols] with ~98 % of n_params, 4 medium matrices with the rest, and two
  cols-wide vectors (bias, norm) per large matrix: 8 + 4 + 16 leaves at the default sizes."""
  cols = 1024 if n_params >= 1e6 else 64
  rows = max(1, int(0.98 * n_params) // (n_large * cols))
  medium_rows = max(1, (n_params - n_large * rows * cols - 2 * n_large * cols) // (4 * cols))
  shapes = {f"layers_{i}/kernel": (rows, cols) for i in range(n_large)}
  shapes.update({f"embed_{i}": (medium_rows, cols) for i in range(4)})
  shapes.update({f"layers_{i}/{v}": (cols,) for i in range(n_large) for v in ("bias", "norm")})
  keys = jax.random.split(key, len(shapes))

  @jax.jit
  def build(keys):
    return {name: scale * jax.random.normal(k, s, jnp.float32) for (name, s), k in zip(shapes.items(), keys)}
  return build(keys)


def timeit(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--params", type=float, default=1e8, help="parameters per model (default 1e8)")
  ap.add_argument("--large", type=int, default=8, help="number of large tensors")
  ap.add_argument("--models", type=int, default=3, help="fine-tuned models merged")
  ap.add_argument("--density", type=float, default=0.2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--exact", action="store_true", help="also time TIES with the exact (sorting) threshold")
  ap.add_argument("--out", default="results/merge_speed.md", help="Markdown output ('' for none)")
  args = ap.parse_args(argv)

  n = int(args.params)
  base = make_params(jax.random.key(0), n, args.large)
  models = [jax.tree.map(jnp.add, base, make_params(jax.random.key(i + 1), n, args.large, 0.01))
            for i in range(args.models)]
  total = sum(x.size for x in jax.tree.leaves(base))
  weights = [1.0 / args.models] * args.models

  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  ref = timeit(lambda: add(base, models[0]), args.repeats)
  runs = [
      ("linear", lambda: merging.merge("linear", None, models, weights=weights)),
      ("task_arithmetic", lambda: merging.merge("task_arithmetic", base, models, weights=weights, lam=1.0)),
      ("ties", lambda: merging.merge("ties", base, models, weights=weights, density=args.density)),
      ("dare_linear", lambda: merging.merge("dare_linear", base, models, weights=weights, density=args.density)),
      ("dare_ties", lambda: merging.merge("dare_ties", base, models, weights=weights, density=args.density)),
      ("slerp", lambda: merging.merge("slerp", None, models[:2], t=0.5)),
  ]
  if args.exact:
    runs.append(("ties (exact sort threshold)", lambda: merging.merge(
        "ties", base, models, weights=weights, density=args.density, threshold="exact")))

  rows = [("elementwise a + b (reference)", ref)]
  for name, fn in runs:
    rows.append((name, timeit(fn, args.repeats)))
    print(f"{name}: {rows[-1][1] * 1e3:.1f} ms", flush=True)

  dev = jax.devices()[0]
  lines = [
      "# Merge speed",
      "",
      f"{total / 1e6:.1f}M float32 parameters per model ({args.large} tensors of "
      f"{base['layers_0/kernel'].size / 1e6:.2f}M, 4 of {base['embed_0'].size / 1e6:.2f}M and "
      f"{len(jax.tree.leaves(base)) - args.large - 4} of {base['layers_0/bias'].size}), "
      f"{args.models} models merged (slerp: 2), density {args.density}; median of {args.repeats} runs.",
      f"Device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s), "
      f"{os.cpu_count()} host cores (1-min load average {os.getloadavg()[0]:.1f} at the end: shared "
      f"machines make every figure noisy), jax {jax.__version__}, {platform.machine()}.",
      "",
      f"Command: `python benchmarks/merge_speed.py --params {args.params:g} --models {args.models} "
      f"--density {args.density} --repeats {args.repeats}{' --exact' if args.exact else ''}`",
      "",
      "| method | median time (ms) | x one elementwise pass |",
      "|---|---:|---:|",
  ]
  lines += [f"| {name} | {t * 1e3:.1f} | {t / ref:.2f} |" for name, t in rows]
  lines += [
      "",
      "TIES finds each large tensor's top-k threshold by bit bisection on a 2^16-entry random sample of",
      "|tau| (no sort; `cl_jax.merging.magnitude_threshold`), so after the thresholds the merge is one",
      "fused pass over base + models. The DARE methods draw one threefry random number per entry and",
      "model; on CPU that hash costs several times the memory pass, on accelerators it is cheap.",
  ]
  emit(lines, args.out)


if __name__ == "__main__":
  main()
