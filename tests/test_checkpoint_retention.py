"""Checkpoint retention (issue 22 item 3): the newest N rolling ones, the newest N task boundaries (pinned steps
kept), and a params-only best that still restores into what evaluation and export read. A toy plan on the one task
loop: a state with an optimizer-like slot, three tasks of 4 steps, evaluations and checkpoints every 2 steps."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cl_jax.checkpoint import Checkpoints, ParamsOnly, abstract_like, params_only, retention
from cl_jax.train.loop import Plan, Verdict, run_tasks, with_finite_flag


class S(NamedTuple):
  step: Any
  params: Any
  opt_state: Any   # a momentum the size of the params: what a params-only checkpoint leaves out


def _step(s, batch):
  g = s.params - batch["y"]
  m = 0.5 * s.opt_state + g
  return S(s.step + 1, s.params - 0.1 * m, m), {"loss": jnp.mean(g ** 2)}


class _Source:
  def __init__(self, t, state):
    self.t, self.i = t, (state or {}).get("i", 0)

  def __next__(self):
    self.i += 1
    return {"y": np.full(8, 1.0 + self.t, np.float32)}

  def get_state(self):
    return {"i": self.i}


def _run(tmp_path, best_steps, steps=(4, 4, 4), **retain):
  """Runs the toy plan; returns (checkpoints, loop result, {step: params at that step's evaluation})."""
  seen = {}

  def evaluate(s, t):
    seen[int(s.step)] = np.asarray(s.params).copy()
    return {"value": float(jnp.mean(s.params))}

  def on_eval(s, step, record):
    return Verdict(best=step in best_steps)

  plan = Plan(state=S(jnp.int32(0), jnp.zeros(8), jnp.zeros(8)), state_sharding=S(None, None, None),
              steps=list(steps), batches=_Source, train_step=jax.jit(with_finite_flag(_step)),
              put_batch=lambda b, stacked: b, evaluate=evaluate, on_eval=on_eval, eval_every=2,
              checkpoint_every=2, log_every=2)
  tmp_path.mkdir()
  ck = Checkpoints(str(tmp_path), keep=retain.pop("keep", 2)).retain(**retain)
  out = run_tasks(plan, str(tmp_path), ck, resume=False, progress=False)
  ck.wait()
  return ck, out, seen


def test_retention_keeps_newest_rolling_and_task_boundaries_with_pinned_steps(tmp_path):
  ck, _, _ = _run(tmp_path / "some", best_steps=(), keep=1, keep_tasks=1, pin=(4,))
  assert ck.rolling.all_steps() == [10]          # mid-task saves at 2, 6, 10: the newest one
  assert sorted(ck.tasks.all_steps()) == [4, 12]  # boundaries 4, 8, 12: the newest, and the pinned 4
  ck.close()


def test_best_checkpoint_holds_params_only_and_restores_them(tmp_path):
  ck, out, seen = _run(tmp_path / "best", best_steps=(2, 6))  # default retention: every boundary, 2 rolling
  assert sorted(ck.tasks.all_steps()) == [4, 8, 12] and sorted(ck.rolling.all_steps()) == [6, 10]
  assert ck.best.all_steps() == [6]
  abstract = abstract_like(out.state, S(None, None, None))
  best, meta = ck.restore(params_only(abstract), kind="best")
  assert isinstance(best, ParamsOnly) and int(best.step) == 6 and meta["task"] == 1
  np.testing.assert_array_equal(np.asarray(best.params), seen[6])
  assert not np.array_equal(seen[6], np.asarray(out.state.params))  # the best is not the final model
  # Only params and step on disk: restoring the whole state from it fails (no optimizer slot was written).
  with pytest.raises(Exception):
    ck.best.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  # A full checkpoint's params alone (what the LM run's test split reads for the base): equal to the saved ones.
  base = ck.restore_params(abstract, "tasks", 8)
  np.testing.assert_array_equal(np.asarray(base.params), seen[8])
  assert int(base.step) == 8
  ck.close()
  ck, _, _ = _run(tmp_path / "none", best_steps=(2,), steps=(2,), keep_best=False)
  assert ck._steps("best") == [] and ck.tasks.all_steps() == [2]
  ck.close()


def test_retention_config_keys_are_validated_and_read():
  from cl_jax.errors import ConfigError
  from cl_jax.kinds import validate
  from cl_jax.lm import default_config
  c = default_config()
  c.checkpoint.keep_tasks, c.checkpoint.keep_best = 3, False
  assert retention(c.checkpoint) == {"keep_tasks": 3, "keep_best": False, "async_save": True}
  assert retention(type("Classic", (), {})())["keep_tasks"] == 0  # a kind without the keys: the defaults
  c.checkpoint.keep_tasks = -1
  with pytest.raises(ConfigError, match="checkpoint.keep_tasks"):
    validate(c)
