"""Steps/s of the naive MLP train step (784-400-400-10, batch 128, Adam) and its FLOP/s as a fraction of the
machine's peak float32 matmul FLOP/s, both measured in this run.

  python benchmarks/step_throughput.py [--batch 128] [--steps 200]

Model FLOPs per step: 6 * batch * (weights of the three dense layers) (forward 2, backward 4 FLOPs per weight
per example), the convention of Kaplan et al. 2020 / PaLM's MFU. Two ways to drive the step are timed:
`per-call` (one jitted call per step, as the task loop does by default) and `scan` (K steps fused in one jitted lax.scan, what `train.steps_per_call=K` does in the task loop,
which removes the per-call dispatch overhead that dominates small models on CPU), and `scan` without the
grad / param / update norm metrics (three extra passes over the params).
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import interleaved_medians, matmul_fn
from cl_jax.kinds import base_config
from cl_jax.models import MLP, functional
from cl_jax.strategies import Learner, naive
from cl_jax.train.optim import build_optimizer
from cl_jax.train.schedules import build_schedule
from cl_jax.train.state import TrainState
from cl_jax.train.step import make_train_step, task_loss


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=200, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="results/step_throughput.md")
  a = p.parse_args()

  model, params = functional(MLP(784, (400, 400), 10, rngs=nnx.Rngs(0)))
  learner = Learner(model.apply, lambda task, task_index: None)
  c = base_config()
  schedule = build_schedule(c.optim, 1000, 1)
  opt = build_optimizer(c.optim, schedule)
  step = make_train_step(naive().loss(task_loss(learner)), opt, schedule)
  step_lean = make_train_step(naive().loss(task_loss(learner)), opt, schedule, log_norms=False)
  state = TrainState(jnp.int32(0), params, opt.init(params), (), jax.random.PRNGKey(0), jnp.int32(0))
  rng = np.random.default_rng(0)
  batches = {"x": jnp.asarray(rng.random((a.steps, a.batch, 784), np.float32)),
             "y": jnp.asarray(rng.integers(0, 10, (a.steps, a.batch)), jnp.int32),
             "task": jnp.zeros((a.steps, a.batch), jnp.int32)}

  per_call = jax.jit(step, donate_argnums=0)

  def run_per_call():
    nonlocal state
    for k in range(a.steps):
      state, m = per_call(state, jax.tree.map(lambda x: x[k], batches))
    jax.block_until_ready(state)

  @jax.jit
  def scanned(state, batches):
    return jax.lax.scan(step, state, batches)

  def run_scan():
    nonlocal state
    state, _ = scanned(state, batches)
    jax.block_until_ready(state)

  scanned_lean = jax.jit(lambda s, b: jax.lax.scan(step_lean, s, b))

  def run_scan_lean():
    nonlocal state
    state, _ = scanned_lean(state, batches)
    jax.block_until_ready(state)

  weights = 784 * 400 + 400 * 400 + 400 * 10
  flops_per_step = 6 * a.batch * weights
  mm1024, f1024 = matmul_fn(1024)
  mm2048, f2048 = matmul_fn(2048)
  med = interleaved_medians({"per-call": run_per_call, "scan": run_scan, "scan, no norm metrics": run_scan_lean,
                             "mm1024": mm1024, "mm2048": mm2048}, a.repeats)
  # The larger of the two matmul rates is the peak: the conservative yardstick.
  peak = max(f1024 / med["mm1024"], f2048 / med["mm2048"])
  rows = []
  for name in ("per-call", "scan", "scan, no norm metrics"):
    sec = med[name] / a.steps
    rows.append((name, 1 / sec, flops_per_step / sec, flops_per_step / sec / peak))
  table = ["| driver | steps/s | achieved GFLOP/s | fraction of peak matmul |", "|---|---|---|---|"]
  table += [f"| {n} | {s:.0f} | {f / 1e9:.1f} | {r:.2f} |" for n, s, f, r in rows]
  text = (f"# Naive MLP train step throughput\n\nMLP 784-400-400-10, batch {a.batch}, Adam; "
          f"{flops_per_step / 1e6:.0f} MFLOP per step; peak float32 matmul (best of 1024^3 and 2048^3, timed interleaved with the steps): "
          f"{peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].platform} x{jax.device_count()}. Medians of "
          f"{a.repeats} repeats of {a.steps} steps.\n\n" + "\n".join(table) + "\n\n"
          "Command: `python benchmarks/step_throughput.py`\n")
  print(text)
  if a.out:
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
