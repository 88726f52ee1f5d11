"""The small language-model protocol the LM experiments share (continual pre-training, vocabulary extension,
long context, forgetting factors).

A byte-level transformer pre-trained from scratch on the general corpus (`pretrain`), then adapted on a mixture
(`adapt`), 128-token sequences, batch 16, peak LR 3e-3 under WSD, the regression monitor watching without a hard
stop. Each script then sets what its question varies; keeping the common part here means a change to the protocol
reaches every table that shares it.
"""
from __future__ import annotations


def small_lm_config(seed: int, *, pretrain_steps: int, adapt_steps: int, base_dir: str = "",
                    mixture: str = "70_30", eval_every: int | None = None, **text):
  """`lm.default_config()` at the shared protocol; `text` updates the `text` section (eval sizes, cloze items).

  `base_dir`: adapt from that finished run's base instead of pre-training one. `eval_every`: the monitor's
  interval (default: twice per adaptation).
  """
  from cl_jax import lm
  c = lm.default_config()
  c.seed = seed
  c.lm.seq_len = 128
  c.text.update(max_train_sequences=8192, **text)
  c.optim.update(lr=3e-3, schedule="wsd")
  c.pretrain.update(steps=pretrain_steps, batch_size=16, base_dir=base_dir)
  c.adapt.update(steps=adapt_steps, batch_size=16, mixture=mixture)
  c.regression.update(eval_every=max(adapt_steps // 2, 1) if eval_every is None else eval_every, hard_stop=False)
  c.train.log_every_steps = 50
  return c
