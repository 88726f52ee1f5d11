"""Progressive networks: earlier columns exactly unchanged by training a new one; linear growth."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cl_jax.losses import cross_entropy
from cl_jax.models import progressive as prog


@pytest.fixture(scope="module")
def split_digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  tasks = []
  for t, classes in enumerate([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]):
    idx = np.where(np.isin(y, classes))[0]
    tr, te = idx[: int(0.7 * len(idx))], idx[int(0.7 * len(idx)):]
    tasks.append(dict(xtr=x[tr], ytr=y[tr], xte=x[te], yte=y[te], t=t))
  return tasks


def _train_column(model, params, column, task, steps=150):
  mask = prog.trainable_mask(params, column)
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  opt = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
  opt_state = opt.init(params)
  x, y = jnp.asarray(task["xtr"]), jnp.asarray(task["ytr"])
  tid = jnp.full((x.shape[0],), column, jnp.int32)

  @jax.jit
  def step(params, opt_state):
    loss, g = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, x, tid), y).mean())(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
  return params


def _acc(model, params, task, column):
  x = jnp.asarray(task["xte"])
  logits = model.apply(params, x, jnp.full((x.shape[0],), column, jnp.int32))
  return float(jnp.mean(jnp.argmax(logits, -1) == task["yte"])), np.asarray(logits)


def test_new_column_leaves_earlier_tasks_exactly_unchanged(split_digits):
  spec = prog.ProgressiveSpec(64, (32, 16), 10)
  model, params = prog.build_progressive(spec, seed=0)
  params = _train_column(model, params, 0, split_digits[0])
  acc0, logits0 = _acc(model, params, split_digits[0], 0)
  assert acc0 > 0.9
  model, params = prog.add_column(spec, params, seed=1)
  # Adding a column does not touch column 0.
  np.testing.assert_array_equal(_acc(model, params, split_digits[0], 0)[1], logits0)
  before = jax.tree.map(np.array, params)
  params = _train_column(model, params, 1, split_digits[1])
  acc1, _ = _acc(model, params, split_digits[1], 1)
  assert acc1 > 0.9
  acc0_after, logits0_after = _acc(model, params, split_digits[0], 0)
  np.testing.assert_array_equal(logits0_after, logits0)
  assert acc0_after == acc0
  jax.tree.map(np.testing.assert_array_equal, params["columns"][0], before["columns"][0])
  # The laterals were trained (column 1 does read column 0).
  lat = params["columns"][1]["laterals"][0][0]["kernel"]
  assert float(jnp.abs(lat - before["columns"][1]["laterals"][0][0]["kernel"]).max()) > 1e-3


def test_column_outputs_depend_on_earlier_columns_through_laterals(split_digits):
  spec = prog.ProgressiveSpec(64, (16, 8), 10)
  model, params = prog.build_progressive(spec, seed=0, num_columns=2)
  x = jnp.asarray(split_digits[0]["xte"][:8])
  one = jnp.ones((8,), jnp.int32)
  out = model.apply(params, x, one)
  bumped = jax.tree.map(lambda a: a * 1.5, params["columns"][0])
  out2 = model.apply({**params, "columns": {**params["columns"], 0: bumped}}, x, one)
  assert float(jnp.abs(out - out2).max()) > 1e-3
  # The gradient of column 1's loss w.r.t. column 0 is zero (stop_gradient): column 0 is frozen.
  g = jax.grad(lambda p: model.apply(p, x, one).sum())(params)
  assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(g["columns"][0]))
  assert float(jnp.abs(g["columns"][1]["laterals"][1][0]["kernel"]).max()) > 0


def test_parameter_count_grows_linearly():
  spec = prog.ProgressiveSpec(64, (32, 16), 10)
  _, params = prog.build_progressive(spec, seed=0, num_columns=4)
  counts = prog.column_param_counts(params)
  assert counts == [prog.expected_column_param_count(spec, k) for k in range(4)]
  # own = 64*32+32 + 32*16+16 + 16*10+10 = 2778; laterals per earlier column = 32*16 + 16*10 = 672
  assert counts == [2778, 2778 + 672, 2778 + 2 * 672, 2778 + 3 * 672]
  with pytest.raises(ValueError, match="column=4"):
    prog.trainable_mask(params, 4)


def test_progressive_through_the_task_loop_forgets_nothing(tmp_path):
  """`strategy='progressive'` from a config: each earlier task's accuracy is exactly what it was after its own task."""
  import cl_jax
  from configs.progressive import get_config
  c = get_config()
  c.train.steps_per_task = 60
  c.model.hidden = [32]
  r = cl_jax.run(c, str(tmp_path / "prog"), progress=False)
  m = np.asarray(r.accuracy_matrix)
  assert m.shape == (6, 5) and r.acc > 0.85
  for k in range(5):
    assert np.all(m[k + 1:, k] == m[k + 1, k]), k   # frozen columns: bit-identical predictions
  assert r.bwt == 0.0 and r.forgetting == 0.0


def test_progressive_router_predicts_without_the_task_label():
  """The prototype router picks each test input's column from its pixels: class-IL accuracy near the task-IL one."""
  import jax
  from cl_jax.eval.evaluator import make_accuracy_fn, task_accuracy
  from cl_jax.data import task_data
  from cl_jax.train.loop import build
  from configs.progressive import get_config
  c = get_config("router=prototypes")
  c.scenario.num_tasks = 2
  s = build(c)
  state = s.strategy.after_task(s.state.strategy_state, s.state.params, task_data(s.scenario, 0), jax.random.key(0))
  state = s.strategy.after_task(state, s.state.params, task_data(s.scenario, 1), jax.random.key(1))
  from cl_jax.strategies.base import evaluation_learner
  routed = make_accuracy_fn(evaluation_learner(s.learner, s.strategy), s.replicated)
  oracle = make_accuracy_fn(s.learner, s.replicated)
  for t in range(2):
    acc_routed = task_accuracy(routed, (s.state.params, state), s.scenario, t, 1, 256, s.mesh)
    acc_oracle = task_accuracy(oracle, s.state.params, s.scenario, t, 1, 256, s.mesh)
    # Untrained columns, so accuracy itself is low; what the router must get right is the task: with a perfect
    # route the two agree (a wrong route predicts among the other task's classes), and digits 0-4 vs 5-9 are
    # separable in pixel space.
    assert abs(acc_routed - acc_oracle) < 0.05, (t, acc_routed, acc_oracle)
