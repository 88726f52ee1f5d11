"""The train state: one pytree holding everything a step reads or writes."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
  step: jax.Array          # int32: global step over the whole run
  params: Any
  opt_state: Any
  strategy_state: Any
  rng: jax.Array           # raw uint32[2] PRNG key (checkpoints as a plain array)
  task_index: jax.Array    # int32: the task being trained


def build_state(params, optimizer, strategy_state, rng, mesh):
  """The train state at step 0 in its shardings, and those shardings: the one way every kind builds it.

  Params, optimizer state and strategy state are sharded like the params (`sharding.state_sharding`: over `fsdp`
  along their largest divisible dimension); step, rng and task index are replicated. The optimizer's zeros come
  from one jitted program (eagerly, each leaf would be its own small program).
  """
  import numpy as np

  from cl_jax import sharding
  state = TrainState(step=np.int32(0), params=params, opt_state=jax.jit(optimizer.init)(params),
                     strategy_state=strategy_state, rng=rng, task_index=np.int32(0))
  rep = sharding.replicated(mesh)
  state_sh = sharding.state_sharding(state, mesh)._replace(step=rep, rng=rep, task_index=rep)
  return sharding.put_global(state, state_sh), state_sh
