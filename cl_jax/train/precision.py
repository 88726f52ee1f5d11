"""Parameter / optimizer-state dtype policy: float32 throughout, or bfloat16 params with a float32 master copy.

  param_dtype='float32'   (the default) params, gradients and optimizer state in float32; the model's
                          `compute_dtype` only decides the matmuls' dtype. 16 bytes per parameter with Adam
                          (params 4 + m 4 + v 4 + gradient 4).
  param_dtype='bfloat16'  the train state's params (what the forward pass, checkpoints of params and the
                          strategies read) are bfloat16; the optimizer keeps a float32 master copy and runs on it
                          (Micikevicius et al. 2018, "Mixed precision training"): 2 + 4 (master) + 8 (Adam) bytes,
                          and small updates still accumulate (a bf16 weight alone drops any update below 2^-8 of
                          its magnitude). Each step the params become the master rounded to bfloat16.

`with_master_weights(inner)` wraps any optax optimizer; `cast_params(params, dtype)` casts floating leaves.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_jax.models import PARAM_DTYPES, cast_params  # noqa: F401  (the params' dtypes live with the models)


def check_param_dtype(value, key: str = "lm.param_dtype") -> None:
  if value not in PARAM_DTYPES:
    raise ValueError(f"{key}={value!r}: expected one of {sorted(PARAM_DTYPES)}")


class MasterWeightsState(NamedTuple):
  master: Any  # float32 copy of the params: what the optimizer updates
  inner: Any   # the wrapped optimizer's state (over the master copy)


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run on a float32 master copy of low-precision params (kept in the optimizer state).

  update(g, state, params): master' = master + inner_update(float32(g), master); the returned update is
  float32(bf16(master')) - float32(params), so `optax.apply_updates` (which adds in float32, then casts back)
  lands the params exactly on the rounded master.
  """

  def init(params):
    master = cast_params(params, jnp.float32)
    return MasterWeightsState(master, inner.init(master))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_master_weights needs the params in update()")
    updates, inner_state = inner.update(cast_params(grads, jnp.float32), state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    out = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32), master, params)
    return out, MasterWeightsState(master, inner_state)

  return optax.GradientTransformation(init, update)


def optimizer_for(inner: optax.GradientTransformation, param_dtype: str) -> optax.GradientTransformation:
  """The optimizer for params of `param_dtype`: `inner` itself for float32, master-weighted otherwise."""
  check_param_dtype(param_dtype, "param_dtype")
  return inner if param_dtype == "float32" else with_master_weights(inner)


__all__ = ["PARAM_DTYPES", "check_param_dtype", "cast_params", "with_master_weights", "optimizer_for",
           "MasterWeightsState"]
