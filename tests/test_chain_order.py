"""The order of a strategy chain is semantic: an outer loss transform hands its (possibly extended) batch inward.

`replay+lwf`: replay is outermost and appends the replayed examples before distillation runs, so the distillation
term is the mean over current and replayed examples. `lwf+replay`: distillation is outermost, so its term is the
mean over the current batch only, while the task loss inside still sees the replayed examples (see base.chain).
"""
import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.kinds import base_config
from cl_jax.strategies import Learner, LossContext, TaskData, TaskInfo, build_strategy
from cl_jax.strategies.distill import distillation_loss
from cl_jax.strategies.replay import sample_replay_batch
from cl_jax.train.step import task_loss

D, C, B, R = 6, 4, 8, 5   # input size, classes, current batch, replay batch
REPLAY_STREAM = 0x5E9A7   # replay draws from fold_in(ctx.rng, this), see strategies/replay.py


def _linear(key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (D, C)), "b": 0.1 * jax.random.normal(k2, (C,))}


def test_replay_then_lwf_distils_replayed_examples_too_and_lwf_then_replay_does_not():
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  params, teacher = _linear(keys[0]), _linear(keys[1])
  learner = Learner(lambda p, x, task: x @ p["w"] + p["b"], lambda task, task_index: None)
  config = base_config()
  config.replay.capacity, config.replay.batch_size = 16, R
  config.distill.alpha, config.distill.temperature = 0.7, 2.0
  # Task 0's data fills the buffer; the teacher is the model at the end of task 0.
  task0 = TaskData(np.asarray(jax.random.normal(keys[2], (12, D))), np.arange(12, dtype=np.int32) % C,
                   np.zeros(12, np.int32), 0)
  batch = {"x": jax.random.normal(keys[3], (B, D)), "y": jnp.arange(B, dtype=jnp.int32) % C,
           "task": jnp.ones((B,), jnp.int32)}
  rng = keys[4]

  def logits(p, x):
    return x @ p["w"] + p["b"]

  def kd(x):  # the distillation term over examples x, as distill computes it (an unweighted mean)
    return float(jnp.mean(distillation_loss(logits(params, x), logits(teacher, x), 2.0)))

  results = {}
  for spec in ("replay+lwf", "lwf+replay"):
    strategy = build_strategy(spec, config, learner)
    state = strategy.init(params, TaskInfo(2, C, (D,)))
    state = strategy.after_task(state, teacher, task0, keys[5])
    loss, aux = strategy.loss(task_loss(learner))(params, batch, LossContext(state, rng, jnp.int32(1)))
    buffer = state[spec.split("+").index("replay")]
    assert int(buffer["size"]) == 12
    replayed = sample_replay_batch(buffer, jax.random.fold_in(rng, REPLAY_STREAM), R)
    results[spec] = (float(loss), float(aux["distill_loss"]), float(aux["task_loss"]), replayed["x"])

  replayed_x = results["replay+lwf"][3]
  np.testing.assert_array_equal(replayed_x, results["lwf+replay"][3])   # the same replayed examples either way
  kd_current, kd_all = kd(batch["x"]), kd(jnp.concatenate([batch["x"], replayed_x]))
  assert abs(kd_all - kd_current) > 0.05 * kd_current   # the two orders must be told apart
  np.testing.assert_allclose(results["replay+lwf"][1], kd_all, rtol=1e-5)
  np.testing.assert_allclose(results["lwf+replay"][1], kd_current, rtol=1e-5)
  # The task loss (current + replayed, replay-weighted) is the same in both orders; only the KD term moves.
  np.testing.assert_allclose(results["replay+lwf"][2], results["lwf+replay"][2], rtol=1e-6)
  np.testing.assert_allclose(results["replay+lwf"][0] - results["lwf+replay"][0], 0.7 * (kd_all - kd_current),
                             rtol=1e-4, atol=1e-6)
