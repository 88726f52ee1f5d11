"""The DER paper's protocol (experiments/der_protocol.py): every row's config."""
from __future__ import annotations


def test_every_row_is_a_valid_config_at_the_papers_protocol():
  from cl_jax.kinds import validate
  from experiments.der_protocol import ORDER, der_config
  for row in ORDER:
    c = der_config(row, 0, 5)
    validate(c)
    assert (c.train.batch_size, c.train.epochs_per_task, c.optim.name, c.optim.momentum) == (10, 1, "sgd", 0.0)
    # iCaRL reads the old classes off the mask; mammoth's LwF takes its cross-entropy over the seen classes only.
    assert c.scenario.mask_unseen is (row.startswith(("icarl", "lwf"))) and c.model.init == "xavier"
    assert c.model.hidden == [100, 100]
  c = der_config("lwf", 0, 5)
  assert (c.distill.alpha, c.optim.weight_decay) == (0.25, 0.001)   # mammoth's alpha=1 without T^2; 2 x wd_reg
  assert der_config("agem_200", 0, 5).agem.policy == "task_quota"
  c = der_config("derpp_500", 0, 5)
  assert (c.der.capacity, c.der.batch_size, c.der.alpha, c.der.beta, c.optim.lr) == (500, 10, 1.0, 0.5, 0.03)
