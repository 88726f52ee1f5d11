"""Progressive neural networks (Rusu et al. 2016, "Progressive Neural Networks", arXiv:1606.04671).

One column (an MLP) per task. Column k's hidden layer i receives its own previous layer and, through
lateral connections, the previous layer of every earlier column (Rusu et al. eq. 1):

    h_i^(k) = relu( W_i^(k) h_{i-1}^(k) + b_i^(k) + sum_{j<k} U_i^(k:j) h_{i-1}^(j) ),   h_0^(j) = x,

and likewise for the output layer (no relu). Earlier columns are frozen: their activations enter column
k through `stop_gradient`, and `trainable_mask` hands only column k to the optimizer, so the outputs of
tasks 0..k-1 are bit-for-bit unchanged by training task k -- zero forgetting by construction, paid for
with parameters that grow with every task (column k adds k lateral matrices per layer).

Params are a plain pytree {'columns': {0: column_0, 1: column_1, ...}}; `add_column` grows it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cl_jax.models import FunctionalModel, functional, param_count

Params = Any


class Column(nnx.Module):
  """One column: dense_i (W_i, b_i), head, and laterals[i][j] = U_{i+1}^(k:j) (no bias) from column j."""

  def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, num_prev: int, *,
               rngs: nnx.Rngs):
    sizes = [in_features, *hidden]
    self.dense = nnx.List([nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs) for i in range(len(hidden))])
    self.head = nnx.Linear(sizes[-1], num_outputs, rngs=rngs)
    # Laterals feed layers 1..L (the last hidden layers and the head) from earlier columns' layer below.
    outs = [*hidden[1:], num_outputs]
    self.laterals = nnx.List([
        nnx.List([nnx.Linear(hidden[i], outs[i], use_bias=False, rngs=rngs) for _ in range(num_prev)])
        for i in range(len(hidden))])


class ProgressiveNet(nnx.Module):
  """`num_columns` columns; `__call__(x, task)` returns each example's own column's logits.

  With `task=None` the newest column answers. `column_logits(x)` returns all columns' logits [K, B, C]
  (what a task router compares).
  """

  def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, num_columns: int = 1, *,
               rngs: nnx.Rngs):
    if num_columns < 1:
      raise ValueError(f"num_columns={num_columns}: expected >= 1")
    if len(hidden) < 1:
      raise ValueError("hidden=(): a progressive column needs at least one hidden layer")
    self.num_hidden = len(hidden)
    self.columns = nnx.List([Column(in_features, hidden, num_outputs, k, rngs=rngs) for k in range(num_columns)])

  def column_logits(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    acts = []  # acts[j] = [h_0^(j), h_1^(j), ..., h_L^(j)] for finished columns, gradients stopped
    logits = []
    for k, col in enumerate(self.columns):
      h = [x]
      for i in range(self.num_hidden + 1):
        layer = col.dense[i] if i < self.num_hidden else col.head
        pre = layer(h[i])
        if i >= 1:
          for j in range(k):
            pre = pre + col.laterals[i - 1][j](acts[j][i])
        h.append(jax.nn.relu(pre) if i < self.num_hidden else pre)
      logits.append(h[-1])
      acts.append([jax.lax.stop_gradient(a) for a in h])
    return jnp.stack(logits)

  def __call__(self, x: jax.Array, task: jax.Array | None = None) -> jax.Array:
    all_logits = self.column_logits(x)
    if task is None:
      return all_logits[-1]
    task = jnp.clip(jnp.asarray(task, jnp.int32), 0, all_logits.shape[0] - 1)
    return jnp.take_along_axis(all_logits, task[None, :, None], axis=0)[0]


@dataclasses.dataclass(frozen=True)
class ProgressiveSpec:
  in_features: int
  hidden: tuple
  num_outputs: int


def build_progressive(spec: ProgressiveSpec, seed: int = 0, num_columns: int = 1) -> tuple[FunctionalModel, Params]:
  """A fresh network with `num_columns` columns: (FunctionalModel, params)."""
  return functional(ProgressiveNet(spec.in_features, tuple(spec.hidden), spec.num_outputs, num_columns,
                                   rngs=nnx.Rngs(seed)))


def num_columns(params: Params) -> int:
  return len(params["columns"])


def add_column(spec: ProgressiveSpec, params: Params, seed: int) -> tuple[FunctionalModel, Params]:
  """Grows the network by one freshly initialised column; earlier columns' params are kept as they are."""
  k = num_columns(params)
  model, fresh = build_progressive(spec, seed, k + 1)
  cols = dict(fresh["columns"])
  for j in range(k):
    old, new = params["columns"][j], fresh["columns"][j]
    if jax.tree.structure(old) != jax.tree.structure(new):
      raise ValueError(f"params column {j} does not match spec {spec}")
    cols[j] = old
  return model, {**fresh, "columns": cols}


def trainable_mask(params: Params, column: int) -> Params:
  """True on column `column`'s params only (for `build_optimizer(..., trainable=...)`)."""
  if not 0 <= column < num_columns(params):
    raise ValueError(f"column={column}: the network has {num_columns(params)} columns")
  return {**jax.tree.map(lambda _: False, params),
          "columns": {j: jax.tree.map(lambda _, j=j: j == column, c) for j, c in params["columns"].items()}}


def column_param_counts(params: Params) -> list[int]:
  """Parameters added by each column (column k: its own layers plus k lateral matrices per layer)."""
  return [param_count(params["columns"][j]) for j in range(num_columns(params))]


def expected_column_param_count(spec: ProgressiveSpec, k: int) -> int:
  """Closed form: sum_i (n_{i-1} n_i + n_i) + k * sum_{i>=1} n_{i-1} n_i with n = (in, hidden..., out)."""
  n = [spec.in_features, *spec.hidden, spec.num_outputs]
  own = sum(n[i] * n[i + 1] + n[i + 1] for i in range(len(n) - 1))
  lateral = sum(n[i] * n[i + 1] for i in range(1, len(n) - 1))
  return int(own + k * lateral)


__all__ = ["Column", "ProgressiveNet", "ProgressiveSpec", "build_progressive", "add_column", "num_columns",
           "trainable_mask", "column_param_counts", "expected_column_param_count"]
