"""Language-model losses: next-token cross-entropy and token-level distillation.

Batches are dicts `{'tokens': int32 [B, L], 'mask': optional float/bool [B, L]}`: the model reads
`tokens[:, :-1]` and predicts `tokens[:, 1:]`; `mask[:, 1:]` weights each predicted (target) token,
so padding and document boundaries are excluded by zeroing their mask entries.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token `-log softmax(logits)[target]`, in float32. logits [..., V], targets [...] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _target_weights(batch: dict, shape) -> jax.Array:
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return mask[:, 1:].astype(jnp.float32)


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / max(sum(w), 1): the mean over the tokens that count."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def next_token_metrics(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """Mean next-token cross-entropy of `logits [B, L-1, V]` (computed on `tokens[:, :-1]`) and metrics.

    loss = sum_{b,t} m[b,t+1] * -log p(x[b,t+1] | x[b,<=t]) / sum m[b,t+1]
  Returns (loss, {'loss', 'accuracy' (next-token top-1), 'perplexity' = exp(loss), 'num_tokens'}).
  """
  tokens = batch["tokens"]
  targets = tokens[:, 1:]
  if logits.shape[:2] != targets.shape:
    raise ValueError(f"next_token_metrics: logits {logits.shape[:2]} do not match the targets "
                     f"tokens[:, 1:] {targets.shape}; apply the model to tokens[:, :-1]")
  weights = _target_weights(batch, targets.shape)
  loss = masked_mean(token_cross_entropy(logits, targets), weights)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"loss": loss, "accuracy": masked_mean(correct, weights), "perplexity": jnp.exp(loss),
             "num_tokens": jnp.sum(weights)}
  return loss, metrics


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                    mask: jax.Array | None = None) -> jax.Array:
  """Token-level knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network"), averaged over the tokens with `mask` > 0:

    KD = T^2 * mean_t KL( softmax(z_teacher_t / T) || softmax(z_student_t / T) )

  The T^2 factor keeps the gradient scale independent of T. The teacher is not differentiated
  (stop_gradient). Logits are [..., V] with the same V (after a vocabulary extension, compare the
  student's logits restricted to the teacher's vocabulary, `student_logits[..., :V_teacher]`).
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"distillation_kl: student_logits {student_logits.shape} and teacher_logits "
                     f"{teacher_logits.shape} differ in shape")
  if temperature <= 0:
    raise ValueError(f"distillation_kl: temperature={temperature} must be > 0")
  t = jnp.float32(temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t
  student = student_logits.astype(jnp.float32) / t
  teacher_logp = jax.nn.log_softmax(teacher, axis=-1)
  student_logp = jax.nn.log_softmax(student, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
  weights = jnp.ones(kl.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return t * t * masked_mean(kl, weights)


def lm_loss_fn(apply: Callable) -> Callable:
  """The task loss of the LM in the train-step convention `(params, batch, ctx) -> (loss, aux)`.

  `apply(params, tokens) -> logits` is `FunctionalModel.apply`; `ctx` (a LossContext) is unused.
  Strategies wrap this like any task loss (distillation to the pre-adaptation model, EWC, replay).
  """

  def loss_fn(params, batch, ctx=None):
    del ctx
    logits = apply(params, batch["tokens"][:, :-1])
    return next_token_metrics(logits, batch)

  return loss_fn
