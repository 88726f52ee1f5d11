"""Models as Flax NNX modules, used functionally: `FunctionalModel.apply(params, x, task)`."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cl_jax.models.cnn import CNN
from cl_jax.models.mlp import MLP

Params = Any


# Parameter dtypes by name (`lm.param_dtype`): float32, or bfloat16 with a float32 master copy in the optimizer.
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_params(params, dtype):
  """Floating leaves cast to `dtype` (a name in PARAM_DTYPES or a dtype); others unchanged."""
  dtype = PARAM_DTYPES.get(dtype, dtype)
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionalModel:
  """A module split into its static graph and a plain params pytree (nested dicts of arrays).

  `apply(params, x, task)` rebuilds the module from `params` (trace-time only under jit) and calls it:
  every train step, loss, strategy and merge sees `params` as an ordinary pytree.
  """
  graphdef: Any

  def apply(self, params: Params, x: jax.Array, task: jax.Array | None = None, method: str | None = None):
    module = nnx.merge(self.graphdef, params)
    if method is not None:
      return getattr(module, method)(x)
    return module(x, task)


def functional(module: nnx.Module) -> tuple[FunctionalModel, Params]:
  """Splits an NNX module into a `FunctionalModel` and its params as a pure dict pytree."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(nnx.to_pure_dict(rest)):
    raise ValueError("cl_jax models keep all their state in nnx.Param (no batch stats, no RNG state)")
  return FunctionalModel(graphdef), nnx.to_pure_dict(params)


def build_model(model_config, input_shape, num_outputs: int, num_heads: int, seed: int):
  """Builds the model a config names: `model.name` in {mlp, cnn}. Returns (FunctionalModel, params)."""
  model, init = model_initializer(model_config, input_shape, num_outputs, num_heads)
  return model, init(seed)


def model_initializer(model_config, input_shape, num_outputs: int, num_heads: int):
  """(FunctionalModel, init): `init(seed) -> params` is one jitted program (vmappable over seeds).

  Creating the module eagerly runs every initializer as its own small XLA program (seconds for a 2x400 MLP on
  CPU); here the module is traced once, abstractly for its graph and inside `jit` for its values, and the
  compiled init lands in the persistent compilation cache. Same values as `MLP(..., rngs=nnx.Rngs(seed))`.
  """
  def make(seed) -> nnx.Module:
    rngs = nnx.Rngs(jax.random.key(seed))  # what nnx.Rngs(int) does, and traceable
    if model_config.name == "mlp":
      return MLP(int(np.prod(input_shape)), tuple(model_config.hidden), num_outputs, num_heads=num_heads,
                 init=model_config.get("init", "lecun"), rngs=rngs)
    if model_config.name == "cnn":
      return CNN(input_shape, tuple(model_config.channels), int(model_config.cnn_hidden), num_outputs,
                 num_heads=num_heads, rngs=rngs)
    raise ValueError(f"model.name={model_config.name!r}: expected one of 'mlp', 'cnn'")

  model, _ = functional(nnx.eval_shape(lambda: make(0)))

  @jax.jit
  def init(seed):
    return functional(make(seed))[1]

  return model, init


def param_count(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


__all__ = ["MLP", "CNN", "FunctionalModel", "functional", "build_model", "model_initializer", "param_count"]
