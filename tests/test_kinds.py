"""A kind is one module and one line in `cl_jax.kinds.KINDS`: this test module is itself a toy kind.

The toy kind fits y = w_t . x on two regression tasks with the shared parts (`build_state`, `compile_step`,
`task_start`, `run_tasks`); the skeleton (`cl_jax.run`) gives it validation, the workdir policy, resume and
results.json with provenance without a line of its own.
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cl_jax.config import COMMON_SCHEMA, integer, number

# ----------------------------------------------------------------------------- the toy kind's parts

PROVIDES = frozenset({"per_example", "task_ids"})
SCHEMA = {**COMMON_SCHEMA, "toy.steps": integer(1), "toy.lr": number(0.0, low_open=True)}
DIM, TASKS = 4, 2


def default_config():
  c = ml_collections.ConfigDict(dict(kind="toy", seed=0, strategy="naive"))
  c.toy = ml_collections.ConfigDict(dict(steps=40, lr=0.1, batch=16))
  c.train = ml_collections.ConfigDict(dict(log_every_steps=10, divergence_factor=0.0))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2))
  c.lock()
  return c


def check_config(c):
  if c.toy.batch % 2:
    raise ValueError(f"toy.batch={c.toy.batch}: must be even")


class _Source:
  def __init__(self, w, batch, seed, state):
    self.w, self.batch, self.seed = w, batch, seed
    self.step = 0 if state is None else state["step"]

  def __next__(self):
    x = np.random.default_rng([self.seed, self.step]).normal(size=(self.batch, DIM)).astype(np.float32)
    self.step += 1
    return {"x": x, "y": x @ self.w}

  def get_state(self):
    return {"step": self.step}


def build(config):
  import optax

  from cl_jax import sharding
  from cl_jax.strategies import naive
  from cl_jax.train.loop import Plan, task_start
  from cl_jax.train.state import build_state
  from cl_jax.train.step import compile_step
  weights = np.random.default_rng(config.seed).normal(size=(TASKS, DIM)).astype(np.float32)
  mesh = sharding.make_mesh(-1, 1)
  optimizer = optax.sgd(config.toy.lr)
  strategy = naive()

  def loss(params, batch, ctx):
    err = batch["x"] @ params["w"] - batch["y"]
    value = jnp.mean(err ** 2)
    return value, {"task_loss": value}

  state, state_sh = build_state({"w": jnp.zeros(DIM)}, optimizer, strategy.init(None, None),
                                jax.random.PRNGKey(config.seed), mesh)
  step, _ = compile_step(loss, optimizer, lambda s: config.toy.lr, strategy, state_sh, mesh, log_norms=False)

  def evaluate(state, t):
    w = np.asarray(jax.device_get(state.params["w"]))
    return {"accuracy": [float(np.exp(-np.sum((w - weights[i]) ** 2))) for i in range(TASKS)]}

  return Plan(state=state, state_sharding=state_sh, steps=[config.toy.steps] * TASKS, train_step=step,
              batches=lambda t, it: _Source(weights[t], config.toy.batch, config.seed + t, it),
              put_batch=lambda b, stacked: sharding.put_batch(b, mesh, stacked=stacked), evaluate=evaluate,
              begin_task=task_start(strategy, optimizer, state_sh), log_every=config.train.log_every_steps)


def run(plan, ctx):
  from cl_jax.checkpoint import Checkpoints
  from cl_jax.eval.metrics import summarize
  from cl_jax.results import Results
  from cl_jax.train.loop import run_tasks
  with Checkpoints(ctx.workdir) as checkpoints:
    out = run_tasks(plan, ctx.workdir, checkpoints, ctx.resume, ctx.progress, hooks=ctx.hooks)
  r = np.asarray([rec["accuracy"] for rec in out.boundary])
  return Results("toy", ctx.workdir, r, **summarize(r), extra={"steps": int(out.state.step)})


# ----------------------------------------------------------------------------- the tests

@pytest.fixture
def toy_kind(monkeypatch):
  from cl_jax import kinds
  monkeypatch.setitem(kinds.KINDS, "toy", __name__)
  return default_config


def test_a_new_kind_is_one_module_and_one_table_entry(toy_kind, tmp_path):
  import cl_jax
  workdir = tmp_path / "w"
  results = cl_jax.run(toy_kind(), str(workdir), progress=False)
  r = results.accuracy_matrix
  assert r.shape == (TASKS + 1, TASKS) and results.extra["steps"] == 2 * 40
  assert r[1, 0] > 0.95 and r[2, 1] > 0.95 and r[2, 0] < 0.5  # learns each task, forgets the first
  written = json.loads((workdir / "results.json").read_text())
  assert written["kind"] == "toy" and written["accuracy_matrix"] == r.tolist()
  assert len(written["provenance"]["config_sha256"]) == 64
  assert json.loads((workdir / "config.json").read_text())["kind"] == "toy"
  again = cl_jax.run(toy_kind(), str(workdir), progress=False)  # the skeleton's resume: nothing left to train
  np.testing.assert_array_equal(again.accuracy_matrix, r)


def test_the_skeleton_validates_a_new_kind_and_keeps_its_workdir_policy(toy_kind, tmp_path):
  import cl_jax
  from cl_jax.errors import ConfigError, WorkdirError
  c = toy_kind()
  c.toy.lr = -1.0
  with pytest.raises(ConfigError, match=r"toy.lr=-1.0: must be in \(0.0, inf\]"):
    cl_jax.run(c, str(tmp_path / "bad"), progress=False)
  c = toy_kind()
  c.toy.batch = 3
  with pytest.raises(ConfigError, match="toy.batch=3: must be even"):
    cl_jax.run(c, str(tmp_path / "bad"), progress=False)
  assert not (tmp_path / "bad").exists()
  cl_jax.run(toy_kind(), str(tmp_path / "w"), progress=False)
  other = toy_kind()
  other.toy.steps = 5
  with pytest.raises(WorkdirError, match="different config"):
    cl_jax.run(other, str(tmp_path / "w"), progress=False)


def test_an_unknown_kind_is_one_clear_line():
  from cl_jax.errors import ConfigError
  from cl_jax.kinds import validate
  c = ml_collections.ConfigDict(dict(kind="nope"))
  with pytest.raises(ConfigError, match=r"kind='nope': expected one of \['classic', 'lm', 'cit', 'merge'\]"):
    validate(c)
