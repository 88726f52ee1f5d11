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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def _left_padded(cache, valid, max_new_tokens):
  """The cache of left-padded prompts (`valid [B, P]`, 1 on real tokens, its zeros all on the left): 'valid' masks
  the padding slots out of every query's keys, and 'offset' [B] (the row's padding count) makes the token in slot s
  sit at position s - offset, so each row is computed as its prompt alone would be (learned positions too)."""
  batch = valid.shape[0]
  keys = jnp.concatenate([valid, jnp.ones((batch, max_new_tokens), valid.dtype)], axis=1)
  offset = jnp.sum(valid == 0, axis=1).astype(jnp.int32)
  return tuple({**layer, "valid": keys, "offset": offset} for layer in cache)


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
  if valid is not None:  # left-padded prompts: the padding is hidden from every query, positions start per row
    cache = _left_padded(cache, valid, max_new_tokens)
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


# ----------------------------------------------------------------------------- logits processors

def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
  """The repetition penalty of CTRL (Keskar et al. 2019), as transformers' RepetitionPenaltyLogitsProcessor applies
  it: for every token v already present (`seen [B, V]`, prompt and generated tokens alike, each counted once)

      logit_v <- logit_v / penalty   if logit_v > 0
      logit_v <- logit_v * penalty   otherwise

  so penalty > 1 makes every repeated token less likely whatever its sign; other tokens are unchanged."""
  logits = logits.astype(jnp.float32)
  hit = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, hit, logits)


def top_k_top_p_filter(logits: jax.Array, top_k, top_p) -> jax.Array:
  """`logits [B, V]` with the tokens outside the nucleus set to -inf (top-k, then top-p, in transformers' order).

  top_k (0 = off): keep the tokens whose logit is >= the k-th largest (ties at the k-th value stay, as in
  transformers' TopKLogitsWarper). top_p (1.0 = off), nucleus sampling (Holtzman et al. 2020): with the survivors
  sorted by probability p_(1) >= p_(2) >= ..., keep rank r iff sum_{j<r} p_(j) < top_p, i.e. the smallest set
  whose cumulative probability reaches top_p, and always the most likely token (TopPLogitsWarper, which removes a
  token iff the probabilities of it and everything below it sum to <= 1 - top_p: the same set). Both are traced
  values, so changing them recompiles nothing: one sort serves both."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  ranked = -jnp.sort(-logits, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, ranked.shape[:-1] + (1,)).astype(jnp.int32), axis=-1)
  ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each rank
  keep = (before < top_p).at[..., 0].set(True) & (ranked > -jnp.inf)
  cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


class Decoding(NamedTuple):
  """The static part of a `decode` call (one compilation each): whether it samples, filters (top-k / top-p),
  penalises repeats, and how many stop strings it tracks. The numbers themselves (temperature, top_k, top_p,
  penalty) are traced, so changing them compiles nothing."""
  sample: bool = False
  filter: bool = False
  penalize: bool = False
  stops: int = 0


def _draw(logits, key, seen, setting: Decoding, temperature, top_k, top_p, penalty):
  """One token per row: repetition penalty, then argmax (greedy) or temperature, top-k / top-p and a draw."""
  logits = logits.astype(jnp.float32)
  if setting.penalize:
    logits = repetition_penalty(logits, seen, penalty)
  if not setting.sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if setting.filter:
    logits = top_k_top_p_filter(logits, top_k, top_p)
  # One key per row (row_keys), so a prompt's draws do not depend on its batch mates or its place in the batch.
  return jax.vmap(lambda k, l: jax.random.categorical(k, l))(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "setting"))
def _decode(model, params, prompt, valid, key, rows_index, knobs, eos_ids, pad_id, stop_next, stop_hit, stop_state,
            *, max_new_tokens, setting):
  module = nnx.merge(model.graphdef, params)
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows_index)
  temperature, top_k, top_p, penalty = knobs
  batch, prompt_len = prompt.shape
  vocab = module.config.vocab_size
  cache = _left_padded(init_cache(module.config, batch, prompt_len + max_new_tokens), valid, max_new_tokens)
  # Tokens present so far (the repetition penalty's set): the prompt's real tokens, then each generated one.
  seen = jnp.zeros((batch, vocab), bool)
  if setting.penalize:
    seen = seen.at[jnp.arange(batch)[:, None], prompt].max(valid > 0)
  rows = jnp.arange(batch)
  which = jnp.arange(setting.stops)[None]

  def step(logits, i, seen, state, done):
    """Draws token i from its logits; advances the stop-string automata; returns the token (pad once done)."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
    new = _draw(logits, keys, seen, setting, temperature, top_k, top_p, penalty)
    new = jnp.where(done, pad_id, new)
    stopped = jnp.any(new[:, None] == eos_ids[None], axis=1)
    if setting.stops:
      stopped = stopped | jnp.any(stop_hit[which, new[:, None], state], axis=1)
      state = stop_next[which, new[:, None], state]
    seen = seen.at[rows, new].set(True) if setting.penalize else seen
    return new, seen, state, done | stopped

  logits, cache = module.forward_with_cache(prompt, jnp.int32(0), cache, last_only=True)
  done = jnp.zeros((batch,), bool)
  first, seen, state, done_after = step(logits[:, -1], 0, seen, stop_state, done)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  lengths = jnp.ones((batch,), jnp.int32)

  def cond(carry):
    i, *_, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, lengths, cache, last, seen, state, done = carry
    step_module = nnx.merge(model.graphdef, params)
    logits, cache = step_module.forward_with_cache(last[:, None], prompt_len + i - 1, cache)
    new, seen, state, now_done = step(logits[:, 0], i, seen, state, done)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
    return i + 1, out, lengths + (~done).astype(jnp.int32), cache, new, seen, state, now_done

  carry = (jnp.int32(1), out, lengths, cache, first, seen, state, done_after)
  _, out, lengths, *_ = jax.lax.while_loop(cond, body, carry)
  return out, lengths


def decode(model, params, prompt, valid, key, rows_index, *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, eos_ids=(), pad_id: int = 0,
           stops=None):
  """Continues left-padded prompts: (new tokens int32 [B, max_new_tokens], lengths int32 [B]).

  prompt [B, P] int32, right-aligned; valid [B, P] 1 on real tokens (0s only on the left); row r draws its token i
  with the key fold_in(fold_in(key, rows_index[r]), i), so a row's draws depend on its index, not its batch mates. A row stops after emitting one of `eos_ids`
  or completing a stop string (`stops`: (next [S, V, M], hit [S, V, M], state [B, S]) automata over the token
  stream, see `cl_jax.lm.generation.StopStrings`); its later tokens are `pad_id` and `lengths` counts its tokens
  up to and including the one that stopped it. temperature 0 is greedy (argmax after the repetition penalty).

  The prefill and the whole token loop are one jitted program (a `lax.while_loop` that exits once every row has
  stopped), compiled once per (model, B, P, max_new_tokens, `Decoding`): callers bucket P to bound compilations.
  """
  setting = Decoding(sample=float(temperature) > 0, filter=float(temperature) > 0 and (int(top_k) > 0 or
                                                                                       float(top_p) < 1.0),
                     penalize=float(repetition_penalty) != 1.0, stops=0 if stops is None else int(stops[0].shape[0]))
  # Host (numpy) arguments: jit transfers them with the call, where jnp constructors would each be an eager dispatch
  # (most of a short call's overhead).
  if stops is None:
    stops = (np.zeros((0, 1, 1), np.int32), np.zeros((0, 1, 1), bool), np.zeros((prompt.shape[0], 0), np.int32))
  knobs = (np.float32(max(float(temperature), 1e-6)), np.int32(top_k), np.float32(top_p),
           np.float32(repetition_penalty))
  eos = np.asarray(list(eos_ids) or [-1], np.int32)
  return _decode(model, params, np.asarray(prompt, np.int32), np.asarray(valid, np.int32), key,
                 np.asarray(rows_index, np.int32), knobs, eos, np.int32(pad_id), *(np.asarray(x) for x in stops),
                 max_new_tokens=int(max_new_tokens), setting=setting)


def compilations() -> int:
  """How many programs `decode` has compiled so far in this process (one per distinct static signature)."""
  return int(_decode._cache_size())


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
