"""Step time of each strategy relative to naive, and Fisher time relative to one gradient pass.

  python benchmarks/strategy_overhead.py --data_path ../shared/data/mnist.npz [--steps 40] [--json out.json]

Setting: Split MNIST class-IL, MLP 784-400-400-10, batch 128, Adam (configs/split_mnist.py), the train step
exactly as the task loop compiles it. Every strategy's state is made real first (after_task on task 1: a
Fisher, a teacher, a full buffer) and the steps run on task 2's batches. Each step is timed alone
(block_until_ready), the strategies taking turns step by step; the figure is the median over `--steps`
steps after two warm-up steps.

Fisher: over task 1's training set (~12.7k examples), relative to one plain gradient pass over the same
examples in the same chunks (a jitted scan of jax.grad of the summed cross-entropy); medians of `--repeats`.
The vmap path (automatic chunk size: single examples on CPU) is timed on `--vmap_examples` examples against
a gradient pass over the same examples (it is the slow, general reference).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.config import set_overrides
from cl_jax.data import task_data, train_dataset, train_iterator
from cl_jax.losses import cross_entropy
from cl_jax.strategies.fisher import _chunk, fisher_diagonal
from cl_jax.train.loop import build

STRATEGIES = ("naive", "ewc", "online_ewc", "lwf", "replay", "ewc+replay", "lwf+replay")


def split_mnist_config(strategy: str, data_path: str):
  from configs.split_mnist import get_config
  c = get_config(f"scenario=class,strategy={strategy}")
  set_overrides(c, {"data.path": data_path})
  return c


def prepared_step(strategy: str, data_path: str, steps: int):
  """(step function, state, batches) with the strategy's state made real by after_task on task 1."""
  from cl_jax import sharding
  setup = build(split_mnist_config(strategy, data_path))
  state = setup.state
  sstate = setup.strategy.after_task(state.strategy_state, state.params, task_data(setup.scenario, 0),
                                     jax.random.key(0))
  state = state._replace(strategy_state=jax.device_put(sstate, setup.state_sharding.strategy_state),
                         task_index=jax.device_put(jnp.int32(1), setup.replicated))
  it = train_iterator(train_dataset(setup.scenario, (1,), 128, 0, 1))
  batches = [sharding.put_batch(next(it), setup.mesh) for _ in range(steps + 2)]
  return setup.train_step, state, batches


def step_times(strategies, data_path: str, steps: int) -> dict:
  """Median seconds per step. Strategies take turns step by step, so a load spike on this shared machine
  hits all of them alike instead of whichever happened to be running."""
  prepared = {name: prepared_step(name, data_path, steps) for name in strategies}
  states = {name: p[1] for name, p in prepared.items()}
  times = {name: [] for name in strategies}
  for i in range(steps + 2):
    for name, (step, _, batches) in prepared.items():
      t0 = time.perf_counter()
      states[name], metrics = step(states[name], batches[i])
      jax.block_until_ready((states[name], metrics))
      if i >= 2:   # the first two include compilation
        times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


@functools.partial(jax.jit, static_argnames=("learner",))
def gradient_pass(learner, params, xs, ys, ts, ws, task_index):
  """One plain gradient of the summed loss over all chunks (the yardstick for the Fisher)."""
  def body(acc, chunk):
    x, y, t, w = chunk
    g = jax.grad(lambda p: jnp.sum(w * cross_entropy(learner.logits(p, x, t, task_index), y)))(params)
    return jax.tree.map(jnp.add, acc, g), None
  zeros = jax.tree.map(jnp.zeros_like, params)
  return jax.lax.scan(body, zeros, (xs, ys, ts, ws))[0]


def median_time(fn, repeats):
  jax.block_until_ready(fn())   # compile
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return float(np.median(out))


def fisher_times(data_path: str, repeats: int, vmap_examples: int, chunk: int = 256) -> dict:
  setup = build(split_mnist_config("naive", data_path))
  learner, params = setup.learner, setup.state.params
  data = task_data(setup.scenario, 0)
  x, y, t = jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.task)
  n = x.shape[0]
  xs, ys, ts, ws = _chunk(chunk, x, y, t)
  grad_s = median_time(lambda: gradient_pass(learner, params, xs, ys, ts, ws, jnp.int32(0)), repeats)
  out = {"examples": n, "gradient_pass_s": grad_s}
  for kind in ("exact", "empirical", "sampled"):
    s = median_time(lambda: fisher_diagonal(learner, params, x, y, t, 0, kind=kind, method="dense",
                                            chunk_size=chunk), repeats)
    out[f"dense_{kind}_s"] = s
    out[f"dense_{kind}_x_grad"] = s / grad_s
  m = min(vmap_examples, n)
  xs2, ys2, ts2, ws2 = _chunk(chunk, x[:m], y[:m], t[:m])
  g2 = median_time(lambda: gradient_pass(learner, params, xs2, ys2, ts2, ws2, jnp.int32(0)), repeats)
  for kind in ("exact", "empirical"):
    s = median_time(lambda: fisher_diagonal(learner, params, x[:m], y[:m], t[:m], 0, kind=kind,
                                            method="vmap"), max(1, repeats // 2))
    out[f"vmap_{kind}_x_grad"] = s / g2
  s = median_time(lambda: fisher_diagonal(learner, params, x, y, t, 0, kind="batched", batch_size=128),
                  repeats)
  out["batched_x_grad"] = s / grad_s
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_path", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                          "data", "mnist.npz"))
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--vmap_examples", type=int, default=1024)
  parser.add_argument("--strategies", default=",".join(STRATEGIES))
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus visible), "
        f"load average {os.getloadavg()[0]:.1f}")
  steps = step_times(args.strategies.split(","), args.data_path, args.steps)
  for name, t in steps.items():
    print(f"step {name:12s} {1e3 * t:8.2f} ms  {t / steps['naive']:5.2f}x naive", flush=True)
  fisher = fisher_times(args.data_path, args.repeats, args.vmap_examples)
  print(f"Fisher over {fisher['examples']} examples; one gradient pass {fisher['gradient_pass_s']:.3f} s")
  for k, v in fisher.items():
    if k.endswith("x_grad"):
      print(f"  {k:24s} {v:6.2f}x gradient pass")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"step_seconds": steps, "step_x_naive": {k: v / steps["naive"] for k, v in steps.items()},
                 "fisher": fisher, "load_average": os.getloadavg()[0]}, f, indent=2)


if __name__ == "__main__":
  main()
