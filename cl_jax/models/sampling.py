"""Autoregressive sampling from a `TransformerLM`: KV-cache decoding and a full-recompute reference.

Both samplers draw new token i (0-based) from

    p_i(x) ∝ softmax(logits_i / temperature)        restricted to the top_k logits if top_k is set
    x_i = argmax(logits_i)                           if temperature == 0 (greedy)

with the key `jax.random.fold_in(key, i)`, so for the same key they return the same tokens whenever
the logits agree: the cache changes how logits are computed, never which random numbers are used.

* `generate(..., use_cache=True)`: one jitted prefill of the whole prompt into a preallocated cache of
  length `prompt_len + max_new_tokens`, then a `lax.while_loop` of single-token decode steps, each
  O(length) attention against the cache; the loop ends early once every row has emitted `eos_id`.
* `generate(..., use_cache=False)`: the reference; every step re-runs the full causal forward pass
  over the fixed-length token buffer (O(length^2) per step) and reads the logits at the last filled
  position. Causal masking makes the unfilled tail irrelevant.

Prompts are a dense [B, T] array (every row the same length). After a row emits `eos_id`, the rest of
that row is filled with `eos_id`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cl_jax.models.transformer import init_cache


def _check(module, prompt, max_new_tokens, temperature, top_k):
  cfg = module.config
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"generate: prompt must be [batch, time>=1] token ids, got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if prompt.shape[1] + max_new_tokens > cfg.max_len:
    raise ValueError(f"generate: prompt length {prompt.shape[1]} + max_new_tokens={max_new_tokens} "
                     f"exceeds the model's max_len={cfg.max_len}")
  if temperature < 0:
    raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"generate: top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]")


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
  """Draws one token per row of `logits [B, V]` (greedy when temperature == 0)."""
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _finish(new, done, eos_id):
  """Rows already finished emit eos again; a row is done once it has emitted eos."""
  if eos_id is None:
    return new, done
  new = jnp.where(done, eos_id, new)
  return new, done | (new == eos_id)


def _start(model, params, prompt, max_new_tokens, temperature, top_k, eos_id):
  """Checks the arguments; returns the module and the output buffer: the prompt, then eos (or 0) fill."""
  module = nnx.merge(model.graphdef, params)
  _check(module, prompt, max_new_tokens, temperature, top_k)
  total = prompt.shape[1] + max_new_tokens
  fill = 0 if eos_id is None else eos_id
  out = jnp.full((prompt.shape[0], total), fill, jnp.int32).at[:, :prompt.shape[1]].set(prompt.astype(jnp.int32))
  return module, out


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "eos_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_cached(model, params, prompt, key, valid=None, *, max_new_tokens, temperature, top_k, eos_id):
  module, out = _start(model, params, prompt, max_new_tokens, temperature, top_k, eos_id)
  batch, prompt_len = prompt.shape
  total = out.shape[1]

  cache = init_cache(module.config, batch, total)
  if valid is not None:  # left-padded prompts: the cache's key mask hides the padding from every query
    keys = jnp.concatenate([valid, jnp.ones((batch, max_new_tokens), valid.dtype)], axis=1)
    cache = tuple({**layer, "valid": keys} for layer in cache)
  logits, cache = module.forward_with_cache(prompt, jnp.int32(0), cache)
  first, done = _finish(sample_token(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k),
                        jnp.zeros((batch,), bool), eos_id)
  out = out.at[:, prompt_len].set(first)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, cache, last, done = carry
    step_module = nnx.merge(model.graphdef, params)
    pos = prompt_len + i - 1  # position of `last`, whose logits predict token i
    logits, cache = step_module.forward_with_cache(last[:, None], pos, cache)
    new, done = _finish(sample_token(logits[:, 0], jax.random.fold_in(key, i), temperature, top_k),
                        done, eos_id)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, prompt_len + i))
    return i + 1, out, cache, new, done

  carry = (jnp.int32(1), out, cache, first, done)
  return jax.lax.while_loop(cond, body, carry)[1]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_recompute(model, params, prompt, key, *, max_new_tokens, temperature, top_k, eos_id):
  _, out = _start(model, params, prompt, max_new_tokens, temperature, top_k, eos_id)
  return _recompute_loop(model.apply, params, out, prompt.shape[1], key, max_new_tokens, temperature, top_k, eos_id)


def continue_with_apply(apply, params, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
                        temperature: float = 1.0) -> jax.Array:
  """The full-recompute sampler for any `apply(params, tokens) -> logits` (a LoRA-wrapped model, say): continues
  `prompt [B, T]` by `max_new_tokens` tokens, int32 [B, T + max_new_tokens]. Same draws as `generate`."""
  prompt = jnp.asarray(prompt, jnp.int32)
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  out = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32)], axis=1)
  run = jax.jit(lambda p, o, k: _recompute_loop(apply, p, o, prompt.shape[1], k, max_new_tokens,
                                                float(temperature), None, None))
  return run(params, out, key)


def _recompute_loop(apply, params, out, prompt_len, key, max_new_tokens, temperature, top_k, eos_id):
  batch = out.shape[0]

  def body(i, carry):
    out, done = carry
    # The buffer's last slot is never an input, so the forward pass runs on total-1 positions.
    logits = apply(params, out[:, :-1])
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False)
    new, done = _finish(sample_token(last, jax.random.fold_in(key, i), temperature, top_k), done, eos_id)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, prompt_len + i))
    return out, done

  return jax.lax.fori_loop(0, max_new_tokens, body, (out, jnp.zeros((batch,), bool)))[0]


def generate(model, params, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, eos_id: int | None = None,
             use_cache: bool = True, valid: jax.Array | None = None) -> jax.Array:
  """Continues `prompt [B, T]` by `max_new_tokens` tokens; returns int32 [B, T + max_new_tokens].

  `model` is the `FunctionalModel` of a `TransformerLM`, `params` its params. Jitted once per
  (model, shapes, max_new_tokens, temperature, top_k, eos_id); `temperature=0` is greedy decoding.
  `valid [B, T]` (1 on real tokens) lets rows of different lengths be left-padded into one batch: the padding is
  hidden from attention, and with RoPE a row's left shift changes no score (scores depend on position differences).
  """
  kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
            top_k=None if top_k is None else int(top_k), eos_id=None if eos_id is None else int(eos_id))
  if valid is not None:
    if not use_cache:
      raise ValueError("generate: valid (left-padded prompts) needs use_cache=True")
    return _generate_cached(model, params, jnp.asarray(prompt), key, jnp.asarray(valid), **kw)
  fn = _generate_cached if use_cache else _generate_recompute
  return fn(model, params, jnp.asarray(prompt), key, **kw)


def replay_batch(model, params, prompts: jax.Array, key: jax.Array, *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None) -> dict:
  """Generative replay data (Shin et al. 2017, "Continual Learning with Deep Generative Replay"; for
  LMs, Sun et al. 2020, LAMOL): the current model continues stored general-domain `prompts`, and the
  prompt + continuation is returned as an LM training batch `{'tokens': int32 [B, T+N], 'mask': [B, T+N]}`.

  `mask` is 1 on the prompt, the continuation and its first `eos_id`, 0 on the eos fill after it, so
  `cl_jax.losses.next_token_metrics` never trains on fill. Sampling uses the KV cache.
  """
  tokens = generate(model, params, prompts, key, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, eos_id=eos_id)
  mask = jnp.ones(tokens.shape, jnp.float32)
  if eos_id is not None:
    prompt_len = prompts.shape[1]
    is_eos = (tokens == eos_id) & (jnp.arange(tokens.shape[1]) >= prompt_len)[None]
    # Positions strictly after the first generated eos are fill.
    after_first = jnp.cumsum(is_eos, axis=1) - is_eos > 0
    mask = jnp.where(after_first, 0.0, mask)
  return {"tokens": tokens, "mask": mask}
