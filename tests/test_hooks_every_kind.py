"""Every strategy hook type through every kind that allows it, each with an effect the test can see.

A probe strategy (registered for the test) has every hook, each leaving a mark that would be missing if a kind's
step, loop or evaluator dropped it:

  loss             adds 7 to the loss: every logged step has loss - task_loss = 7
  grads            zeroes the gradient of the first task that trains: no param moves during it
  update           counts steps and reports each step's largest param change (a host callback): one report per
                   trained step, in order, with the count the state carried
  after_task       counts task ends; each call sees every earlier update and task end (the state flows through)
  reset_optimizer  Adam restarts at the next task: its first step moves the largest-gradient param by the full
                   learning rate (without the reset, Adam's moments, zero after the frozen task, make it ~0.5 lr)
  predict          (kinds whose evaluator scores it) always class 0: the accuracy rows show it, not the model

Kinds: classic (all six), cit (all but predict), lm (all but predict; its first task trains 0 steps, so the
reset has no optimizer state to clear and is not measured there). merge trains nothing and allows no strategy.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cl_jax
from cl_jax.strategies import REGISTRY, Strategy, StrategyEntry

LOSS_OFFSET = 7.0
RECORD: dict = {}


def _probe(frozen_task: int, with_predict: bool):
  def build(config, learner):
    del config, learner

    def init(params, task_info):
      return {"updates": jnp.zeros((), jnp.int32), "tasks": jnp.zeros((), jnp.int32)}

    def loss(loss_fn):
      def wrapped(params, batch, ctx):
        value, aux = loss_fn(params, batch, ctx)
        return value + LOSS_OFFSET, aux
      return wrapped

    def grads(state, g, params, batch, ctx, loss_fn):
      return jax.tree.map(lambda x: jnp.where(ctx.task_index == frozen_task, jnp.zeros_like(x), x), g)

    def update(state, info):
      moved = [jnp.max(jnp.abs(n.astype(jnp.float32) - o.astype(jnp.float32)))
               for n, o in zip(jax.tree.leaves(info.new_params), jax.tree.leaves(info.old_params))]
      jax.debug.callback(lambda t, u, d: RECORD["steps"].append((int(t), int(u), float(d))), info.task_index,
                         state["updates"], jnp.max(jnp.stack(moved)), ordered=True)
      return {"updates": state["updates"] + 1, "tasks": state["tasks"]}

    def after_task(state, params, task_data, rng):
      RECORD["after_task"].append((int(task_data.task_index), int(state["updates"]), int(state["tasks"])))
      return {"updates": state["updates"], "tasks": state["tasks"] + 1}

    def predict(state, params, x, task, task_index):
      num_classes = 10
      return jnp.zeros((x.shape[0], num_classes)).at[:, 0].set(1.0)

    return Strategy(init=init, loss=loss, after_task=after_task, name="probe", grads=grads, update=update,
                    reset_optimizer=True, predict=predict if with_predict else None)
  needs = {"step_hooks", "reset_optimizer"} | ({"predict", "class_logits"} if with_predict else set())
  return StrategyEntry(build, {}, None, (), frozenset(needs))


@pytest.fixture
def probe(monkeypatch):
  RECORD.clear()
  RECORD.update(steps=[], after_task=[])

  def register(frozen_task=0, with_predict=False):
    monkeypatch.setitem(REGISTRY, "probe", _probe(frozen_task, with_predict))
    return "probe"
  return register


def _train_records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if '"type": "train"' in line]


def _check_training_hooks(workdir, steps, frozen_task, reset_task=None):
  """loss / grads / update marks; `steps` per task (0 for a task that trains nothing)."""
  records = [r for r in _train_records(workdir) if r.get("phase", "") != "pretrain"]
  assert len(records) == sum(steps) and records
  for r in records:  # loss
    assert r["loss"] - r["task_loss"] == pytest.approx(LOSS_OFFSET, abs=1e-4)
  trained = [(t, n) for t, n in enumerate(steps) for _ in range(n)]
  assert [(t, u) for t, u, _ in RECORD["steps"]] == [(t, i) for i, (t, _) in enumerate(trained)]  # update
  moved = np.array([d for _, _, d in RECORD["steps"]])
  task_of = np.array([t for t, _ in trained])
  assert np.all(moved[task_of == frozen_task] == 0.0)  # grads: the frozen task moves nothing
  assert np.all(moved[task_of != frozen_task] > 0.0)
  if reset_task is not None:  # reset_optimizer: Adam's first step after the frozen task moves by the full lr
    first = int(np.argmax(task_of == reset_task))
    lr = records[first]["lr"]
    assert moved[first] == pytest.approx(lr, rel=2e-3)


def test_classic_runs_every_hook(probe, tmp_path):
  from conftest import tiny_config
  c = tiny_config(probe(frozen_task=0, with_predict=True), steps=12)
  c.scenario.class_order, c.data.on_device = [], "auto"
  results = cl_jax.run(c, str(tmp_path / "w"), progress=False)
  _check_training_hooks(tmp_path / "w", [12] * 5, frozen_task=0, reset_task=1)
  # after_task: one call per task, each seeing every earlier update and task end
  assert RECORD["after_task"] == [(t, 12 * (t + 1), t) for t in range(5)]
  # predict: class 0 everywhere; in class-IL Split Digits only task 1 holds class 0 (about half its examples)
  final = results.accuracy_matrix[-1]
  assert 0.4 < final[0] < 0.6 and np.all(final[1:] == 0.0)


def test_cit_runs_every_training_hook(probe, tmp_path):
  from test_cit import tiny_cit_config
  c = tiny_cit_config(strategy=probe(frozen_task=0))
  cl_jax.run(c, str(tmp_path / "w"), progress=False)
  _check_training_hooks(tmp_path / "w", [6, 6], frozen_task=0, reset_task=1)
  assert RECORD["after_task"] == [(0, 6, 0), (1, 12, 1)]


def test_lm_runs_every_training_hook(probe, tmp_path):
  from test_cpt import _tiny
  c = _tiny(regression__threshold=0.5)
  c.strategy = probe(frozen_task=1)  # the domain task: every adaptation step, so the adapted model is the base
  results = cl_jax.run(c, str(tmp_path / "w"), progress=False)
  _check_training_hooks(tmp_path / "w", [0, 20], frozen_task=1)
  assert RECORD["after_task"] == [(0, 0, 0)]  # the LM hands its strategies the general task only
  test = results.extra["test"]
  assert test["final"] == test["base"]  # frozen by the grads hook: the final model is the base


def test_a_kind_refuses_the_hooks_it_cannot_run(probe):
  from cl_jax.errors import ConfigError
  from cl_jax.kinds import validate
  from test_cpt import _tiny
  c = _tiny()
  c.strategy = probe(with_predict=True)
  with pytest.raises(ConfigError, match="kind 'lm' cannot run probe .*needs.*predict"):
    validate(c)
