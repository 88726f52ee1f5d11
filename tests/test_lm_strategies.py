"""Strategies on LM continual pre-training (issue 20 item 3): which ones an LM run allows is computed from what they
need, and the ones it gained (SI, MAS, A-GEM, DER / DER++, O-LoRA) do on a tiny LM what they are for.

The tests drive the runner's own pieces (`pretrain_phase` / `adapt_phase`: its step, with the strategy's hooks, and
its task-boundary hooks) on synthetic token data, without the evaluator and the monitor, so each takes seconds.
General text draws tokens from [0, 64), domain text from [64, 128): training on the domain moves the model away
from general text, which the penalties should resist.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax import lm, sharding
from cl_jax.lm import runner
from cl_jax.lm.config import DOMAIN, GENERAL, LM_PROVIDES, lm_strategies
from cl_jax.lm.data import CPTData

SEQ_LEN, VOCAB, PRETRAIN_STEPS, ADAPT_STEPS = 17, 256, 8, 6


class _Tokenizer(NamedTuple):
  vocab_size: int = VOCAB


def _config(strategy: str = "naive", **changes):
  c = lm.default_config()
  c.lm.update(d_model=32, num_layers=1, num_heads=2, seq_len=SEQ_LEN)
  c.text.cloze_context = 8
  c.optim.lr = 1e-2
  c.pretrain.update(steps=PRETRAIN_STEPS, batch_size=8)
  c.adapt.update(steps=ADAPT_STEPS, batch_size=8, lr_ratio=1.0, mixture="domain_only")
  c.optim.schedule = "constant"
  c.train.update(log_norms=False, log_every_steps=1000)
  c.strategy = strategy
  for key, value in changes.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


class Setup(NamedTuple):
  data: CPTData
  model: object
  host_params: object   # on the host: a train step donates its state, so each use puts a fresh copy
  mesh: object

  @property
  def params(self):
    return jax.tree.map(jnp.asarray, self.host_params)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  train = {GENERAL: rng.integers(0, 64, (48, SEQ_LEN)).astype(np.int32),
           DOMAIN: rng.integers(64, 128, (48, SEQ_LEN)).astype(np.int32)}
  data = CPTData(_Tokenizer(), train, {r: np.arange(48, dtype=np.int32) for r in train}, {}, {},
                 {r: 48 for r in train})
  from cl_jax.models.transformer import init_lm
  c = _config()
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
  model, params = init_lm(runner.model_config(c, VOCAB), c.seed, mesh)
  return Setup(data, model, jax.device_get(params), mesh)


def _train(plan, state, task: int, steps: int):
  source = plan.batches(task, None)
  for _ in range(steps):
    state, metrics = plan.train_step(state, plan.put_batch(next(source), False))
    assert bool(metrics["_finite"]), metrics
  return state


@pytest.fixture(scope="module")
def pretrained(setup):
  """The base pre-trained with SI's path integral running in the step (SI's penalty is 0 while Ω = 0)."""
  c = _config("si")
  phase = runner.pretrain_phase(c, setup.data, setup.model, setup.params, setup.mesh)
  state = _train(phase.plan, phase.plan.state, 0, PRETRAIN_STEPS)
  return state.params, state.strategy_state


def _adapt(c, setup, base, path=None, steps=ADAPT_STEPS):
  """The adaptation plan's general task (0 steps, its after_task) and `steps` steps of the domain task."""
  phase = runner.adapt_phase(c, setup.data, setup.model, base, setup.mesh, pretrain_path=path)
  plan = phase.plan
  initial = jax.device_get(plan.state.params)
  state = plan.after_task(plan.begin_task(plan.state, 0, 0), 0)
  after_general = jax.device_get(state.strategy_state)
  state = _train(plan, plan.begin_task(state, 1, 0), 1, steps)
  return phase, initial, after_general, state


@pytest.fixture(scope="module")
def naive_adapted(setup, pretrained):
  return _adapt(_config("naive"), setup, pretrained[0])[3].params


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def _weighted_distance(params, importance, anchor) -> float:
  """Σ Ω (θ − θ*)²: the quadratic SI and MAS add (without its strength)."""
  return sum(float(np.sum(w * (p - a) ** 2)) for p, w, a in zip(_leaves(params), _leaves(importance), _leaves(anchor)))


def test_lm_strategies_are_computed_from_needs_and_refusals_name_the_capability():
  from cl_jax.kinds import validate
  from cl_jax.errors import ConfigError
  from cl_jax.strategies import REGISTRY, allowed
  names = lm_strategies()
  assert {"naive", "distill", "lwf", "ewc", "online_ewc", "generative_replay", "lora",
          "si", "mas", "agem", "der", "derpp", "olora"} <= set(names)
  assert not {"replay", "gdumb", "icarl", "joint", "packnet", "progressive"} & set(names)
  assert names == allowed(LM_PROVIDES) and all(REGISTRY[n].needs <= LM_PROVIDES for n in names)
  for spec, needle in (("replay", "replay (needs class_labels"), ("gdumb", "gdumb (needs class_labels"),
                       ("si+joint", "joint (needs train_tasks"), ("gdumb", "predict")):
    c = _config(spec)
    with pytest.raises(ConfigError, match=rf"^strategy='{spec.replace('+', '[+]')}': kind 'lm' cannot run") as e:
      validate(c)
    assert needle in str(e.value) and "\n" not in str(e.value)
  # A setting adds a need: a class-balanced memory balances on class labels, which token targets are not.
  with pytest.raises(ConfigError, match="agem .needs class_labels for agem.policy='class_balanced'"):
    validate(_config("agem", **{"agem.policy": "class_balanced"}))
  for spec in ("si", "mas", "agem", "der", "derpp", "olora", "si+agem", "mas+distill"):
    validate(_config(spec))
  with pytest.raises(ConfigError, match="^strategy='si': SI's importance is the path integral"):
    validate(_config("si", **{"pretrain.steps": 0}))
  with pytest.raises(ConfigError, match="^strategy='mas[+]lora': mas with lora"):
    validate(_config("mas+lora"))


def test_si_weighs_the_path_of_pretraining_and_pulls_towards_the_base(setup, pretrained, naive_adapted):
  """Zenke et al. 2017: ω integrates -g·Δθ along the base's pre-training (the update hook in the pre-training
  step), the general task's end turns it into Ω with the base as anchor, and the domain task pays c Σ Ω (θ − θ*)²."""
  base, path = pretrained
  assert sum(float(np.abs(w).sum()) for w in _leaves(path["omega"])) > 0
  for a, p in zip(_leaves(path["anchor"]), _leaves(setup.host_params)):   # the anchor is where pre-training started
    np.testing.assert_array_equal(a, p)
  phase, _, after_general, state = _adapt(_config("si", **{"si.c": 1e4}), setup, base, path)
  importance = after_general["importance"]
  assert sum(float(np.sum(w)) for w in _leaves(importance)) > 0
  assert all(np.all(w == 0) for w in _leaves(after_general["omega"]))
  for a, p in zip(_leaves(after_general["anchor"]), _leaves(base)):
    np.testing.assert_array_equal(a, p)
  si_distance = _weighted_distance(state.params, importance, base)
  naive_distance = _weighted_distance(naive_adapted, importance, base)
  assert si_distance < 0.5 * naive_distance, (si_distance, naive_distance)
  assert sum(float(np.abs(w).sum()) for w in _leaves(state.strategy_state["omega"])) > 0   # the domain's own path


def test_mas_importance_of_the_general_text_pulls_towards_the_base(setup, pretrained, naive_adapted):
  """Aljundi et al. 2018: Ω = mean over general sequences of |∂‖f(x)‖²/∂θ| (f: the token logits [L, V])."""
  base = pretrained[0]
  phase, _, after_general, state = _adapt(_config("mas", **{"mas.lam": 10.0, "mas.num_examples": 16}), setup, base)
  importance = after_general["importance"]
  assert all(np.all(w >= 0) for w in _leaves(importance))
  assert sum(float(np.sum(w)) for w in _leaves(importance)) > 0
  for a, p in zip(_leaves(after_general["anchor"]), _leaves(base)):
    np.testing.assert_array_equal(a, p)
  mas_distance = _weighted_distance(state.params, importance, base)
  naive_distance = _weighted_distance(naive_adapted, importance, base)
  assert mas_distance < 0.5 * naive_distance, (mas_distance, naive_distance)


def test_agem_remembers_general_sequences_and_projects_the_domain_gradient(setup, pretrained):
  """Chaudhry et al. 2019: the memory holds general sequences (token ids, next-token targets); the step's gradient
  is projected so that its dot product with the memory's reference gradient is not negative."""
  from cl_jax.losses import next_token_loss
  from cl_jax.strategies import LossContext, agem as agem_lib, replay as replay_lib
  base = pretrained[0]
  c = _config("agem", **{"agem.capacity": 32, "agem.batch_size": 8})
  phase, _, memory, state = _adapt(c, setup, base)
  assert int(memory.size) == 32 and memory.y.shape == (32, SEQ_LEN - 1)
  general = setup.data.train[GENERAL]
  rows = {tuple(r) for r in general[:, :-1].tolist()}
  assert all(tuple(r) in rows for r in np.asarray(memory.x, np.int64).tolist())   # real general sequences
  np.testing.assert_array_equal(np.asarray(memory.x[:, 1:], np.int64), np.asarray(memory.y[:, :-1]))

  learner, strategy = phase.learner, phase.strategy
  domain = setup.data.train[DOMAIN][:8]
  batch = {"x": jnp.asarray(domain[:, :-1]), "y": jnp.asarray(domain[:, 1:]), "task": jnp.ones((8,), jnp.int32)}
  loss_fn = next_token_loss(learner)

  @jax.jit
  def dots(params, memory, batch, rng):
    """(gᵀ g_ref, g̃ᵀ g_ref) for g the domain gradient and for g = −g_ref, and g_refᵀ g_ref."""
    ctx = LossContext(memory, rng, jnp.int32(1))
    g = jax.grad(lambda p: loss_fn(p, batch, ctx)[0])(params)
    drawn = replay_lib.sample_replay_batch(memory, jax.random.fold_in(rng, agem_lib._MEMORY_STREAM), 8)
    x = drawn["x"].astype(jnp.int32)
    g_ref = jax.grad(lambda p: agem_lib.mean_cross_entropy(learner.apply(p, x, drawn["task"]), drawn["y"]))(params)
    out = []
    for grads in (g, jax.tree.map(jnp.negative, g_ref)):   # the domain's gradient, and one against the memory's
      projected = strategy.grads(memory, grads, params, batch, ctx, loss_fn)
      out.append((agem_lib.tree_vdot(grads, g_ref), agem_lib.tree_vdot(projected, g_ref)))
    return out, agem_lib.tree_vdot(g_ref, g_ref)

  pairs, norm = jax.device_get(dots(base, memory, batch, jax.random.PRNGKey(3)))
  assert norm > 0 and pairs[1][0] < 0
  for before, after in pairs:
    assert after >= -1e-5 * norm, (before, after)
    if before < 0:   # a conflict was projected away, not left in
      assert abs(after) <= 1e-4 * norm, (before, after)
  assert any(np.any(a != b) for a, b in zip(_leaves(state.params), _leaves(base)))   # and the model trained


def test_olora_trains_only_its_domain_slot(setup, pretrained, monkeypatch):
  """Wang et al. 2023: one adapter slot per task on the frozen base; the domain task trains slot 1 alone, under the
  orthogonality penalty against slot 0's A (snapshot at the general task's end). The LM step is built with the
  strategy (its hooks run), and a task's first step starts the optimizer anew (`reset_optimizer`)."""
  from cl_jax.train import step as step_lib
  seen, make = [], step_lib.make_train_step
  monkeypatch.setattr(step_lib, "make_train_step", lambda *a, **k: seen.append(k.get("strategy")) or make(*a, **k))
  base = pretrained[0]
  c = _config("olora", **{"lora.rank": 4})
  phase, before, after_general, state = _adapt(c, setup, base)
  assert seen == [phase.strategy] and phase.strategy.reset_optimizer
  plan = phase.plan
  assert any(np.any(x != 0) for x in _leaves(state.opt_state))   # Adam's moments moved
  fresh = jax.device_get(plan.begin_task(state, 1, 0).opt_state)   # the task's first step: the optimizer anew
  for a in jax.tree.leaves(fresh):
    assert np.all(np.asarray(a) == 0)   # Adam's count and moments (the scale-by-schedule keeps no state)
  resumed = jax.device_get(plan.begin_task(state, 1, 1).opt_state)   # mid-task (a resume): kept
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(jax.device_get(state.opt_state))):
    np.testing.assert_array_equal(a, b)
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(after["base"]), jax.tree.leaves(before["base"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(after["adapters"]["task_0"]), jax.tree.leaves(before["adapters"]["task_0"])):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(after["adapters"]["task_1"]),
                                            jax.tree.leaves(before["adapters"]["task_1"])))
  slot0 = {p: np.asarray(layer["A"]) for p, layer in before["adapters"]["task_0"].items()}
  for p, a_old in after_general["A_old"].items():   # slot 0's A is what the penalty reads
    np.testing.assert_array_equal(np.asarray(a_old[0]), slot0[p])
  # The kept model exported as plain params: every slot folded into the base.
  from cl_jax.strategies.lora import merged_params
  merged = merged_params(state.params, c)
  assert jax.tree.structure(merged) == jax.tree.structure(base)


def test_der_keeps_token_rows_with_their_next_token_logits(setup, pretrained):
  """Buzzega et al. 2020 on a language model: the buffer keeps token rows, their next tokens and the model's whole
  response [L, V] at the step they were seen; DER++'s two terms then read it (logit matching and next-token CE)."""
  base = pretrained[0]
  c = _config("derpp", **{"der.capacity": 16, "der.batch_size": 4})
  assert "der" in lm_strategies() and "derpp" in lm_strategies()
  phase, _, _, state = _adapt(c, setup, base, steps=2)   # 2 steps x 8 rows: the reservoir's first 16 fill it
  buf = jax.device_get(state.strategy_state)
  assert buf.extra["logits"].shape == (16, SEQ_LEN - 1, VOCAB) and buf.y.shape == (16, SEQ_LEN - 1)
  assert int(buf.size) == 16 and int(buf.seen) == 16
  rows = {tuple(r) for r in setup.data.train[DOMAIN]}
  x = np.asarray(buf.x).astype(np.int32)
  for xi, yi in zip(x, np.asarray(buf.y)):
    assert tuple(xi) + (int(yi[-1]),) in rows and np.array_equal(xi[1:], yi[:-1])  # real rows, next tokens
  # the first step's rows (slots 0..7) carry the base model's logits: the forward pass of the step that saw them
  want = np.asarray(setup.model.apply(base, jnp.asarray(x[:8]), jnp.asarray(buf.task[:8])))
  np.testing.assert_allclose(np.asarray(buf.extra["logits"][:8]), want, atol=2e-4, rtol=1e-4)
  plan = phase.plan
  _, metrics = plan.train_step(state, plan.put_batch(next(plan.batches(1, {"step": 2})), False))
  assert float(metrics["der_logit_mse"]) > 0 and float(metrics["der_buffer_ce"]) > 0
  assert float(metrics["loss"]) > float(metrics["task_loss"])
