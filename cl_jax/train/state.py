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
