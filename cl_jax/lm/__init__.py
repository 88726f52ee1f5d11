"""Language models: continual pre-training on the one task loop, and what only a language model needs.

  config    `default_config()` / `check_config(config)` of `kind='lm'` runs
  data      the corpora, evaluation subsets, cloze items; per-host mixture batches (x, y, task, domain)
  runner    the LM kind's parts (`cl_jax.kinds.lm`; run with `cl_jax.run(config, workdir)`): pre-train a base,
            adapt it on a mixture with a strategy chain, monitor
  losses    next-token cross-entropy (`next_token_loss` in the strategy convention), token-level distillation KL
  monitor   the regression monitor (the adaptation's per-evaluation hook)
  sampling  `generate` (jitted prefill + while-loop decode with a KV cache, or full recompute), `replay_batch`
  vocab     `extend_vocab` (mean + noise init, old logits unchanged), `vocab_extension_optimizer`
The model itself is `cl_jax.models.transformer.TransformerLM` (`build_lm`, `model_config`); the shared pieces
(train step, strategies, checkpoints, workdir, evaluator) live outside this package.
"""
from cl_jax.lm.config import check_config, default_config
from cl_jax.losses import distillation_kl, lm_loss_fn, next_token_loss, next_token_metrics, token_cross_entropy
from cl_jax.models.sampling import generate, replay_batch
from cl_jax.lm.vocab import extend_vocab, vocab_extension_optimizer


__all__ = ["check_config", "default_config", "distillation_kl", "lm_loss_fn", "next_token_loss",
           "next_token_metrics", "token_cross_entropy", "generate", "replay_batch", "extend_vocab",
           "vocab_extension_optimizer"]
