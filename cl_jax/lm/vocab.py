"""Vocabulary extension for a trained `TransformerLM` (new domain / language tokens).

`extend_vocab` appends N rows to the embedding (and N columns to an untied output layer), initialised
as the mean of the existing rows plus small seeded Gaussian noise,

    e_new = mean_v(e_v) + noise_scale * std_v(e_v) * z,   z ~ N(0, I)   (per dimension)

the recipe of Hewitt (2021), "Initializing New Word Embeddings for Pretrained Language Models": the
mean keeps the new tokens' logits near the average logit rather than at an arbitrary (possibly huge)
value, and the noise breaks the symmetry between the new rows.

The invariant at the moment of extension: for inputs made only of old tokens, the logits of the old
vocabulary, `logits[..., :V_old]`, are identical to the old model's. (Probabilities over the old
vocabulary do change: the new logits join the softmax normaliser. That is inherent to adding tokens.)

`vocab_extension_optimizer` trains the old rows with a lower learning rate (or frozen) and the new
rows at the full rate. optax partitions by leaf, but old and new rows share one embedding matrix, so
the row-wise rate is a per-row multiplier applied to the *updates* after the base optimizer: with
Adam, scaling the update of row r by s_r is exactly training row r at learning rate s_r * lr (scaling
the gradient instead would be undone by Adam's normalisation). `optax.multi_transform` routes the
vocabulary leaves (`embed.embedding`, `lm_head.kernel`) through `chain(base, scale_rows)` and the
body through `base` or `set_to_zero()` (freeze the body while the new embeddings settle).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cl_jax.models import FunctionalModel, functional
from cl_jax.models.transformer import TransformerConfig, TransformerLM

# Vocabulary-indexed leaves and the axis that indexes the vocabulary in each.
VOCAB_LEAVES: dict[tuple[str, ...], int] = {("embed", "embedding"): 0, ("lm_head", "kernel"): 1}


def _config_of(model: FunctionalModel, params) -> TransformerConfig:
  return nnx.merge(model.graphdef, params).config


def _extend_rows(table: jax.Array, axis: int, num_new: int, key: jax.Array, noise_scale: float):
  rows = jnp.moveaxis(table, axis, 0)  # [V, D]
  mean = jnp.mean(rows, axis=0)
  std = jnp.std(rows, axis=0)
  noise = jax.random.normal(key, (num_new, rows.shape[1]), rows.dtype)
  new = mean[None] + noise_scale * std[None] * noise
  return jnp.moveaxis(jnp.concatenate([rows, new.astype(rows.dtype)], axis=0), 0, axis)


def extend_vocab(model: FunctionalModel, params, num_new_tokens: int, *, seed: int = 0,
                 noise_scale: float = 0.01) -> tuple[FunctionalModel, Any]:
  """Adds `num_new_tokens` tokens (ids V_old .. V_old+N-1). Returns (new FunctionalModel, new params).

  Every parameter except the vocabulary leaves is passed through unchanged (the same arrays).
  """
  if not isinstance(num_new_tokens, (int, np.integer)) or num_new_tokens < 1:
    raise ValueError(f"extend_vocab: num_new_tokens={num_new_tokens!r} must be a positive integer")
  if noise_scale < 0:
    raise ValueError(f"extend_vocab: noise_scale={noise_scale} must be >= 0")
  cfg = _config_of(model, params)
  new_cfg = cfg.replace(vocab_size=cfg.vocab_size + int(num_new_tokens))
  key = jax.random.key(seed)
  new_params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for i, (path, axis) in enumerate(VOCAB_LEAVES.items()):
    if path[0] not in params:
      continue
    table = params[path[0]][path[1]]
    new_params[path[0]] = {**params[path[0]], path[1]: _extend_rows(
      table, axis, int(num_new_tokens), jax.random.fold_in(key, i), noise_scale)}
  # Only the graph is needed: build the module abstractly so no throw-away weights are initialised.
  abstract = nnx.eval_shape(lambda: TransformerLM(new_cfg, rngs=nnx.Rngs(0)))
  new_model, _ = functional(abstract)
  return new_model, new_params


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def vocab_labels(params) -> Any:
  """'vocab' for the vocabulary-indexed leaves, 'body' for all others (labels for multi_transform)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: "vocab" if _path_names(p)[-2:] in VOCAB_LEAVES else "body", params)


def scale_vocab_rows(old_vocab_size: int, old_row_scale: float) -> optax.GradientTransformation:
  """Multiplies the updates of vocabulary rows < `old_vocab_size` by `old_row_scale` (new rows: 1).

  Leaves are recognised by their path (`embed.embedding` rows on axis 0, `lm_head.kernel` on axis 1),
  so this works on the full params tree and on the vocabulary subtree inside `multi_transform`.
  """

  def scale(path, update):
    names = _path_names(path)[-2:]
    if names not in VOCAB_LEAVES or update is None:
      return update
    axis = VOCAB_LEAVES[names]
    rows = jnp.arange(update.shape[axis])
    factor = jnp.where(rows < old_vocab_size, jnp.float32(old_row_scale), jnp.float32(1.0))
    shape = [1] * update.ndim
    shape[axis] = update.shape[axis]
    return update * factor.reshape(shape).astype(update.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def vocab_extension_optimizer(base: optax.GradientTransformation, params, old_vocab_size: int, *,
                              old_row_lr_scale: float = 0.0,
                              train_body: bool = True) -> optax.GradientTransformation:
  """`optax.multi_transform` for training after `extend_vocab`.

  vocab leaves: `chain(base, scale_vocab_rows(old_vocab_size, old_row_lr_scale))`, i.e. old rows at
                 `old_row_lr_scale * lr` (0 = frozen: their value never changes), new rows at `lr`;
  body leaves:   `base` if `train_body` else `optax.set_to_zero()` (frozen, no optimizer state).
  With `old_row_lr_scale=0` Adam still keeps moments for the frozen rows (they share a leaf with the
  trained rows); that is memory, not a change to their values.
  """
  if not 0.0 <= old_row_lr_scale <= 1.0:
    raise ValueError(f"vocab_extension_optimizer: old_row_lr_scale={old_row_lr_scale} must be in [0, 1]")
  vocab_size = None
  for path, axis in VOCAB_LEAVES.items():
    if path[0] in params:
      vocab_size = params[path[0]][path[1]].shape[axis]
  if vocab_size is None:
    raise ValueError("vocab_extension_optimizer: params have no 'embed.embedding' leaf")
  if not 0 < old_vocab_size <= vocab_size:
    raise ValueError(f"vocab_extension_optimizer: old_vocab_size={old_vocab_size} must be in "
                     f"[1, {vocab_size}] (the extended vocabulary size)")
  transforms = {"vocab": optax.chain(base, scale_vocab_rows(old_vocab_size, old_row_lr_scale)),
                "body": base if train_body else optax.set_to_zero()}
  return optax.multi_transform(transforms, vocab_labels(params))
