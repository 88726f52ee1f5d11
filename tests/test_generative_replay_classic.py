"""Classic generative replay (DGR, Shin et al. 2017; van de Ven & Tolias 2019): a VAE trained beside the classifier
replays inputs labelled by the previous model. Two-task Split Digits, class-IL (where fine-tuning forgets task 1
completely), a small MLP and VAE."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import metrics_bytes, tiny_config

DGR = {"scenario.num_tasks": 2, "optim.lr": 3e-3, "train.steps_per_call": 10, "train.log_norms": False,
       "checkpoint.every_steps": 50, "generative_replay.latent": 8, "generative_replay.vae_hidden": [64],
       "generative_replay.replay_batch_size": 32, "generative_replay.vae_lr": 3e-3}
STEPS = 100


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  import cl_jax
  w = tmp_path_factory.mktemp("dgr")
  return cl_jax.run(tiny_config("generative_replay", steps=STEPS, **DGR), str(w / "straight"), progress=False), w


def test_dgr_forgets_less_than_naive(straight):
  import cl_jax
  dgr, w = straight
  naive = cl_jax.run(tiny_config("naive", steps=STEPS, **DGR), str(w / "naive"), progress=False)
  r_dgr, r_naive = np.asarray(dgr.accuracy_matrix), np.asarray(naive.accuracy_matrix)
  # Same init, same first task (nothing is replayed in task 1): the rows after task 1 agree exactly.
  np.testing.assert_array_equal(r_dgr[1], r_naive[1])
  assert r_naive[2, 0] < 0.05  # class-IL fine-tuning forgets task 1 ...
  assert r_dgr[2, 0] > r_naive[2, 0] + 0.3, (r_dgr.tolist(), r_naive.tolist())  # ... the replayed VAE samples keep it
  assert r_dgr[2, 1] > 0.8  # and task 2 is still learnt
  with open(w / "straight" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if '"train"' in line]
  replay = [(r["step"], r["dgr_replay_loss"]) for r in rows if "dgr_replay_loss" in r]
  assert all(v == 0 for s, v in replay if s <= STEPS) and all(v > 0 for s, v in replay if s > STEPS), replay


def test_dgr_resumes_mid_task_identically(straight, monkeypatch):
  """Preempted mid-task 2 (the generator, its Adam state, the frozen G' and S' all in the checkpoint), resumed in
  process: the same results and a byte-identical metrics log."""
  import cl_jax
  from cl_jax.errors import Preempted
  dgr, w = straight
  monkeypatch.setenv("CL_JAX_TEST_SIGNAL_AT_STEP", "150")
  with pytest.raises(Preempted):
    cl_jax.run(tiny_config("generative_replay", steps=STEPS, **DGR), str(w / "resumed"), progress=False)
  monkeypatch.delenv("CL_JAX_TEST_SIGNAL_AT_STEP")
  resumed = cl_jax.run(tiny_config("generative_replay", steps=STEPS, **DGR), str(w / "resumed"), progress=False)
  a, b = dgr.as_dict(), resumed.as_dict()
  a.pop("timing"), b.pop("timing")
  assert a == b
  assert metrics_bytes(w / "straight") == metrics_bytes(w / "resumed")


@pytest.mark.parametrize("scenario,targets", [("task", "hard"), ("class", "soft")])
def test_replay_loss_is_the_papers_weighting(scenario, targets):
  """L = (1/t) L_current + (1 - 1/t) L_replay at t = 3, recomputed by hand: task-IL scores each generated input with
  the heads of tasks 1 and 2 (mean over them), class-IL distils the old classes' T=2 targets into all seen classes."""
  from cl_jax.data.scenarios import make_scenario
  from cl_jax.data.sources import load_digits
  from cl_jax.models import build_model, vae as vae_lib
  from cl_jax.strategies import Learner, LossContext, TaskInfo, build_strategy
  from cl_jax.train.step import task_loss
  c = tiny_config("generative_replay", kind=scenario, **{"scenario.num_tasks": 5, "generative_replay.latent": 4,
                                                         "generative_replay.vae_hidden": [16],
                                                         "generative_replay.replay_batch_size": 6,
                                                         "generative_replay.targets": targets})
  sc = make_scenario(load_digits(), c.scenario, multi_head=True)
  model, params = build_model(c.model, (8, 8), sc.num_outputs, sc.num_heads, 0)
  _, teacher = build_model(c.model, (8, 8), sc.num_outputs, sc.num_heads, 1)
  learner = Learner(model.apply, sc.logit_mask)
  strategy = build_strategy(c.strategy, c, learner)
  state = strategy.init(params, TaskInfo(5, sc.num_outputs, (8, 8)))
  state = {**state, "teacher": teacher, "finished": jnp.asarray(2, jnp.int32)}
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8))
  batch = {"x": x, "y": jnp.array([0, 1, 0, 1]) + (0 if scenario == "task" else 4), "task": jnp.full((4,), 2)}
  ctx = LossContext(state, jax.random.key(7), jnp.asarray(2, jnp.int32))
  reference = _reference_replay_loss(scenario)
  total, aux = jax.jit(strategy.loss(task_loss(learner)))(params, batch, ctx)
  current, _ = jax.jit(task_loss(learner))(params, batch, ctx)
  vae_model, _ = vae_lib.vae_initializer(64, (16,), 4)
  replayed = jax.jit(lambda: reference(vae_model, state, params, teacher, learner, ctx))()
  np.testing.assert_allclose(aux["dgr_replay_loss"], replayed, rtol=1e-5)
  np.testing.assert_allclose(total, current / 3 + (2 / 3) * replayed, rtol=1e-5)


def _reference_replay_loss(scenario):
  """L_replay at task index 2 written out for one scenario (one jitted program; eager ops are slow on a busy CPU)."""
  from cl_jax.losses import cross_entropy, distillation_loss
  from cl_jax.models import vae as vae_lib
  from cl_jax.strategies.generative_replay_classic import _REPLAY_STREAM

  def reference(vae_model, state, params, teacher, learner, ctx):
    x_gen = vae_lib.vae_sample(vae_model, state["prev_vae"], jax.random.fold_in(ctx.rng, _REPLAY_STREAM), 6, 4,
                               (8, 8))
    if scenario == "task":
      per_task = []
      for k in (0, 1):  # the heads of the two past tasks, each input scored by both
        tk = jnp.full((6,), k)
        y = jnp.argmax(learner.logits(teacher, x_gen, tk, 1), -1)
        per_task.append(jnp.mean(cross_entropy(learner.logits(params, x_gen, tk, 2), y)))
      return (per_task[0] + per_task[1]) / 2
    t1 = jnp.full((6,), 1)
    t_logits = learner.logits(teacher, x_gen, t1, 1)  # classes 0-3 only: 4-9 are masked, probability 0
    return jnp.mean(distillation_loss(learner.logits(params, x_gen, t1, 2), t_logits, 2.0))
  return reference


def test_bad_settings_are_refused_in_one_line():
  from cl_jax.errors import ConfigError
  from cl_jax.kinds import validate
  for key, value, message in [("generative_replay.targets", "kd", r"^generative_replay\.targets='kd': expected one"),
                              ("generative_replay.vae_hidden", [], r"^generative_replay\.vae_hidden=\[\]: expected"),
                              ("generative_replay.latent", 0, r"^generative_replay\.latent=0: expected a positive")]:
    with pytest.raises((ConfigError, ValueError), match=message) as e:
      validate(tiny_config("generative_replay", **{key: value}))
    assert "\n" not in str(e.value)
