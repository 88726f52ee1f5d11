"""Losses shared by the task loop, the strategies and the evaluator: classification (cross-entropy over masked
class logits) and next-token prediction (token cross-entropy, masked means, token-level distillation)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Masked logits are set to this rather than -inf so softmax and its gradient stay finite.
MASK_VALUE = -1e9


def apply_mask(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  return logits if mask is None else jnp.where(mask, logits, MASK_VALUE)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def distillation_loss(student_logits, teacher_logits, temperature: float) -> jax.Array:
  """Per-example T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)); masked logits (-1e9) drop out."""
  t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature)
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  # Classes the teacher gives probability 0 (masked) contribute 0·(finite) = 0.
  return temperature ** 2 * jnp.sum(jnp.where(t > 0, t * (log_t - log_s), 0.0), axis=-1)


# ----------------------------------------------------------------------------- next-token prediction
# Batches are dicts `{'tokens': int32 [B, L], 'mask': optional float/bool [B, L]}`: the model reads
# `tokens[:, :-1]` and predicts `tokens[:, 1:]`; `mask[:, 1:]` weights each predicted (target) token, so padding
# and document boundaries are excluded by zeroing their mask entries.



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
  """Token-level knowledge distillation (Hinton et al. 2015), averaged over the tokens with `mask` > 0:

    KD = T^2 * mean_t KL( softmax(z_teacher_t / T) || softmax(z_student_t / T) )

  The per-token term is `distillation_loss` (what the `distill` strategy adds to an LM run's loss); the teacher is
  not differentiated. After a vocabulary extension compare the student's logits
  restricted to the teacher's vocabulary, `student_logits[..., :V_teacher]`.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"distillation_kl: student_logits {student_logits.shape} and teacher_logits "
                     f"{teacher_logits.shape} differ in shape")
  if temperature <= 0:
    raise ValueError(f"distillation_kl: temperature={temperature} must be > 0")
  kl = distillation_loss(student_logits, jax.lax.stop_gradient(teacher_logits), temperature)
  weights = jnp.ones(kl.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return masked_mean(kl, weights)


def next_token_loss(learner) -> Callable:
  """The LM task loss in the train-step convention `(params, batch, ctx) -> (loss, aux)`, on the LM batch layout
  (`cl_jax.lm.data`: x = tokens[:, :-1], y = tokens[:, 1:], optional per-target `mask`):

    loss = sum_{b,t} m[b,t] * -log p(y[b,t] | x[b,<=t]) / sum m[b,t]

  aux: task_loss, accuracy (next-token top-1) and `_raw_logits` [B, L-1, V], which the distillation strategy reuses
  instead of running the student again.
  """

  def loss_fn(params, batch, ctx=None):
    logits = learner.apply(params, batch["x"], batch.get("task"))
    targets = batch["y"]
    mask = batch.get("mask")
    weights = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    loss = masked_mean(token_cross_entropy(logits, targets), weights)
    acc = masked_mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32), weights)
    return loss, {"task_loss": loss, "accuracy": acc, "_raw_logits": logits}

  return loss_fn


def lm_loss_fn(apply: Callable) -> Callable:
  """`next_token_loss` for batches `{'tokens': [B, L], 'mask': optional [B, L]}` and `apply(params, tokens)`
  (the convention of this module's other functions): the mask of the targets is `mask[:, 1:]`."""
  inner = next_token_loss(_Apply(lambda p, x, task=None: apply(p, x)))

  def loss_fn(params, batch, ctx=None):
    tokens = batch["tokens"]
    split = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    if batch.get("mask") is not None:
      split["mask"] = batch["mask"][:, 1:]
    loss, aux = inner(params, split, ctx)
    return loss, {k: v for k, v in aux.items() if not k.startswith("_")}

  return loss_fn


class _Apply(NamedTuple):
  """What `next_token_loss` reads of a learner: its `apply(params, x, task)`."""
  apply: Callable
