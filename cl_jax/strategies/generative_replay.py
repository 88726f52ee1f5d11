"""Generative replay for language models (Shin et al. 2017, "Continual Learning with Deep Generative Replay";
for LMs, Sun et al. 2020, LAMOL): the model of the finished task writes the replay data itself.

After the first task (on an LM run: general pre-training, so the model is the base) `after_task` takes the first
`prompt_len` tokens of `num_prompts` of that task's training sequences, chosen with the task's rng, and lets the
model continue each to full sequence length (temperature `temperature`, `batch_size` prompts at a time). Only
these samples are stored: no real text of the old task is kept. While later tasks train, every batch row that the
mixture drew from the general domain (`batch['domain'] == 0`) is replaced by a sample drawn uniformly from the
pool, so the generated text takes the place of the real general data in the mixture (the mixture's weights say
how much is replayed).

State: {'tokens': int32 [num_prompts, L] the pool, 'size': int32 samples in it (0 until the first task ends)}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax.strategies.base import LossContext, Strategy

GENERAL_DOMAIN = 0  # the general corpus is the mixture's first domain (cl_jax.lm.data)


def default_config() -> ml_collections.ConfigDict:
  """The `generative_replay` section."""
  return ml_collections.ConfigDict(dict(
      num_prompts=256,   # stored general prompts, and samples in the pool
      prompt_len=16,     # tokens of each prompt; the model writes the rest of the sequence
      temperature=1.0,   # sampling temperature (0: greedy)
      batch_size=64,     # prompts continued per sampling call
  ))


def check_config(config) -> None:
  """Raises ValueError naming the bad `generative_replay.*` key."""
  g = config.generative_replay
  if config.get("kind", "classic") != "lm":
    raise ValueError(f"strategy={config.strategy!r}: generative_replay samples from a language model; it runs on "
                     "kind='lm' configs only")
  seq_len = int(config.lm.seq_len)
  if not 1 <= int(g.prompt_len) < seq_len:
    raise ValueError(f"generative_replay.prompt_len={g.prompt_len}: must be in [1, lm.seq_len={seq_len})")
  for key in ("num_prompts", "batch_size"):
    if int(g[key]) < 1:
      raise ValueError(f"generative_replay.{key}={g[key]}: expected a positive integer")
  if not float(g.temperature) >= 0:
    raise ValueError(f"generative_replay.temperature={g.temperature}: expected a value >= 0 (0: greedy)")


def generate_pool(apply, params, sequences, rng, *, num_prompts: int, prompt_len: int, temperature: float,
                  batch_size: int) -> np.ndarray:
  """int32 [min(num_prompts, N), L]: the model's continuations of the first `prompt_len` tokens of sequences
  [N, L] chosen with `rng` (deterministic for a key)."""
  from cl_jax.models.sampling import continue_with_apply
  sequences = np.asarray(sequences)
  n, length = sequences.shape
  pick_rng, sample_rng = jax.random.split(rng)
  rows = np.sort(np.asarray(jax.random.permutation(pick_rng, n))[:min(num_prompts, n)])
  prompts = sequences[rows, :prompt_len]
  pool = []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    out = continue_with_apply(apply, params, prompts[start:start + batch_size], jax.random.fold_in(sample_rng, i),
                              max_new_tokens=length - prompt_len, temperature=temperature)
    pool.append(np.asarray(out, np.int32))
  return np.concatenate(pool)


def generative_replay(config, learner) -> Strategy:
  """See the module docstring."""
  check_config(config)
  g = config.generative_replay
  num_prompts, prompt_len = int(g.num_prompts), int(g.prompt_len)
  length = int(config.lm.seq_len)

  def init(params, task_info):
    del params, task_info
    return dict(tokens=jnp.zeros((num_prompts, length), jnp.int32), size=jnp.zeros((), jnp.int32))

  def loss(loss_fn):
    def replay_loss(params, batch, ctx: LossContext):
      if "domain" not in batch:
        raise ValueError("generative_replay: the batch has no 'domain' rows to replace (an LM mixture batch)")
      pool = ctx.strategy_state
      idx = jax.random.randint(jax.random.fold_in(ctx.rng, 0x6E4), batch["domain"].shape, 0,
                               jnp.maximum(pool["size"], 1))
      sample = pool["tokens"][idx]
      replace = (batch["domain"] == GENERAL_DOMAIN) & (pool["size"] > 0)
      swapped = {**batch, "x": jnp.where(replace[:, None], sample[:, :-1], batch["x"]),
                 "y": jnp.where(replace[:, None], sample[:, 1:], batch["y"])}
      value, aux = loss_fn(params, swapped, ctx)
      return value, {**aux, "replayed_fraction": jnp.mean(replace.astype(jnp.float32))}
    return replay_loss

  def after_task(state, params, task_data, rng):
    if int(state["size"]) > 0:  # the pool holds the first task's model's samples; later tasks keep it
      return state
    tokens = np.concatenate([np.asarray(task_data.x), np.asarray(task_data.y)[:, -1:]], axis=1)
    pool = generate_pool(lambda p, x: learner.apply(p, x), params, tokens, rng, num_prompts=num_prompts,
                         prompt_len=prompt_len, temperature=float(g.temperature), batch_size=int(g.batch_size))
    full = np.zeros((num_prompts, length), np.int32)
    full[:len(pool)] = pool
    return dict(tokens=jnp.asarray(full), size=jnp.asarray(len(pool), jnp.int32))

  return Strategy(init=init, loss=loss, after_task=after_task, name="generative_replay")


generative_replay.check_config = check_config
generative_replay.config_sections = ("generative_replay",)

__all__ = ["generative_replay", "default_config", "check_config", "generate_pool"]
