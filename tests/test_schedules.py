import ml_collections
import numpy as np
import pytest

from cl_jax.train.schedules import build_schedule, wsd_schedule


def test_wsd_values_at_boundaries():
  s = wsd_schedule(1.0, total_steps=100, warmup_fraction=0.1, decay_fraction=0.2, end_lr_fraction=0.1)
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(5)) == pytest.approx(0.5)      # halfway through warmup
  assert float(s(10)) == pytest.approx(1.0)     # end of warmup
  assert float(s(50)) == pytest.approx(1.0)     # stable
  assert float(s(80)) == pytest.approx(1.0)     # start of decay
  assert float(s(90)) == pytest.approx(0.55)    # linear halfway 1.0 -> 0.1
  assert float(s(100)) == pytest.approx(0.1)


def test_wsd_cosine_decay_midpoint():
  s = wsd_schedule(2.0, 100, 0.0, 0.5, end_lr_fraction=0.0, decay_shape="cosine")
  assert float(s(50)) == pytest.approx(2.0)
  assert float(s(75)) == pytest.approx(1.0, abs=1e-5)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def _optim(**kw):
  c = ml_collections.ConfigDict(dict(schedule="wsd", lr=1.0, warmup_fraction=0.1, decay_fraction=0.2,
                                     end_lr_fraction=0.0, decay_shape="linear", scope="task"))
  c.update(kw)
  return c


def test_per_task_scope_restarts_and_global_spans_the_run():
  per_task = build_schedule(_optim(scope="task"), steps_per_task=100, num_tasks=3)
  assert np.allclose([float(per_task(k)) for k in (0, 100, 200)], 0.0)
  assert float(per_task(150)) == pytest.approx(1.0)
  whole = build_schedule(_optim(scope="global"), steps_per_task=100, num_tasks=3)
  assert float(whole(100)) == pytest.approx(1.0)   # past the 30-step warmup, no restart
  assert float(whole(300)) == pytest.approx(0.0)


def test_bad_fractions_are_refused():
  with pytest.raises(ValueError, match="optim.warmup_fraction"):
    build_schedule(_optim(warmup_fraction=0.9, decay_fraction=0.2), 100, 1)


def test_constant_has_one_meaning_warmup_then_lr():
  # The classic default (no warmup) is lr from the first step; with a warmup (the LM adaptation) it ramps first.
  plain = build_schedule(_optim(schedule="constant", warmup_fraction=0.0), 100, 1)
  assert [float(plain(k)) for k in (0, 50, 99)] == [1.0, 1.0, 1.0]
  warm = build_schedule(_optim(schedule="constant", warmup_fraction=0.1), 100, 1)
  assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.5)
  assert float(warm(10)) == pytest.approx(1.0) and float(warm(99)) == pytest.approx(1.0)


def test_weight_decay_is_the_l2_gradient_for_sgd_momentum_adam_and_decoupled_for_adamw():
  """sgd / momentum / adam step on g + wd * theta (torch's coupled weight_decay); adamw decays decoupled."""
  import ml_collections
  import jax.numpy as jnp
  from cl_jax.train.optim import build_optimizer
  theta, g, lr, wd = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25]), 0.1, 0.01
  for name in ("sgd", "momentum", "adam", "adamw"):
    c = ml_collections.ConfigDict(dict(name=name, b1=0.9, b2=0.999, momentum=0.9, weight_decay=wd, grad_clip=0.0))
    tx = build_optimizer(c, lambda step: lr)
    update, _ = tx.update(g, tx.init(theta), theta)
    plain_c = ml_collections.ConfigDict(dict(c.to_dict(), weight_decay=0.0))
    plain = build_optimizer(plain_c, lambda step: lr)
    coupled, _ = plain.update(g + wd * theta, plain.init(theta), theta)
    if name == "adamw":  # decoupled: -lr * (adam direction + wd * theta)
      adam_only, _ = plain.update(g, plain.init(theta), theta)
      np.testing.assert_allclose(update, adam_only - lr * wd * theta, rtol=1e-6)
    else:
      np.testing.assert_allclose(update, coupled, rtol=1e-6)
      if name != "adam":  # Adam's first step is lr * sign(g) whatever the gradient's size
        assert not np.allclose(update, plain.update(g, plain.init(theta), theta)[0])
