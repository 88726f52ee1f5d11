"""EWC, online EWC, distillation/LwF and replay as loss transforms, and their chain."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cl_jax.losses import cross_entropy
from cl_jax.strategies import DEFAULT_CONFIGS, build_strategy
from cl_jax.strategies.base import Learner, LossContext, TaskData, TaskInfo
from cl_jax.strategies.distill import distillation_loss
from cl_jax.strategies.ewc import consolidate, ewc_penalty
from cl_jax.strategies.replay import class_balanced_add, empty_buffer, reservoir_add


def _config(kind="class", num_tasks=3, **overrides):
  config = ml_collections.ConfigDict({name: fn() for name, fn in DEFAULT_CONFIGS.items()})
  config.scenario = ml_collections.ConfigDict(dict(kind=kind, num_tasks=num_tasks))
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _logreg(num_classes=4, dim=3):
  def apply(p, x, task):
    del task
    return x @ p["w"] + p["b"]

  def mask(task, task_index):   # class-IL: two classes per task
    return jnp.broadcast_to(jnp.arange(num_classes) < 2 * (task_index + 1), (task.shape[0], num_classes))

  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(dim, num_classes)), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  return Learner(apply, mask), params


def _task_loss(learner):
  """Weighted masked cross-entropy, Σ wᵢℓᵢ / Σ wᵢ, as the task loop's base loss."""
  def loss_fn(params, batch, ctx):
    ce = cross_entropy(learner.logits(params, batch["x"], batch["task"], ctx.task_index), batch["y"])
    w = batch.get("weight", jnp.ones_like(ce))
    return jnp.sum(w * ce) / jnp.sum(w), {"ce": jnp.mean(ce)}
  return loss_fn


def _task_data(n=40, task_index=0, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  return TaskData(x=rng.normal(size=(n, dim)).astype(np.float32),
                  y=(2 * task_index + rng.integers(0, 2, n)).astype(np.int32),
                  task=np.full(n, task_index, np.int32), task_index=task_index)


def _perturb(params, scale, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  return jax.tree.map(lambda p: p + scale * jax.random.normal(next(keys), p.shape), params)


# ------------------------------------------------------------------------------------------- EWC


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_f_delta():
  learner, params = _logreg()
  lam = 7.0
  strategy = build_strategy("ewc", _config(**{"ewc.lam": lam}), learner)
  state = strategy.init(params, TaskInfo(3, 4, (3,)))
  state = strategy.after_task(state, params, _task_data(), jax.random.key(0))
  fisher = state["fisher"]
  assert float(sum(jnp.sum(f) for f in jax.tree.leaves(fisher))) > 1e-2
  loss = strategy.loss(lambda p, b, c: (jnp.zeros(()), {}))
  ctx = LossContext(state, jax.random.key(1), jnp.int32(1))
  at_anchor, aux = loss(params, {}, ctx)
  assert float(at_anchor) == 0.0 and float(aux["ewc_penalty"]) == 0.0
  moved = _perturb(params, 0.3, seed=2)
  grad = jax.grad(lambda p: loss(p, {}, ctx)[0])(moved)
  expected = jax.tree.map(lambda f, p, a: lam * f * (p - a), fisher, moved, params)
  for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
  value = float(loss(moved, {}, ctx)[0])
  manual = 0.5 * lam * sum(float(jnp.sum(f * (p - a) ** 2)) for f, p, a in zip(
      jax.tree.leaves(fisher), jax.tree.leaves(moved), jax.tree.leaves(params)))
  np.testing.assert_allclose(value, manual, rtol=1e-5)


def test_ewc_state_is_exactly_the_sum_of_per_task_penalties():
  """Kirkpatrick et al.: one penalty per finished task; the merged quadratic must equal their sum."""
  rng = np.random.default_rng(0)
  shape = {"a": (5,), "b": (2, 3)}

  def tree():
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shape.items()}

  fishers = [jax.tree.map(jnp.abs, tree()) for _ in range(3)]
  fishers[1]["a"] = fishers[1]["a"].at[0].set(0.0)   # zero curvature somewhere
  anchors = [tree() for _ in range(3)]
  state = dict(fisher=jax.tree.map(jnp.zeros_like, anchors[0]), anchor=anchors[0],
               const=jnp.zeros(()), tasks=jnp.zeros((), jnp.int32))
  for f, a in zip(fishers, anchors):
    state = consolidate(state, a, f, online=False, gamma=1.0)
  theta = tree()
  expected = sum(float(jnp.sum(f[k] * (theta[k] - a[k]) ** 2))
                 for f, a in zip(fishers, anchors) for k in shape)
  np.testing.assert_allclose(float(ewc_penalty(theta, state)), expected, rtol=1e-5)
  assert int(state["tasks"]) == 3


def test_online_ewc_decays_the_running_fisher_and_keeps_the_latest_anchor():
  learner, params = _logreg()
  gamma = 0.5
  strategy = build_strategy("online_ewc", _config(**{"ewc.gamma": gamma}), learner)
  state = strategy.init(params, TaskInfo(3, 4, (3,)))
  p1, p2 = _perturb(params, 0.2, 1), _perturb(params, 0.2, 2)
  d1, d2 = _task_data(task_index=0, seed=1), _task_data(task_index=1, seed=2)
  s1 = strategy.after_task(state, p1, d1, jax.random.key(0))
  s2 = strategy.after_task(s1, p2, d2, jax.random.key(0))
  from cl_jax.strategies.fisher import fisher_diagonal
  f1 = fisher_diagonal(learner, p1, d1.x, d1.y, d1.task, 0, kind="exact")
  f2 = fisher_diagonal(learner, p2, d2.x, d2.y, d2.task, 1, kind="exact")
  for got, a, b in zip(jax.tree.leaves(s2["fisher"]), jax.tree.leaves(f1), jax.tree.leaves(f2)):
    np.testing.assert_allclose(got, gamma * a + b, rtol=1e-5, atol=1e-8)
  for got, want in zip(jax.tree.leaves(s2["anchor"]), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(got, want)
  assert float(s2["const"]) == 0.0
  # The state does not grow with tasks.
  assert jax.tree.structure(s2) == jax.tree.structure(state)


def test_ewc_rejects_bad_settings_by_name():
  learner, _ = _logreg()
  with pytest.raises(ValueError, match="fisher.kind='diag'"):
    build_strategy("ewc", _config(**{"fisher.kind": "diag"}), learner)
  with pytest.raises(ValueError, match="ewc.gamma"):
    build_strategy("ewc", _config(**{"ewc.gamma": 1.5}), learner)


# ------------------------------------------------------------------------------------ distillation


def test_distillation_is_zero_when_student_is_teacher_and_positive_otherwise():
  learner, params = _logreg()
  strategy = build_strategy("lwf", _config(**{"distill.alpha": 2.0}), learner)
  state = strategy.init(params, TaskInfo(3, 4, (3,)))

  def base(p, b, c):
    return jnp.zeros(()), {}

  loss = strategy.loss(base)
  batch = {"x": jnp.asarray(_task_data(task_index=1).x), "y": jnp.zeros(40, jnp.int32),
           "task": jnp.ones(40, jnp.int32)}
  ctx = LossContext(state, jax.random.key(0), jnp.int32(1))
  moved = _perturb(params, 0.5, 3)
  assert float(loss(moved, batch, ctx)[0]) == 0.0          # no teacher before the first task ends
  state = strategy.after_task(state, params, _task_data(), jax.random.key(0))
  ctx = ctx._replace(strategy_state=state)
  assert abs(float(loss(params, batch, ctx)[0])) < 1e-6
  grad = jax.grad(lambda p: loss(p, batch, ctx)[0])(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) < 1e-5
  value = float(loss(moved, batch, ctx)[0])
  # By hand: the old classes (0, 1) only, T = 2, α = 2.
  t = jax.nn.log_softmax(learner.apply(params, batch["x"], None)[:, :2] / 2)
  s = jax.nn.log_softmax(learner.apply(moved, batch["x"], None)[:, :2] / 2)
  manual = 2.0 * 4.0 * float(jnp.mean(jnp.sum(jnp.exp(t) * (t - s), -1)))
  np.testing.assert_allclose(value, manual, rtol=1e-5)
  assert value > 1e-3


def test_tasks_seen_weighting_is_one_over_t_of_the_task_loss():
  """distill.weighting=tasks_seen (van de Ven & Tolias 2019's code): (1/t) L_task + α (1 - 1/t) KD on task t."""
  learner, params = _logreg()
  batch = {"x": jnp.asarray(_task_data(task_index=1).x), "y": jnp.zeros(40, jnp.int32),
           "task": jnp.ones(40, jnp.int32)}

  def base(p, b, c):
    return jnp.float32(3.0), {}

  moved = _perturb(params, 0.5, 3)
  values = {}
  for weighting in ("constant", "tasks_seen"):
    strategy = build_strategy("lwf", _config(**{"distill.weighting": weighting}), learner)
    state = strategy.init(params, TaskInfo(3, 4, (3,)))
    ctx = LossContext(state, jax.random.key(0), jnp.int32(0))
    first = float(strategy.loss(base)(moved, batch, ctx)[0])
    for _ in range(2):  # two tasks finished: t = 3
      state = strategy.after_task(state, params, _task_data(), jax.random.key(0))
    value, aux = strategy.loss(base)(moved, batch, ctx._replace(strategy_state=state, task_index=jnp.int32(2)))
    values[weighting] = (first, float(value), float(aux["distill_loss"]))
  kd = values["constant"][2]
  assert kd > 1e-3 and values["constant"][0] == values["tasks_seen"][0] == 3.0  # task 1: the task loss alone
  np.testing.assert_allclose(values["constant"][1], 3.0 + kd, rtol=1e-6)
  np.testing.assert_allclose(values["tasks_seen"][1], 3.0 / 3 + (2 / 3) * kd, rtol=1e-6)
  with pytest.raises(ValueError, match="distill.weighting='sometimes'"):
    build_strategy("lwf", _config(**{"distill.weighting": "sometimes"}), learner)


def test_distillation_loss_ignores_masked_classes():
  teacher = jnp.array([[1.0, 2.0, -1e9]])
  student = jnp.array([[1.0, 2.0, -1e9]])
  assert float(distillation_loss(student, teacher, 2.0)[0]) == 0.0
  assert float(distillation_loss(student.at[0, 0].set(3.0), teacher, 2.0)[0]) > 0.0


def test_task_il_distillation_visits_every_finished_task_head():
  # Two heads stacked: logits of head k are columns [2k, 2k+1].
  def apply(p, x, task):
    z = (x @ p["w"]).reshape(x.shape[0], 3, 2)
    return jnp.take_along_axis(z, task[:, None, None], axis=1)[:, 0]
  learner = Learner(apply, lambda task, task_index: None)
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)}
  strategy = build_strategy("distill", _config(kind="task", num_tasks=3), learner)
  state = strategy.init(params, TaskInfo(3, 2, (3,)))
  state = strategy.after_task(state, params, _task_data(), jax.random.key(0))
  state = strategy.after_task(state, params, _task_data(), jax.random.key(0))
  x = jnp.asarray(_task_data().x)
  batch = {"x": x, "y": jnp.zeros(40, jnp.int32), "task": jnp.full(40, 2, jnp.int32)}
  # Change only head 2 (the current task's): nothing to distill. Change head 0: penalised.
  loss = strategy.loss(lambda p, b, c: (jnp.zeros(()), {}))
  ctx = LossContext(state, jax.random.key(0), jnp.int32(2))
  head2 = {"w": params["w"].at[:, 4:].add(1.0)}
  head0 = {"w": params["w"].at[:, :2].add(jnp.array([1.0, -1.0]))}
  assert abs(float(loss(head2, batch, ctx)[0])) < 1e-6
  assert float(loss(head0, batch, ctx)[0]) > 1e-3


# ------------------------------------------------------------------------------------------ replay


def test_reservoir_keeps_each_stream_element_with_probability_capacity_over_n():
  """Stream of 60 fed as two tasks of 30 into 10 slots, 4000 seeds: P(kept) = 1/6 for every element."""
  capacity, n, trials = 10, 60, 4000
  stream = jnp.arange(n, dtype=jnp.float32)[:, None]

  def run(key):
    k1, k2 = jax.random.split(key)
    buf = empty_buffer(capacity, (1,))
    buf = reservoir_add(buf, stream[:30], jnp.zeros(30, jnp.int32), jnp.zeros(30, jnp.int32), k1)
    buf = reservoir_add(buf, stream[30:], jnp.zeros(30, jnp.int32), jnp.ones(30, jnp.int32), k2)
    return jnp.zeros(n).at[buf["x"][:, 0].astype(jnp.int32)].add(1.0), buf["size"]

  counts, sizes = jax.vmap(run)(jax.random.split(jax.random.key(0), trials))
  assert np.all(np.asarray(sizes) == capacity)
  assert np.all(np.asarray(counts).sum(1) == capacity)      # no element twice, no empty slot
  freq = np.asarray(counts).mean(0)
  p = capacity / n
  sigma = np.sqrt(p * (1 - p) / trials)
  assert np.abs(freq - p).max() < 4.5 * sigma
  chi2 = float(np.sum((freq - p) ** 2 / sigma ** 2))
  assert chi2 < 100.0   # χ² with 60 dof (loosely; elements are not independent): mean 60, sd 11
  # The first task's elements are not favoured over the second's (nor the other way round).
  assert abs(freq[:30].mean() - freq[30:].mean()) < 4.5 * sigma / np.sqrt(30)


def test_reservoir_fills_before_replacing():
  buf = empty_buffer(8, (1,))
  x = jnp.arange(5, dtype=jnp.float32)[:, None]
  buf = reservoir_add(buf, x, jnp.arange(5), jnp.zeros(5, jnp.int32), jax.random.key(0))
  assert int(buf["size"]) == 5 and int(buf["seen"]) == 5
  np.testing.assert_array_equal(buf["x"][:5, 0], np.arange(5))


def test_class_balanced_buffer_keeps_an_equal_share_per_class():
  capacity = 20
  buf = empty_buffer(capacity, (1,))
  rng = np.random.default_rng(0)
  for t in range(2):
    y = (2 * t + rng.integers(0, 2, 50)).astype(np.int32)
    x = (1000 * y + np.arange(50)).astype(np.float32)[:, None]   # x encodes its class
    buf = class_balanced_add(buf, jnp.asarray(x), jnp.asarray(y), jnp.full(50, t, jnp.int32),
                             jax.random.key(t))
    size = int(buf["size"])
    ys = np.asarray(buf["y"][:size])
    assert size == capacity
    np.testing.assert_array_equal(np.bincount(ys), [capacity // (2 * (t + 1))] * (2 * (t + 1)))
    np.testing.assert_array_equal(np.asarray(buf["x"][:size, 0]) // 1000, ys)
  capped = class_balanced_add(empty_buffer(capacity, (1,)), jnp.asarray(x), jnp.asarray(y),
                              jnp.ones(50, jnp.int32), jax.random.key(0), per_class=3)
  assert int(capped["size"]) == 6


def test_one_buffer_type_carries_extra_fields_through_every_policy_and_draw():
  """`buffer.Buffer`: an extra per-slot field (DER's logits) follows its example through reservoir, balanced and
  greedy insertion and through both draws; the per-task quota; the type is sharded like a batch."""
  from cl_jax.sharding import BATCH_AXIS_TYPES
  from cl_jax.strategies import buffer as buffer_lib
  n, capacity = 30, 12
  y = jnp.asarray(np.arange(n) % 3, jnp.int32)
  task = jnp.asarray(np.arange(n) // 10, jnp.int32)                       # three tasks of 10
  x = jnp.arange(n, dtype=jnp.float32)[:, None]                           # x = stream position
  examples = {"x": x, "y": y, "task": task, "logits": jnp.stack([x[:, 0], -x[:, 0]], 1)}

  def check_rows(buf):   # every valid slot holds one example whole: its label, task and logits
    size = int(buf.size)
    pos = np.asarray(buf.x[:size, 0]).astype(int)
    np.testing.assert_array_equal(buf.y[:size], pos % 3)
    np.testing.assert_array_equal(buf.task[:size], pos // 10)
    np.testing.assert_array_equal(buf["logits"][:size], np.stack([pos, -pos], 1))
    return pos

  empty = buffer_lib.empty(capacity, (1,), extra={"logits": (2,)})
  assert type(empty) in BATCH_AXIS_TYPES and empty.logits.shape == (capacity, 2)
  res = buffer_lib.reservoir_add(empty, examples, jax.random.key(0))
  assert int(res.size) == capacity and int(res.seen) == n and len(set(check_rows(res))) == capacity
  by_task = buffer_lib.empty(capacity, (1,), extra={"logits": (2,)})
  for t in range(3):   # per-task quota: capacity // tasks seen, each a subset of its own task
    part = {k: v[10 * t:10 * (t + 1)] for k, v in examples.items()}
    by_task = buffer_lib.balanced_add(by_task, part, jax.random.key(t), by="task")
    pos = check_rows(by_task)
    np.testing.assert_array_equal(np.bincount(pos // 10, minlength=t + 1), [min(10, capacity // (t + 1))] * (t + 1))
  assert int(by_task.seen) == n
  greedy, counts, _ = buffer_lib.greedy_balanced_add(empty, jnp.zeros(9, jnp.int32), jnp.zeros(9, bool), examples,
                                                     jax.random.key(1), num_outputs=3)
  check_rows(greedy)
  np.testing.assert_array_equal(np.bincount(np.asarray(greedy.task) * 3 + np.asarray(greedy.y), minlength=9), counts)
  drawn = buffer_lib.sample(res, jax.random.key(2), 50)
  assert set(drawn) == {"x", "y", "task", "logits"}
  np.testing.assert_array_equal(drawn["logits"][:, 0], drawn["x"][:, 0])
  half = buffer_lib.reservoir_add(empty, {k: v[:5] for k, v in examples.items()}, jax.random.key(0))
  assert set(np.asarray(buffer_lib.sample(half, jax.random.key(3), 200)["x"][:, 0]).astype(int)) == set(range(5))
  order = np.asarray(buffer_lib.epoch_order(half, jax.random.key(4)))
  assert sorted(order[:5].tolist()) == list(range(5)) and sorted(order.tolist()) == list(range(capacity))
  with pytest.raises(ValueError, match="logits"):
    buffer_lib.reservoir_add(empty, {"x": x, "y": y, "task": task}, jax.random.key(0))


def test_replay_loss_weights_the_replay_batch_and_ignores_an_empty_buffer():
  learner, params = _logreg()
  config = _config(**{"replay.capacity": 16, "replay.batch_size": 8, "replay.weight": 0.5})
  strategy = build_strategy("replay", config, learner)
  state = strategy.init(params, TaskInfo(3, 4, (3,)))
  base = _task_loss(learner)
  loss = jax.jit(strategy.loss(base))
  cur = _task_data(n=16, task_index=1, seed=5)
  batch = {"x": jnp.asarray(cur.x), "y": jnp.asarray(cur.y), "task": jnp.asarray(cur.task)}
  ctx = LossContext(state, jax.random.key(0), jnp.int32(1))
  value, aux = loss(params, batch, ctx)
  np.testing.assert_allclose(value, base(params, batch, ctx)[0], rtol=1e-6)   # empty: plain loss
  state = strategy.after_task(state, params, _task_data(n=16, task_index=0), jax.random.key(1))
  ctx = ctx._replace(strategy_state=state)
  value, aux = loss(params, batch, ctx)
  assert float(aux["replay_size"]) == 16
  # (mean over the current batch + w · mean over the replay draw) / (1 + w), same draw by hand.
  from cl_jax.strategies.replay import sample_replay_batch
  drawn = sample_replay_batch(state, jax.random.fold_in(ctx.rng, 0x5E9A7), 8)
  cur_loss = base(params, batch, ctx)[0]
  rep_loss = base(params, drawn, ctx)[0]
  np.testing.assert_allclose(value, (cur_loss + 0.5 * rep_loss) / 1.5, rtol=1e-5)
  assert abs(float(rep_loss - cur_loss)) > 1e-3   # the two terms differ, so the weighting is tested


# ------------------------------------------------------------------------------------------- chain


def test_chain_of_ewc_lwf_and_replay_trains_under_jit():
  learner, params = _logreg()
  strategy = build_strategy("ewc+lwf+replay", _config(**{"replay.capacity": 32, "ewc.lam": 1.0}),
                            learner)
  state = strategy.init(params, TaskInfo(3, 4, (3,)))
  state = strategy.after_task(state, params, _task_data(), jax.random.key(0))
  loss = strategy.loss(_task_loss(learner))
  cur = _task_data(task_index=1, seed=3)
  batch = {"x": jnp.asarray(cur.x), "y": jnp.asarray(cur.y), "task": jnp.asarray(cur.task)}

  @jax.jit
  def step(p, key):
    ctx = LossContext(state, key, jnp.int32(1))
    (value, aux), g = jax.value_and_grad(loss, has_aux=True)(p, batch, ctx)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), value, aux

  p, first, aux = step(params, jax.random.key(0))
  assert set(aux) >= {"ce", "ewc_penalty", "distill_loss", "replay_size"}
  for i in range(20):
    p, value, aux = step(p, jax.random.key(i))
  assert float(aux["ewc_penalty"]) > 0 and float(aux["distill_loss"]) > 0
  assert float(value) < float(first)


# ------------------------------------------------------------------------------- end to end (digits)


def test_split_digits_ewc_lwf_and_replay_each_forget_less_than_naive(tmp_path):
  """Domain-incremental Split Digits through `cl_jax.run`, fixed seed, 60 steps a task: the BWT of EWC, LwF and ER
  each above naive's."""
  import cl_jax
  from conftest import tiny_config
  settings = {"naive": {}, "ewc": {"ewc.lam": 1e4}, "lwf": {},
              "replay": {"replay.capacity": 100, "replay.batch_size": 32}}
  bwt = {}
  for name, overrides in settings.items():
    results = cl_jax.run(tiny_config(name, kind="domain", **overrides), str(tmp_path / name), progress=False)
    bwt[name] = results.bwt
  assert bwt["naive"] < -0.1, bwt       # the setting forgets, so beating it means something
  for name in ("ewc", "lwf", "replay"):
    assert bwt[name] > bwt["naive"] + 0.05, bwt


def _results_without_timing(workdir):
  import json
  import os
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  r.pop("timing", None)
  return r


def test_strategy_state_survives_checkpoint_and_resume(tmp_path, monkeypatch):
  """A chain holding every kind of strategy state (a Fisher, a teacher, a task-end buffer, SI's per-step path
  integral, DER++'s per-step buffer of logits) through `cl_jax.run`: a run that diverges mid-task 2 (NaN inputs at
  step 31) stops before saving the bad state; rerun on its workdir, it resumes from the mid-task checkpoint at step
  24 and ends with exactly the results of the run that never stopped."""
  import cl_jax
  from conftest import tiny_config
  from cl_jax.errors import DivergenceError
  from cl_jax.faults import NAN_ENV
  config = tiny_config("ewc+lwf+replay+si+derpp", steps=20, **{
      "scenario.num_tasks": 2, "checkpoint.every_steps": 8, "ewc.lam": 100.0, "replay.capacity": 64,
      "replay.batch_size": 16, "der.capacity": 64, "der.batch_size": 16, "si.c": 1.0})
  straight = cl_jax.run(config, str(tmp_path / "straight"), progress=False)
  monkeypatch.setenv(NAN_ENV, "31")
  with pytest.raises(DivergenceError):
    cl_jax.run(config, str(tmp_path / "crashed"), progress=False)
  monkeypatch.delenv(NAN_ENV)
  resumed = cl_jax.run(config, str(tmp_path / "crashed"), progress=False)
  np.testing.assert_array_equal(resumed.accuracy_matrix, straight.accuracy_matrix)
  assert _results_without_timing(tmp_path / "crashed") == _results_without_timing(tmp_path / "straight")


def test_bad_strategy_settings_fail_config_validation_by_name():
  from conftest import tiny_config
  from cl_jax.config import ConfigError
  from cl_jax.kinds import validate
  for strategy, key, value, needle in [("ewc", "fisher.kind", "diag", "fisher.kind"),
                                       ("online_ewc", "ewc.gamma", 2.0, "ewc.gamma"),
                                       ("lwf", "distill.temperature", 0.0, "distill.temperature"),
                                       ("ewc+replay", "replay.policy", "fifo", "replay.policy")]:
    with pytest.raises(ConfigError, match=needle):
      validate(tiny_config(strategy, **{key: value}))
  validate(tiny_config("ewc+lwf+replay"))   # the defaults are valid


_SHARDED_SCRIPT = """
import tempfile
import jax, numpy as np
from conftest import tiny_config
from cl_jax.checkpoint import Checkpoints
from cl_jax.train.loop import build, classic_plan, run_tasks
config = tiny_config('ewc+lwf+replay+si+derpp', kind='class', steps=5, **{
    'mesh.data': 4, 'mesh.fsdp': 2, 'scenario.num_tasks': 2, 'replay.capacity': 64, 'replay.batch_size': 16,
    'der.capacity': 64, 'der.batch_size': 16})
setup = build(config)
workdir = tempfile.mkdtemp()
checkpoints = Checkpoints(workdir)
out = run_tasks(classic_plan(config, setup), workdir, checkpoints, resume=False, progress=False)
checkpoints.close()
ewc, lwf, buffer, si, der = out.state.strategy_state
for leaf in (ewc['fisher']['dense_0']['kernel'], si['omega']['dense_0']['kernel']):
  assert tuple(leaf.sharding.spec) == ('fsdp', None), leaf.sharding
assert tuple(der.x.sharding.spec)[0] == ('data', 'fsdp'), der.x.sharding
assert int(buffer['size']) == 64 and float(np.sum(np.asarray(ewc['fisher']['head']['kernel']))) > 0
assert int(der.seen) == 10 * 32 and float(np.abs(np.asarray(si['importance']['head']['kernel'])).sum()) > 0
assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(out.state.params))
print('OK', len(jax.devices()))
"""


def test_strategies_train_on_a_sharded_mesh():
  """ewc+lwf+replay+si+derpp through the task loop on 8 fake CPU devices (data 4 x fsdp 2): Fisher, SI's path
  integral and the buffers sharded, steps run."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=os.path.join(root, "tests"), env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK 8" in out.stdout
