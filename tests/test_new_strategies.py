"""SI, MAS, DER / DER++, A-GEM and online replay: numbers by hand (or by an independent numpy transcription),
the step hooks they need, and every one of them end to end through `cl_jax.run`."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cl_jax.losses import cross_entropy
from cl_jax.strategies import DEFAULT_CONFIGS, build_strategy
from cl_jax.strategies.base import Learner, LossContext, Strategy, TaskData, TaskInfo, chain
from cl_jax.train.state import TrainState
from cl_jax.train.step import make_train_step


def _config(kind="class", num_tasks=3, **overrides):
  config = ml_collections.ConfigDict({name: fn() for name, fn in DEFAULT_CONFIGS.items()})
  config.scenario = ml_collections.ConfigDict(dict(kind=kind, num_tasks=num_tasks))
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


NUM_CLASSES, DIM = 4, 3


def _logreg():
  def apply(p, x, task):
    del task
    return x @ p["w"] + p["b"]

  def mask(task, task_index):   # class-IL: two classes per task
    return jnp.broadcast_to(jnp.arange(NUM_CLASSES) < 2 * (task_index + 1), (task.shape[0], NUM_CLASSES))

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(DIM, NUM_CLASSES)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(NUM_CLASSES,)) * 0.1, jnp.float32)}
  return Learner(apply, mask), params


def _batch(n, task_index, seed):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, DIM)), jnp.float32),
          "y": jnp.asarray(2 * task_index + rng.integers(0, 2, n), jnp.int32),
          "task": jnp.full((n,), task_index, jnp.int32)}


def _task_data(n, task_index, seed):
  b = _batch(n, task_index, seed)
  return TaskData(np.asarray(b["x"]), np.asarray(b["y"]), np.asarray(b["task"]), task_index)


def _state(params, strategy_state, opt, task_index=0):
  return TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params), strategy_state=strategy_state,
                    rng=jax.random.PRNGKey(0), task_index=jnp.int32(task_index))


def _np_logreg_grad(w, b, x, y, active):
  """Gradient of the mean masked softmax cross-entropy of x @ w + b, in numpy."""
  z = x @ w + b
  z = np.where(active, z, -1e9)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(w.shape[1])[y]) / len(y)
  return x.T @ d, d.sum(0)


# ------------------------------------------------------------------------------------------------ SI


def test_si_path_integral_through_the_train_step_matches_numpy():
  """Quadratic task losses 0.5 Σ a (θ - m)² under SGD; ω, Ω and the params follow a numpy transcription of
  Zenke et al.'s update, including task 2 where the SI penalty pulls towards θ* (and is left out of ω)."""
  a = np.array([1.0, 3.0, 0.5], np.float32)
  targets = [np.array([1.0, -2.0, 0.5], np.float32), np.array([-1.0, 1.0, 2.0], np.float32)]
  lr, c, xi, steps = 0.1, 0.7, 0.05, 6
  strategy = build_strategy("si", _config(**{"si.c": c, "si.xi": xi}), None)
  params = {"w": jnp.zeros(3, jnp.float32)}

  def task_loss(p, batch, ctx):
    return 0.5 * jnp.sum(a * jnp.square(p["w"] - batch["m"])), {}

  opt = optax.sgd(lr)
  step = jax.jit(make_train_step(strategy.loss(task_loss), opt, lambda s: lr, log_norms=False, strategy=strategy))
  state = _state(params, strategy.init(params, None), opt)
  theta, omega, big, anchor = np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)
  for t, m in enumerate(targets):
    for _ in range(steps):
      state, _ = step(state, {"m": jnp.asarray(m)})
      g_task = a * (theta - m)
      g = g_task + 2 * c * big * (theta - anchor)
      new = theta - lr * g
      omega += -g_task * (new - theta)
      theta = new
    np.testing.assert_allclose(state.params["w"], theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.strategy_state["omega"]["w"], omega, rtol=1e-4, atol=1e-6)
    new_ss = strategy.after_task(state.strategy_state, state.params, None, jax.random.key(0))
    state = state._replace(strategy_state=new_ss)
    big = big + omega / ((theta - anchor) ** 2 + xi)
    anchor, omega = theta.copy(), np.zeros(3)
    np.testing.assert_allclose(new_ss["importance"]["w"], big, rtol=1e-4)
    np.testing.assert_allclose(new_ss["anchor"]["w"], anchor, rtol=1e-6)
    assert float(jnp.abs(new_ss["omega"]["w"]).max()) == 0.0
  assert big.min() > 0  # every coordinate moved downhill: a positive importance


def test_si_penalty_value_and_gradient():
  strategy = build_strategy("si", _config(**{"si.c": 2.0}), None)
  params = {"w": jnp.asarray([1.0, 2.0])}
  state = {"omega": {"w": jnp.zeros(2)}, "importance": {"w": jnp.asarray([0.5, 3.0])},
           "anchor": {"w": jnp.asarray([0.0, 1.0])}}
  loss = strategy.loss(lambda p, b, c: (jnp.zeros(()), {}))
  ctx = LossContext(state, jax.random.key(0), jnp.int32(1))
  value, aux = loss(params, {}, ctx)
  np.testing.assert_allclose(value, 2.0 * (0.5 * 1 + 3.0 * 1))   # c Σ Ω (θ - θ*)²
  grad = jax.grad(lambda p: loss(p, {}, ctx)[0])(params)
  np.testing.assert_allclose(grad["w"], [2 * 2.0 * 0.5 * 1, 2 * 2.0 * 3.0 * 1])


# ----------------------------------------------------------------------------------------------- MAS


def test_mas_importance_matches_numpy_per_example_gradients():
  learner, params = _logreg()
  strategy = build_strategy("mas", _config(**{"mas.lam": 3.0, "mas.chunk_size": 7}), learner)
  state = strategy.init(params, None)
  data = _task_data(20, task_index=1, seed=4)   # classes 0..3 active after task 1
  state = strategy.after_task(state, params, data, jax.random.key(0))
  w, b, x = np.asarray(params["w"]), np.asarray(params["b"]), data.x
  # ‖f‖² with f = x w + b: ∂/∂w = 2 x fᵀ (outer product), ∂/∂b = 2 f; mean of |·| over examples.
  f = x @ w + b
  gw = np.mean([np.abs(2 * np.outer(xn, fn)) for xn, fn in zip(x, f)], axis=0)
  gb = np.mean(np.abs(2 * f), axis=0)
  np.testing.assert_allclose(state["importance"]["w"], gw, rtol=1e-5)
  np.testing.assert_allclose(state["importance"]["b"], gb, rtol=1e-5)
  # Task 0's mask leaves classes 0, 1: the masked logits count 0, so columns 2, 3 get no importance.
  state0 = strategy.after_task(strategy.init(params, None), params, _task_data(20, 0, 4), jax.random.key(0))
  assert float(jnp.abs(state0["importance"]["w"][:, 2:]).max()) == 0.0
  np.testing.assert_allclose(state0["importance"]["w"][:, :2], gw[:, :2], rtol=1e-5)
  # Importances add up over tasks; the anchor is the latest params; the penalty is λ Σ Ω (θ - θ*)².
  moved = jax.tree.map(lambda p: p + 0.1, params)
  state2 = strategy.after_task(state, moved, data, jax.random.key(0))
  f2 = x @ (w + 0.1) + (b + 0.1)
  gb2 = np.mean(np.abs(2 * f2), axis=0)
  np.testing.assert_allclose(state2["importance"]["b"], gb + gb2, rtol=1e-5)
  loss = strategy.loss(lambda p, bt, c: (jnp.zeros(()), {}))
  ctx = LossContext(state2, jax.random.key(0), jnp.int32(2))
  expected = 3.0 * sum(float(np.sum(np.asarray(state2["importance"][k]) * 0.01)) for k in ("w", "b"))
  np.testing.assert_allclose(loss(params, {}, ctx)[0], expected, rtol=1e-5)


def test_mas_num_examples_uses_a_subset():
  learner, params = _logreg()
  strategy = build_strategy("mas", _config(**{"mas.num_examples": 5}), learner)
  data = _task_data(40, task_index=1, seed=4)
  full = build_strategy("mas", _config(), learner).after_task(
      strategy.init(params, None), params, data, jax.random.key(0))
  sub = strategy.after_task(strategy.init(params, None), params, data, jax.random.key(0))
  assert not np.allclose(sub["importance"]["b"], full["importance"]["b"])
  assert np.all(np.isfinite(np.asarray(sub["importance"]["w"])))


# --------------------------------------------------------------------------------------- DER, DER++


def _der_setup(name, **overrides):
  learner, params = _logreg()
  strategy = build_strategy(name, _config(**{"der.capacity": 8, "der.batch_size": 5, **overrides}), learner)
  state = strategy.init(params, TaskInfo(3, NUM_CLASSES, (DIM,)))
  return learner, params, strategy, state


def test_der_buffer_fills_online_with_the_steps_logits():
  learner, params, strategy, buffer = _der_setup("der")
  assert buffer.logits.shape == (8, NUM_CLASSES)
  opt = optax.sgd(0.1)
  step = jax.jit(make_train_step(strategy.loss(_masked_ce(learner)), opt, lambda s: 0.1, log_norms=False,
                                 strategy=strategy))
  state = _state(params, buffer, opt)
  batch = _batch(6, 0, seed=1)
  new, _ = step(state, batch)
  buf = new.strategy_state
  assert int(buf.size) == 6 and int(buf.seen) == 6
  # Algorithm R with room left: example g goes to slot g, with the logits of the params *before* the update.
  np.testing.assert_allclose(buf.x[:6], batch["x"])
  np.testing.assert_array_equal(buf.y[:6], batch["y"])
  np.testing.assert_allclose(buf.logits[:6], batch["x"] @ params["w"] + params["b"], rtol=1e-5, atol=1e-6)
  new, _ = step(new, _batch(6, 0, seed=2))
  assert int(new.strategy_state.size) == 8 and int(new.strategy_state.seen) == 12


def _masked_ce(learner):
  def loss_fn(params, batch, ctx):
    raw = learner.apply(params, batch["x"], batch["task"])
    logits = jnp.where(learner.logit_mask(batch["task"], ctx.task_index), raw, -1e9)
    return jnp.mean(cross_entropy(logits, batch["y"])), {"_raw_logits": raw}
  return loss_fn


@pytest.mark.parametrize("replacement", [False, True])
def test_der_and_derpp_losses_by_hand(replacement):
  from cl_jax.strategies import buffer as buffer_lib, der as der_lib
  alpha, beta = 0.4, 0.7

  def draw(key):   # the loss's draw of 5 of the 8 stored: distinct slots (the reference code's), or with replacement
    if replacement:
      return np.asarray(jax.random.randint(key, (5,), 0, 8))
    idx = np.asarray(buffer_lib.epoch_order(buffer, key))[:5]
    assert len(set(idx.tolist())) == 5 and idx.max() < 8
    return idx

  for name in ("der", "derpp"):
    learner, params, strategy, buffer = _der_setup(name, **{"der.alpha": alpha, "der.beta": beta,
                                                            "der.replacement": replacement})
    base = _masked_ce(learner)
    loss = strategy.loss(base)
    batch = _batch(6, 1, seed=3)
    ctx = LossContext(buffer, jax.random.key(5), jnp.int32(1))
    np.testing.assert_allclose(loss(params, batch, ctx)[0], base(params, batch, ctx)[0], rtol=1e-6)  # empty
    old = _batch(8, 0, seed=9)
    stored = old["x"] @ params["w"] * 0.5     # logits of some earlier network
    buffer = buffer_lib.reservoir_add(buffer, {**old, "logits": stored}, jax.random.key(1))
    ctx = ctx._replace(strategy_state=buffer)
    value, aux = loss(params, batch, ctx)
    # The two draws, reproduced with the loss's own streams.
    i1 = draw(jax.random.fold_in(ctx.rng, der_lib._LOGIT_STREAM))
    x1, z1 = np.asarray(old["x"])[i1], np.asarray(stored)[i1]
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    mse = np.mean((x1 @ w + b - z1) ** 2)
    expected = float(base(params, batch, ctx)[0]) + alpha * mse
    if name == "derpp":
      i2 = draw(jax.random.fold_in(ctx.rng, der_lib._LABEL_STREAM))
      z2 = np.asarray(old["x"])[i2] @ w + b
      z2 = np.where(np.arange(NUM_CLASSES) < 4, z2, -1e9)   # task index 1: classes 0..3
      y2 = np.asarray(old["y"])[i2]
      ce = np.mean(np.log(np.exp(z2).sum(1)) - z2[np.arange(5), y2])
      expected += beta * ce
      np.testing.assert_allclose(aux["der_buffer_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(aux["der_logit_mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert mse > 1e-2


def test_der_draw_without_replacement_uses_each_stored_example_once():
  """The reference code's buffer draw (mammoth `Buffer.get_data`) asks for 5 and, with 3 stored, gets those 3 once
  each: the logit term is then exactly the MSE over the 3, whatever the rng (with replacement it is not)."""
  from cl_jax.strategies import buffer as buffer_lib
  learner, params, strategy, buffer = _der_setup("der", **{"der.alpha": 1.0})
  old = _batch(3, 0, seed=4)
  stored = old["x"] @ params["w"] * 0.5
  buffer = buffer_lib.reservoir_add(buffer, {**old, "logits": stored}, jax.random.key(1))
  exact = np.mean((np.asarray(old["x"] @ params["w"] + params["b"]) - np.asarray(stored)) ** 2)
  loss = strategy.loss(_masked_ce(learner))
  for key in range(3):
    ctx = LossContext(buffer, jax.random.key(key), jnp.int32(1))
    np.testing.assert_allclose(loss(params, _batch(6, 1, seed=3), ctx)[1]["der_logit_mse"], exact, rtol=1e-5)
  rows, valid = buffer_lib.sample_distinct(buffer, jax.random.key(0), 5)
  assert valid.tolist() == [True] * 3 + [False] * 2
  assert sorted(np.asarray(rows["y"][:3]).tolist()) == sorted(np.asarray(old["y"]).tolist())


# --------------------------------------------------------------------------------------------- A-GEM


def test_agem_projection_by_hand():
  from cl_jax.strategies.agem import project
  g = {"a": jnp.asarray([1.0, 0.0]), "b": jnp.asarray([0.0])}
  r = {"a": jnp.asarray([-1.0, 1.0]), "b": jnp.asarray([1.0])}
  # g·r = -1 < 0, r·r = 3: g - (-1/3) r = [2/3, 1/3, 1/3], orthogonal to r.
  out = project(g, r)
  np.testing.assert_allclose(out["a"], [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [1 / 3], rtol=1e-6)
  assert abs(float(out["a"] @ r["a"] + out["b"] @ r["b"])) < 1e-6
  same = project(g, jax.tree.map(lambda x: -x, r))   # g·r > 0: unchanged
  np.testing.assert_array_equal(same["a"], g["a"])
  np.testing.assert_array_equal(project(g, r, False)["a"], g["a"])   # empty memory: unchanged


def test_agem_step_projects_against_the_memory_gradient():
  """One SGD step through the real train step: the applied update is the numpy-projected gradient."""
  from cl_jax.strategies.agem import _MEMORY_STREAM
  learner, params = _logreg()
  strategy = build_strategy("agem", _config(**{"agem.capacity": 16, "agem.batch_size": 6}), learner)
  memory = strategy.init(params, TaskInfo(3, NUM_CLASSES, (DIM,)))
  memory = strategy.after_task(memory, params, _task_data(16, 0, seed=2), jax.random.key(3))
  assert int(memory["size"]) > 0
  lr = 0.5
  opt = optax.sgd(lr)
  step = jax.jit(make_train_step(strategy.loss(_masked_ce(learner)), opt, lambda s: lr, log_norms=False,
                                 strategy=strategy))
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  active = np.arange(NUM_CLASSES) < 4
  projected = 0
  for seed in range(6):   # some batches conflict with the memory, some do not
    batch = _batch(8, 1, seed=10 + seed)
    state = _state(params, memory, opt, task_index=1)
    new, _ = step(state, batch)
    step_rng = jax.random.split(state.rng)[1]
    idx = np.asarray(jax.random.randint(jax.random.fold_in(step_rng, _MEMORY_STREAM), (6,), 0, memory["size"]))
    gw, gb = _np_logreg_grad(w, b, np.asarray(batch["x"]), np.asarray(batch["y"]), active)
    rw, rb = _np_logreg_grad(w, b, np.asarray(memory["x"])[idx], np.asarray(memory["y"])[idx], active)
    dot = np.sum(gw * rw) + np.sum(gb * rb)
    if dot < 0:
      coef = dot / (np.sum(rw * rw) + np.sum(rb * rb))
      gw, gb = gw - coef * rw, gb - coef * rb
      projected += 1
    np.testing.assert_allclose(new.params["w"], w - lr * gw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.params["b"], b - lr * gb, rtol=1e-4, atol=1e-6)
  assert 0 < projected < 6, projected


def test_agem_task_quota_stores_capacity_over_tasks_of_each_task():
  """mammoth's A-GEM fill: capacity // num_tasks random examples of each task, earlier tasks' kept as they were."""
  learner, params = _logreg()
  c = _config(**{"agem.capacity": 12, "agem.policy": "task_quota"})
  quota = 12 // int(c.scenario.num_tasks)
  strategy = build_strategy("agem", c, learner)
  memory = strategy.init(params, TaskInfo(3, NUM_CLASSES, (DIM,)))
  first = strategy.after_task(memory, params, _task_data(16, 0, seed=2), jax.random.key(3))
  assert int(first["size"]) == quota
  second = strategy.after_task(first, params, _task_data(16, 1, seed=5), jax.random.key(4))
  assert int(second["size"]) == 2 * quota
  tasks = np.asarray(second["task"][:2 * quota])
  assert sorted(tasks.tolist()) == [0] * quota + [1] * quota
  kept = {tuple(r) for r, t in zip(np.asarray(second["x"][:2 * quota]), tasks) if t == 0}
  assert kept == {tuple(r) for r in np.asarray(first["x"][:quota])}
  with pytest.raises(ValueError, match="task_quota"):
    build_strategy("agem", _config(**{"agem.capacity": 1, "agem.policy": "task_quota"}), learner)


# ------------------------------------------------------------------------------------- online replay


def test_online_replay_fills_the_buffer_every_step_and_not_at_task_end():
  learner, params = _logreg()
  strategy = build_strategy("replay", _config(**{"replay.fill": "online", "replay.capacity": 10,
                                                 "replay.batch_size": 4}), learner)
  buffer = strategy.init(params, TaskInfo(3, NUM_CLASSES, (DIM,)))
  opt = optax.sgd(0.1)
  step = jax.jit(make_train_step(strategy.loss(_masked_ce(learner)), opt, lambda s: 0.1, log_norms=False,
                                 strategy=strategy))
  state = _state(params, buffer, opt)
  b1, b2 = _batch(6, 0, seed=1), _batch(6, 0, seed=2)
  state, _ = step(state, b1)
  np.testing.assert_allclose(state.strategy_state["x"][:6], b1["x"])
  state, _ = step(state, b2)
  assert int(state.strategy_state["size"]) == 10 and int(state.strategy_state["seen"]) == 12
  after = strategy.after_task(state.strategy_state, state.params, _task_data(30, 0, 3), jax.random.key(0))
  assert int(after["seen"]) == 12   # the task end adds nothing in online mode
  task_end = build_strategy("replay", _config(**{"replay.capacity": 10}), learner)
  assert task_end.update is None    # the default fill has no per-step hook: the step is unchanged


# ------------------------------------------------------------------------------------------- chain


def test_chain_runs_each_hook_on_its_own_state():
  learner, params = _logreg()
  config = _config(**{"der.capacity": 8, "agem.capacity": 8, "agem.batch_size": 4})
  strategy = build_strategy("si+derpp+agem+ewc", config, learner)
  assert strategy.grads is not None and strategy.update is not None and strategy.predict is None
  state = strategy.init(params, TaskInfo(3, NUM_CLASSES, (DIM,)))
  state = strategy.after_task(state, params, _task_data(16, 0, 1), jax.random.key(0))
  opt = optax.sgd(0.1)
  step = jax.jit(make_train_step(strategy.loss(_masked_ce(learner)), opt, lambda s: 0.1, log_norms=False,
                                 strategy=strategy))
  train = _state(params, state, opt, task_index=1)
  for seed in range(3):
    train, metrics = step(train, _batch(8, 1, seed))
  si_state, der_buf, memory, ewc_state = train.strategy_state
  assert float(jnp.abs(si_state["omega"]["w"]).sum()) > 0          # SI integrated its path
  assert int(der_buf.seen) == 24                                     # DER saw every batch
  assert int(memory["seen"]) == 16                                   # A-GEM's memory only grows at task ends
  assert {"si_penalty", "der_logit_mse", "der_buffer_ce", "ewc_penalty"} <= set(metrics)
  # Hooks default to no-ops: a chain without them has none, and predict is single-owner.
  plain = build_strategy("ewc+lwf", config, learner)
  assert plain.grads is None and plain.update is None and plain.predict is None

  def p(*a):
    return jnp.zeros(())

  with pytest.raises(ValueError, match="predict"):
    chain(Strategy(name="a", predict=p), Strategy(name="b", predict=p))


# ----------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("strategy, key, value, needle", [
    ("si", "si.xi", 0.0, "si.xi"), ("si", "si.c", -1.0, "si.c"), ("mas", "mas.num_examples", 0, "mas.num_examples"),
    ("der", "der.capacity", 0, "der.capacity"), ("derpp", "der.beta", -0.5, "der.beta"),
    ("agem", "agem.policy", "fifo", "agem.policy"), ("replay", "replay.fill", "sometimes", "replay.fill"),
])
def test_bad_settings_fail_validation_by_name(strategy, key, value, needle):
  from conftest import tiny_config
  from cl_jax.config import ConfigError
  from cl_jax.kinds import validate
  with pytest.raises(ConfigError, match=needle):
    validate(tiny_config(strategy, **{key: value}))


# ------------------------------------------------------------------------------- end to end, cl_jax.run


@pytest.mark.parametrize("strategy, overrides", [
    ("si+mas+agem", {"si.c": 10.0, "mas.lam": 10.0, "agem.batch_size": 32}), ("der", {}),
    ("derpp+replay", {"replay.fill": "online", "replay.capacity": 64}),
])
def test_runs_end_to_end_through_cl_jax_run(tmp_path, strategy, overrides):
  """Two tasks of Split Digits through the real runner (every new strategy, alone or chained): a full accuracy
  matrix, each strategy's section in results.json."""
  import cl_jax
  from conftest import tiny_config
  config = tiny_config(strategy, steps=10, **{"scenario.num_tasks": 2, "optim.lr": 1e-2, **overrides})
  results = cl_jax.run(config, str(tmp_path), progress=False)
  r = np.asarray(results.accuracy_matrix)
  assert r.shape == (3, 2) and np.all(np.isfinite(r))
  assert r[1, 0] > 0.6   # task 1 was learned in 10 steps
  with open(os.path.join(tmp_path, "results.json")) as f:
    recorded = json.load(f)["strategy_config"]
  for name in strategy.split("+"):
    assert {"derpp": "der"}.get(name, name) in recorded


def _domain_digits_run(tmp_path_factory, strategy, overrides):
  """Domain-incremental Split Digits (5 tasks, 60 steps each, seed 0) through `cl_jax.run`: its results."""
  import cl_jax
  from conftest import tiny_config
  workdir = tmp_path_factory.mktemp(strategy)
  return cl_jax.run(tiny_config(strategy, kind="domain", **overrides), str(workdir), progress=False)


@pytest.fixture(scope="module")
def naive_domain_digits(tmp_path_factory):
  return _domain_digits_run(tmp_path_factory, "naive", {})


# Settings where each method's effect is large on this scenario. Measured at seed 0 (BWT; the forgetting is its
# negative here): naive -0.174, SI -0.031, MAS +0.000, A-GEM -0.062, DER -0.069; at seeds 1 and 2 every method's
# BWT stays more than 0.05 above naive's.
FORGETS_LESS = [
    ("si", {"si.c": 300.0}), ("mas", {"mas.lam": 3.0}),
    ("agem", {"agem.capacity": 200, "agem.batch_size": 256}), ("der", {"der.capacity": 200, "der.alpha": 3.0}),
]


@pytest.mark.parametrize("strategy, overrides", FORGETS_LESS, ids=[s for s, _ in FORGETS_LESS])
def test_forgets_measurably_less_than_naive(tmp_path_factory, naive_domain_digits, strategy, overrides):
  """The same seed, data order and steps as naive fine-tuning: a backward transfer at least 0.05 higher and an
  average forgetting (the drop from each task's best accuracy) at least 0.05 lower, with the average final accuracy
  no more than 0.05 below naive's (it did not buy stability by ceasing to learn)."""
  naive = naive_domain_digits
  results = _domain_digits_run(tmp_path_factory, strategy, overrides)
  r, r_naive = np.asarray(results.accuracy_matrix), np.asarray(naive.accuracy_matrix)
  assert naive.bwt < -0.1, naive.bwt           # the setting forgets, so forgetting less means something
  assert results.bwt > naive.bwt + 0.05, (results.bwt, naive.bwt)
  assert results.forgetting < naive.forgetting - 0.05, (results.forgetting, naive.forgetting)
  assert r[-1].mean() > r_naive[-1].mean() - 0.05, (r[-1], r_naive[-1])


# --------------------------------------------------------------------------------------------- GDumb


def test_gdumb_greedy_class_balanced_memory_by_hand():
  from cl_jax.strategies.buffer import empty, greedy_balanced_add
  cap, outputs = 4, 3
  mem = empty(cap, (1,))
  counts, seen = jnp.zeros((outputs,), jnp.int32), jnp.zeros((outputs,), bool)
  y = jnp.asarray([0, 0, 0, 0, 1, 1, 2, 2], jnp.int32)
  x = jnp.arange(8, dtype=jnp.float32)[:, None]        # x = stream position
  examples = {"x": x, "y": y, "task": jnp.zeros(8, jnp.int32)}
  mem, counts, seen = greedy_balanced_add(mem, counts, seen, examples, jax.random.key(0), outputs)
  # 0,0,0,0 fill the memory; 1 (quota 4 // 2 = 2) twice replaces a class-0 example; 2 (quota 1) replaces one of
  # the largest class (0 and 1 tie at 2: the first, class 0); the second 2 is dropped (class 2 holds its quota).
  np.testing.assert_array_equal(counts, [1, 2, 1])
  assert int(mem.size) == 4 and int(mem.seen) == 8
  kept = sorted(np.asarray(mem.x[:, 0]).astype(int).tolist())
  assert {4, 5, 6} <= set(kept) and 7 not in kept and len(set(kept) & {0, 1, 2, 3}) == 1
  np.testing.assert_array_equal(np.bincount(np.asarray(mem.y), minlength=3), [1, 2, 1])


def test_gdumb_learns_only_from_memory_and_predicts_with_the_retrained_model():
  learner, params = _logreg()
  strategy = build_strategy("gdumb", _config(**{"gdumb.capacity": 12, "gdumb.epochs": 40, "gdumb.lr": 0.5}),
                            learner)
  state = strategy.init(params, TaskInfo(3, NUM_CLASSES, (DIM,)))
  opt = optax.sgd(0.5)
  step = jax.jit(make_train_step(strategy.loss(_masked_ce(learner)), opt, lambda s: 0.5, log_norms=False,
                                 strategy=strategy))
  train = _state(params, state, opt)
  rng = np.random.default_rng(0)
  for _ in range(3):   # two well separated classes: x = ±3 e_0 + noise
    y = rng.integers(0, 2, 8)
    x = np.where(y[:, None] == 1, 3.0, -3.0) * np.eye(DIM)[0] + 0.1 * rng.normal(size=(8, DIM))
    train, _ = step(train, {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32),
                            "task": jnp.zeros(8, jnp.int32)})
  for a, b in zip(jax.tree.leaves(train.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)          # the stream model never moves
  assert int(train.strategy_state["memory"].size) == 12
  state = strategy.after_task(train.strategy_state, train.params, _task_data(4, 0, 0), jax.random.key(1))
  mem = state["memory"]
  logits = strategy.predict(state, params, mem.x, mem.task, jnp.int32(0))
  np.testing.assert_allclose(logits, learner.logits(state["model"], mem.x, mem.task, 0), rtol=1e-6)
  assert float(jnp.mean(jnp.argmax(logits, -1) == mem.y)) == 1.0
  assert float(jnp.mean(jnp.argmax(learner.logits(params, mem.x, mem.task, 0), -1) == mem.y)) < 1.0


def test_gdumb_end_to_end_is_scored_through_predict(tmp_path):
  """The stream model never trains, so accuracy well above chance after task 1 means the evaluator scored the model
  GDumb retrained on its memory (the `predict` hook)."""
  import cl_jax
  from conftest import tiny_config
  config = tiny_config("gdumb", steps=10, **{"scenario.num_tasks": 2, "gdumb.capacity": 200, "gdumb.epochs": 20,
                                             "gdumb.lr": 0.05})
  r = np.asarray(cl_jax.run(config, str(tmp_path), progress=False).accuracy_matrix)
  assert r.shape == (3, 2)
  assert r[1, 0] > 0.8 and r[2, 1] > 0.6, r


# --------------------------------------------------------------------------------------------- iCaRL


def test_icarl_herding_by_hand():
  from cl_jax.strategies.icarl import herding
  f = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6], [1, 0]])
  # μ = (.68, .48). k=1: |f_i - μ| = .58, .86, .33, .17, .58 -> 3. k=2: |(f_3 + f_i)/2 - μ| = .28, .43, .22, -, .28
  # -> 2. k=3: |(f_3 + f_2 + f_i)/3 - μ| = .12, .38, -, -, .12 -> 0 (the first of two equal vectors).
  # k=4: |(f_3 + f_2 + f_0 + f_i)/4 - μ| = .14 (i=1), .21 (i=4) -> 1, then 4.
  np.testing.assert_array_equal(herding(f, 5), [3, 2, 0, 1, 4])
  np.testing.assert_array_equal(herding(f, 2), [3, 2])


def _identity_features_learner():
  learner, params = _logreg()

  def apply(p, x, task, method=None):
    return x if method == "features" else x @ p["w"] + p["b"]
  return Learner(apply, learner.logit_mask), params


def test_icarl_exemplars_means_and_nearest_mean_classifier():
  learner, params = _identity_features_learner()
  strategy = build_strategy("icarl", _config(**{"icarl.capacity": 4, "icarl.batch_size": 3}), learner)
  state = strategy.init(params, TaskInfo(2, NUM_CLASSES, (DIM,)))
  e = np.eye(DIM, dtype=np.float32)
  # Task 0: class 0 around e0, class 1 around e1; m = 4 // 2 = 2 exemplars each.
  x0 = np.stack([e[0], e[0] + 0.2 * e[1], e[0] - 0.2 * e[1], e[1], e[1] + 0.2 * e[2], e[1] - 0.2 * e[2]])
  y0 = np.array([0, 0, 0, 1, 1, 1], np.int32)
  state = strategy.after_task(state, params, TaskData(x0, y0, np.zeros(6, np.int32), 0), jax.random.key(0))
  rank, ys = np.asarray(state["rank"]), np.asarray(state["y"])
  assert sorted(ys[rank >= 0].tolist()) == [0, 0, 1, 1]
  # Herding on normalised features: the first exemplar of class 0 is e0 itself (closest to the mean).
  first = np.asarray(state["x"])[(ys == 0) & (rank == 0)][0]
  np.testing.assert_allclose(first, e[0])
  # Task 1 (class 2 around e2): m = 4 // 3 = 1; old lists cut to their first exemplar.
  x1 = np.stack([e[2], e[2] + 0.3 * e[0]])
  state = strategy.after_task(state, params, TaskData(x1, np.array([2, 2], np.int32), np.ones(2, np.int32), 1),
                              jax.random.key(0))
  rank, ys = np.asarray(state["rank"]), np.asarray(state["y"])
  assert sorted(ys[rank >= 0].tolist()) == [0, 1, 2] and rank.max() == 0
  has = np.asarray(state["has_mean"])
  assert has.tolist() == [True, True, True, False]
  # Each class's mean is its single exemplar, normalised; the classifier picks the nearest one.
  means = np.asarray(state["means"])
  for c in range(3):
    ex = np.asarray(state["x"])[(ys == c) & (rank == 0)][0]
    np.testing.assert_allclose(means[c], ex / np.linalg.norm(ex), rtol=1e-5)
  q = jnp.asarray([[2.0, 0.1, 0.0], [0.0, 0.1, 3.0], [0.1, 1.0, 0.2]])
  scores = strategy.predict(state, params, q, jnp.ones(3, jnp.int32), jnp.int32(1))
  np.testing.assert_array_equal(np.argmax(np.asarray(scores), -1), [0, 2, 1])
  fq = np.asarray(q) / np.linalg.norm(np.asarray(q), axis=1, keepdims=True)
  np.testing.assert_allclose(scores[:, :3], -((fq[:, None] - means[None, :3]) ** 2).sum(-1), rtol=1e-5, atol=1e-6)


def test_icarl_loss_by_hand():
  """Binary cross-entropies over the classes seen: one-hot targets for the current task's classes (2, 3), the
  teacher's sigmoid for the earlier ones (0, 1)."""
  from cl_jax.strategies.icarl import _EXEMPLAR_STREAM
  learner, params = _identity_features_learner()
  strategy = build_strategy("icarl", _config(**{"icarl.capacity": 4, "icarl.batch_size": 2}), learner)
  state = strategy.init(params, TaskInfo(2, NUM_CLASSES, (DIM,)))
  d0 = _task_data(6, 0, seed=1)
  teacher = jax.tree.map(lambda p: p * 0.5, params)
  state = strategy.after_task(state, teacher, d0, jax.random.key(0))
  batch = _batch(3, 1, seed=2)
  ctx = LossContext(state, jax.random.key(4), jnp.int32(1))
  value = float(strategy.loss(None)(params, batch, ctx)[0])
  p = (np.asarray(state["rank"]) >= 0) / 4.0
  idx = np.asarray(jax.random.choice(jax.random.fold_in(ctx.rng, _EXEMPLAR_STREAM), 4, (2,), p=jnp.asarray(p)))
  x = np.concatenate([np.asarray(batch["x"]), np.asarray(state["x"])[idx]])
  y = np.concatenate([np.asarray(batch["y"]), np.asarray(state["y"])[idx]])

  def sig(z):
    return 1 / (1 + np.exp(-z))

  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  z, zt = x @ w + b, x @ (0.5 * w) + 0.5 * b
  target = np.concatenate([sig(zt[:, :2]), np.eye(4)[y][:, 2:]], axis=1)
  bce = -(target * np.log(sig(z)) + (1 - target) * np.log(1 - sig(z)))
  np.testing.assert_allclose(value, bce.sum(1).mean(), rtol=1e-5)


def test_icarl_reference_code_options_by_hand():
  """The DER paper's reference-code variants (icarl.py docstring): the trained-on exemplars cast to floor(x)/255,
  exemplars weighted λ = E·B/(N·b) as if in the training set, the BCE averaged over the seen classes; raw features
  for the class means."""
  from cl_jax.strategies.icarl import _EXEMPLAR_STREAM
  learner, params = _identity_features_learner()
  options = {"icarl.capacity": 4, "icarl.batch_size": 2, "icarl.loss_mean": True, "icarl.replay": "dataset",
             "icarl.exemplar_input": "uint8_cast", "icarl.features": "raw"}
  strategy = build_strategy("icarl", _config(**options), learner)
  state = strategy.init(params, TaskInfo(2, NUM_CLASSES, (DIM,)))
  d0 = _task_data(6, 0, seed=1)
  d0 = TaskData(np.clip(2 * np.abs(d0.x), 0, 1), d0.y, d0.task, 0)   # pixels in [0, 1], some saturated at 1
  teacher = jax.tree.map(lambda p: p * 0.5, params)
  state = strategy.after_task(state, teacher, d0, jax.random.key(0))
  assert float(state["task_size"]) == 6
  rank, ys, xs = np.asarray(state["rank"]), np.asarray(state["y"]), np.asarray(state["x"])
  for c in np.unique(ys[rank >= 0]):   # raw: the plain mean of the exemplars' features, not normalised
    np.testing.assert_allclose(state["means"][c], xs[(rank >= 0) & (ys == c)].mean(0), rtol=1e-6)
  batch = _batch(3, 1, seed=2)
  ctx = LossContext(state, jax.random.key(4), jnp.int32(1))
  value = float(strategy.loss(None)(params, batch, ctx)[0])
  idx = np.asarray(jax.random.choice(jax.random.fold_in(ctx.rng, _EXEMPLAR_STREAM), 4, (2,),
                                     p=jnp.asarray((rank >= 0) / 4.0)))
  assert (xs[idx] == 1).any() and ((xs[idx] > 0) & (xs[idx] < 1)).any()   # both kinds of pixel are drawn
  x = np.concatenate([np.asarray(batch["x"]), np.floor(xs[idx]) / 255])
  y = np.concatenate([np.asarray(batch["y"]), ys[idx]])

  def sig(z):
    return 1 / (1 + np.exp(-z))

  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  z, zt = x @ w + b, x @ (0.5 * w) + 0.5 * b
  target = np.concatenate([sig(zt[:, :2]), np.eye(4)[y][:, 2:]], axis=1)
  per_example = -(target * np.log(sig(z)) + (1 - target) * np.log(1 - sig(z))).mean(1)   # 4 classes seen
  lam = 4 * 3 / (6 * 2)   # E = 4 exemplars, B = 3, N = 6 (the task before), b = 2
  np.testing.assert_allclose(value, (per_example[:3].sum() + lam * per_example[3:].sum()) / 3, rtol=1e-5)
  with pytest.raises(ValueError, match="icarl.replay='ring'"):
    build_strategy("icarl", _config(**{"icarl.replay": "ring"}), learner)


def test_icarl_end_to_end(tmp_path):
  import cl_jax
  from conftest import tiny_config
  from cl_jax.config import ConfigError
  from cl_jax.kinds import validate
  config = tiny_config("icarl", steps=20, **{"scenario.num_tasks": 2, "icarl.capacity": 100, "optim.lr": 1e-2})
  r = np.asarray(cl_jax.run(config, str(tmp_path), progress=False).accuracy_matrix)
  assert r.shape == (3, 2) and r[1, 0] > 0.6 and r[2, 1] > 0.5, r
  with pytest.raises(ConfigError, match="scenario.kind='task'"):
    validate(tiny_config("icarl", kind="task"))


# ------------------------------------------------------------------------------------------- PackNet


def test_packnet_claims_prunes_freezes_and_masks_by_hand():
  learner, _ = _logreg()
  strategy = build_strategy("packnet", _config(kind="task", **{"packnet.prune": 0.5}), learner)
  params = {"w": jnp.asarray([[0.5, -3.0, 0.1, 2.0], [1.0, -0.2, 4.0, 0.3], [0.05, 0.0, -1.5, 0.7]]),
            "b": jnp.asarray([0.1, 0.2, 0.3, 0.4])}
  state = strategy.init(params, None)
  state = strategy.after_task(state, params, None, jax.random.key(0))
  # Task 1 claims round(0.5 * 12) = 6 of w's free entries, the largest |w|: 4, -3, 2, -1.5, 1, 0.7; all of b.
  np.testing.assert_array_equal(state["owner"]["w"], [[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(state["owner"]["b"], [1, 1, 1, 1])
  # The gradient of claimed weights is zeroed before the optimizer.
  g = strategy.grads(state, jax.tree.map(jnp.ones_like, params), params, None, None, None)
  np.testing.assert_array_equal(g["w"], 1 - np.asarray(state["owner"]["w"]))
  np.testing.assert_array_equal(g["b"], 0)
  # Task 2 trains (moves the free weights) and claims half of the remaining 6: |w| of the moved entries.
  moved = {"w": params["w"] + jnp.asarray([[5.0, 0, 0.2, 0], [0, 0.1, 0, 0.3], [0.4, 0.6, 0, 0]]), "b": params["b"]}
  state2 = strategy.after_task(state, moved, None, jax.random.key(0))
  # free entries' |w| after the move: 5.5, .3, .3(w[1,1]=-.1 -> .1), ... : (0,0)=5.5, (0,2)=.3, (1,1)=.1, (1,3)=.6,
  # (2,0)=.45, (2,1)=.6 -> the top 3: 5.5, then .6 at (1,3) and (2,1).
  np.testing.assert_array_equal(state2["owner"]["w"], [[2, 1, 0, 1], [1, 0, 1, 2], [0, 2, 1, 1]])
  assert int(state2["tasks"]) == 2
  # Task 1 predicts with its own weights only; task 2 with tasks 1 and 2's.
  x = jnp.asarray([[1.0, 1.0, 1.0]])
  w1 = np.where(np.asarray(state2["owner"]["w"]) == 1, np.asarray(moved["w"]), 0)
  w12 = np.where(np.asarray(state2["owner"]["w"]) >= 1, np.asarray(moved["w"]), 0)
  out1 = strategy.predict(state2, moved, x, jnp.zeros(1, jnp.int32), jnp.int32(1))
  out2 = strategy.predict(state2, moved, x, jnp.ones(1, jnp.int32), jnp.int32(1))
  np.testing.assert_allclose(out1, np.asarray(x) @ w1 + np.asarray(params["b"]), rtol=1e-6)
  np.testing.assert_allclose(out2, np.asarray(x) @ w12 + np.asarray(params["b"]), rtol=1e-6)
  assert strategy.reset_optimizer


def test_packnet_end_to_end_does_not_forget(tmp_path):
  """Task-IL Split Digits through cl_jax.run: task 1's weights are frozen and masked, so its accuracy after task 2 is
  exactly its accuracy after task 1."""
  import cl_jax
  from conftest import tiny_config
  from cl_jax.config import ConfigError
  from cl_jax.kinds import validate
  config = tiny_config("packnet", kind="task", steps=15, **{"scenario.num_tasks": 2, "optim.lr": 1e-2})
  r = np.asarray(cl_jax.run(config, str(tmp_path), progress=False).accuracy_matrix)
  assert r[1, 0] > 0.8 and r[2, 1] > 0.8, r
  assert r[2, 0] == r[1, 0], r
  with pytest.raises(ConfigError, match="scenario.kind='class'"):
    validate(tiny_config("packnet", kind="class"))
