"""The DER paper's protocol (experiments/der_protocol.py): its model init and its configs."""
from __future__ import annotations

import numpy as np
from flax import nnx

from cl_jax.models.mlp import MLP


def test_xavier_init_is_glorot_uniform_with_zero_bias():
  """mammoth's MNISTMLP: kernel U(±sqrt(6 / (fan_in + fan_out))), bias 0 (Flax's lecun init has std 1/sqrt(fan_in))."""
  m = MLP(196, [60], 10, init="xavier", rngs=nnx.Rngs(0))
  for layer, (fan_in, fan_out) in ((m.dense_0, (196, 60)), (m.head, (60, 10))):
    w, bound = np.asarray(layer.kernel.get_value()), np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3.0), rtol=0.15)   # uniform, not lecun's 1/sqrt(fan_in)
    assert not np.any(np.asarray(layer.bias.get_value()))


def test_every_row_is_a_valid_config_at_the_papers_protocol():
  from cl_jax.kinds import validate
  from experiments.der_protocol import ORDER, der_config
  for row in ORDER:
    c = der_config(row, 0, 5)
    validate(c)
    assert (c.train.batch_size, c.train.epochs_per_task, c.optim.name, c.optim.momentum) == (10, 1, "sgd", 0.0)
    assert c.scenario.mask_unseen is False and c.model.init == "xavier" and c.model.hidden == [100, 100]
  c = der_config("derpp_500", 0, 5)
  assert (c.der.capacity, c.der.batch_size, c.der.alpha, c.der.beta, c.optim.lr) == (500, 10, 1.0, 0.5, 0.03)
