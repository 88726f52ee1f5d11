"""Language-model pieces: losses, KV-cache sampling, vocabulary extension (continual pre-training in `cpt`).

  losses    next-token cross-entropy, token-level distillation KL, `lm_loss_fn` for the train step
  sampling  `generate` (jitted prefill + while-loop decode with a KV cache, or full recompute),
            `replay_batch` for generative replay
  vocab     `extend_vocab` (mean + noise init, old logits unchanged), `vocab_extension_optimizer`
The model itself is `cl_jax.models.transformer.TransformerLM` (`build_lm`, `model_config`).
"""
from cl_jax.lm.losses import distillation_kl, lm_loss_fn, next_token_metrics, token_cross_entropy
from cl_jax.lm.sampling import generate, replay_batch
from cl_jax.lm.vocab import extend_vocab, vocab_extension_optimizer

__all__ = ["distillation_kl", "lm_loss_fn", "next_token_metrics", "token_cross_entropy", "generate",
           "replay_batch", "extend_vocab", "vocab_extension_optimizer"]
