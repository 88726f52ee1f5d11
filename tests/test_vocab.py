"""Vocabulary extension: the old model is unchanged on old tokens; old rows train slower or not at all."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cl_jax.losses import lm_loss_fn
from cl_jax.lm.vocab import extend_vocab, vocab_extension_optimizer, vocab_labels
from cl_jax.models.transformer import build_lm, model_config

V_OLD, N_NEW = 40, 6
CFG = model_config("tiny", vocab_size=V_OLD, d_model=32, num_heads=2, num_layers=1, max_len=32, init_std=0.3)


def _vocab_leaves(tied):
  """(module, leaf, vocab axis) of the leaves that grow with the vocabulary."""
  return [("embed", "embedding", 0)] + ([] if tied else [("lm_head", "kernel", 1)])


@pytest.mark.parametrize("tied", [True, False])
def test_old_token_logits_identical_after_extension(tied):
  model, params = build_lm(CFG.replace(tied_embeddings=tied))
  new_model, new_params = extend_vocab(model, params, N_NEW, seed=0)
  # Structurally: the old vocabulary's rows are bit-identical, and every other leaf is passed through unchanged.
  for mod, name, axis in _vocab_leaves(tied):
    grown = np.asarray(new_params[mod][name])
    assert grown.shape[axis] == V_OLD + N_NEW
    np.testing.assert_array_equal(np.take(grown, np.arange(V_OLD), axis=axis), np.asarray(params[mod][name]))
  grown_paths = {f"['{mod}']['{name}']" for mod, name, _ in _vocab_leaves(tied)}
  old_leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params))
  new_leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(new_params))
  assert old_leaves.keys() == new_leaves.keys()
  for path, leaf in old_leaves.items():
    if path not in grown_paths:
      np.testing.assert_array_equal(new_leaves[path], leaf, err_msg=path)
  assert new_params["block_0"]["mlp"]["up"]["kernel"] is params["block_0"]["mlp"]["up"]["kernel"]
  # Numerically: old-token logits agree up to float32 reduction order (the output matmul is wider now, so the
  # backend may block and sum it differently; bit-equality across matmul shapes is not a property of the code).
  tokens = jax.random.randint(jax.random.key(0), (3, 10), 0, V_OLD)
  old, new = jax.jit(model.apply)(params, tokens), jax.jit(new_model.apply)(new_params, tokens)
  assert new.shape == (3, 10, V_OLD + N_NEW)
  scale = float(jnp.max(jnp.abs(old)))
  np.testing.assert_allclose(new[..., :V_OLD], old, rtol=1e-5, atol=1e-5 * scale)
  # The invariant is on logits: old-token probabilities shrink because new logits join the softmax.
  p_old = jnp.sum(jax.nn.softmax(new)[..., :V_OLD], -1)
  assert float(jnp.max(p_old)) < 1.0 - 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_mean_plus_small_seeded_noise(tied):
  model, params = build_lm(CFG.replace(tied_embeddings=tied))
  _, a = extend_vocab(model, params, N_NEW, seed=1, noise_scale=0.01)
  _, b = extend_vocab(model, params, N_NEW, seed=1, noise_scale=0.01)
  _, c = extend_vocab(model, params, N_NEW, seed=2, noise_scale=0.01)
  leaves = [("embed", "embedding", 0)] + ([] if tied else [("lm_head", "kernel", 1)])
  for mod, name, axis in leaves:
    old = np.moveaxis(np.asarray(params[mod][name]), axis, 0)
    new = np.moveaxis(np.asarray(a[mod][name]), axis, 0)
    np.testing.assert_array_equal(new[:V_OLD], old)
    rows = new[V_OLD:]
    deviation = rows - old.mean(0)
    # Noise is ~1% of the per-dimension spread of the existing rows: small but nonzero, row-distinct.
    assert 0 < np.abs(deviation).max() < 0.06 * old.std(0).max()
    assert np.abs(rows[0] - rows[1]).max() > 0
    np.testing.assert_array_equal(a[mod][name], b[mod][name])
    assert not np.array_equal(a[mod][name], c[mod][name])


def _train(params, model, tx, steps=3):
  tokens = jax.random.randint(jax.random.key(5), (4, 12), 0, V_OLD + N_NEW)
  loss_fn = lm_loss_fn(model.apply)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(p, {"tokens": tokens})[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_old_rows_do_not_move_new_rows_and_body_do(tied):
  model, params = build_lm(CFG.replace(tied_embeddings=tied))
  model, params = extend_vocab(model, params, N_NEW)
  tx = vocab_extension_optimizer(optax.adamw(1e-2), params, V_OLD, old_row_lr_scale=0.0)
  trained = _train(params, model, tx)
  for mod, name, axis in [("embed", "embedding", 0)] + ([] if tied else [("lm_head", "kernel", 1)]):
    before = np.moveaxis(np.asarray(params[mod][name]), axis, 0)
    after = np.moveaxis(np.asarray(trained[mod][name]), axis, 0)
    np.testing.assert_array_equal(after[:V_OLD], before[:V_OLD])
    assert np.abs(after[V_OLD:] - before[V_OLD:]).min(axis=1).max() > 1e-3
  assert float(jnp.max(jnp.abs(trained["block_0"]["mlp"]["up"]["kernel"]
                               - params["block_0"]["mlp"]["up"]["kernel"]))) > 1e-3


def test_lower_lr_for_old_rows_is_exactly_a_scaled_update():
  model, params = build_lm(CFG.replace(tied_embeddings=False))
  model, params = extend_vocab(model, params, N_NEW)
  full = _train(params, model, vocab_extension_optimizer(optax.adam(1e-2), params, V_OLD,
                                                          old_row_lr_scale=1.0), steps=1)
  tenth = _train(params, model, vocab_extension_optimizer(optax.adam(1e-2), params, V_OLD,
                                                           old_row_lr_scale=0.1), steps=1)
  plain = _train(params, model, optax.adam(1e-2), steps=1)
  # With scale 1 the helper is plain Adam.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full, plain)
  for mod, name, axis in [("embed", "embedding", 0), ("lm_head", "kernel", 1)]:
    p0 = np.moveaxis(np.asarray(params[mod][name]), axis, 0)
    d_full = np.moveaxis(np.asarray(full[mod][name]), axis, 0) - p0
    d_tenth = np.moveaxis(np.asarray(tenth[mod][name]), axis, 0) - p0
    np.testing.assert_allclose(d_tenth[:V_OLD], 0.1 * d_full[:V_OLD], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(d_tenth[V_OLD:], d_full[V_OLD:], rtol=1e-5, atol=1e-8)
    assert np.abs(d_full[:V_OLD]).max() > 1e-3


def test_frozen_body_trains_only_the_vocabulary():
  model, params = build_lm(CFG)
  model, params = extend_vocab(model, params, N_NEW)
  tx = vocab_extension_optimizer(optax.adam(1e-2), params, V_OLD, old_row_lr_scale=0.0, train_body=False)
  trained = _train(params, model, tx)
  labels = vocab_labels(params)
  assert labels["embed"]["embedding"] == "vocab" and labels["final_norm"]["scale"] == "body"
  body_before = {k: v for k, v in params.items() if k != "embed"}
  body_after = {k: v for k, v in trained.items() if k != "embed"}
  jax.tree.map(np.testing.assert_array_equal, body_after, body_before)
  assert float(jnp.max(jnp.abs(trained["embed"]["embedding"][V_OLD:]
                               - params["embed"]["embedding"][V_OLD:]))) > 1e-3


def test_bad_arguments_are_named():
  model, params = build_lm(CFG)
  with pytest.raises(ValueError, match="num_new_tokens"):
    extend_vocab(model, params, 0)
  with pytest.raises(ValueError, match="old_row_lr_scale"):
    vocab_extension_optimizer(optax.adam(1e-3), params, V_OLD, old_row_lr_scale=2.0)
  with pytest.raises(ValueError, match="old_vocab_size"):
    vocab_extension_optimizer(optax.adam(1e-3), params, V_OLD + 1)
