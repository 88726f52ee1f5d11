"""KV-cache sampling against the full-recompute reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax.models.sampling import generate, sample_token
from cl_jax.models.transformer import build_lm, model_config

# A sharp, input-dependent random model: its samples vary with the key and the prompt, so agreement
# between the samplers is not an accident of a near-constant distribution.
CFG = model_config("tiny", vocab_size=48, d_model=32, num_heads=4, num_layers=1, max_len=32, init_std=0.3)
MODEL, PARAMS = build_lm(CFG, seed=1)
PROMPT = jax.random.randint(jax.random.key(7), (3, 5), 0, 48)


def test_greedy_kv_cache_equals_full_recompute():
  a = generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0)
  b = generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0,
               use_cache=False)
  assert a.shape == (3, 15) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a[:, :5], PROMPT)
  np.testing.assert_array_equal(a, b)
  # Greedy decoding ignores the key.
  c = generate(MODEL, PARAMS, PROMPT, jax.random.key(99), max_new_tokens=10, temperature=0.0)
  np.testing.assert_array_equal(a, c)
  # And the continuation really is the argmax of the full model at every step.
  logits = MODEL.apply(PARAMS, a[:, :-1])
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:], -1), a[:, 5:])


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5)])
def test_sampled_kv_cache_equals_full_recompute_with_same_key(temperature, top_k):
  kwargs = dict(max_new_tokens=12, temperature=temperature, top_k=top_k)
  a = generate(MODEL, PARAMS, PROMPT, jax.random.key(3), **kwargs)
  b = generate(MODEL, PARAMS, PROMPT, jax.random.key(3), use_cache=False, **kwargs)
  np.testing.assert_array_equal(a, b)
  # Same key, same tokens; another key, other tokens (the sampler is seeded, not constant).
  np.testing.assert_array_equal(a, generate(MODEL, PARAMS, PROMPT, jax.random.key(3), **kwargs))
  other = generate(MODEL, PARAMS, PROMPT, jax.random.key(4), **kwargs)
  assert not np.array_equal(a, other)


def test_eos_stops_each_row_and_fills_with_eos():
  greedy = generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0)
  eos = int(greedy[0, 7])  # row 0 emits this token by step 2 at the latest
  a = generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0,
               eos_id=eos)
  b = generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0,
               eos_id=eos, use_cache=False)
  np.testing.assert_array_equal(a, b)
  for row in range(3):
    new = np.asarray(greedy[row, 5:])
    hits = np.flatnonzero(new == eos)
    stop = hits[0] if len(hits) else len(new)
    np.testing.assert_array_equal(a[row, 5:5 + stop + 1], greedy[row, 5:5 + stop + 1])
    assert np.all(np.asarray(a[row, 5 + stop:]) == eos)


def test_sample_token_temperature_and_top_k():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, None))(keys)[:, 0]
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)
  top2 = jax.vmap(lambda k: sample_token(logits, k, 1.0, 2))(keys)[:, 0]
  assert set(np.unique(np.asarray(top2))) == {2, 3}
  np.testing.assert_allclose(np.mean(np.asarray(top2) == 3), 0.4 / 0.7, atol=0.03)
  assert int(sample_token(logits, keys[0], 0.0, None)[0]) == 3


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="max_len"):
    generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=40)
  with pytest.raises(ValueError, match="temperature"):
    generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=4, temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=4, top_k=0)


def test_replay_batch_masks_the_fill_after_eos():
  from cl_jax.models.sampling import replay_batch
  greedy = generate(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0)
  eos = int(greedy[0, 7])
  batch = replay_batch(MODEL, PARAMS, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0,
                       eos_id=eos)
  assert batch["tokens"].shape == batch["mask"].shape == (3, 15)
  for row in range(3):
    gen = np.asarray(batch["tokens"][row, 5:])
    hits = np.flatnonzero(gen == eos)
    keep = 5 + (hits[0] + 1 if len(hits) else 10)
    np.testing.assert_array_equal(batch["mask"][row], (np.arange(15) < keep).astype(np.float32))
  assert float(batch["mask"][0].sum()) <= 8.0  # row 0 emits eos within its first 3 new tokens
