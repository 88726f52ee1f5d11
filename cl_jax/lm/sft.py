"""Supervised fine-tuning (SFT) on chat examples: packing with segment ids, the packed model input, the loss.

An encoded example is `(ids int32 [n], mask int32 [n])` from `cl_jax.lm.templates.encode_chat` (mask 1 on the
assistant's tokens and end-of-turn marker only). `pack` lays examples end to end into rows of `seq_len` tokens
(next fit in the given order: a new row starts when the next example does not fit; deterministic), with

  tokens       int32 [N, L]  the examples' ids, `pad_id` after the last one of a row
  mask         int32 [N, L]  the examples' loss masks (0 on padding)
  segment_ids  int32 [N, L]  1, 2, ... per example within its row, 0 on padding
  positions    int32 [N, L]  0, 1, ... restarting at every example (0 on padding)

so several short examples share one row without seeing each other: the transformer's attention masks keys of
another segment (`cl_jax.models.transformer.causal_attention`) and positions restart per example, so a packed
example's logits equal its logits alone (up to float reduction order). An example longer than `seq_len` is cut
to its first `seq_len` tokens (`PackStats.truncated` counts them).

`sft_batch(rows)` turns packed rows into the LM batch layout (`cl_jax.lm.data`), with the input carrying the
packing:

  x     int32 [B, L-1, 3]  (tokens, segment_ids, positions)[:, :-1] stacked on the last axis
  y     int32 [B, L-1]     tokens[:, 1:]
  mask  float [B, L-1]     mask[:, 1:] where the target is in its input's segment (a packed row's next example
                           is never a target of the previous one)
  task  int32 [B]

and `packed_apply(model)` is the `apply(params, x, task)` that reads it, so every strategy that calls
`learner.apply(params, batch['x'], ...)` (distillation's teacher, replay) sees segment-masked logits. The SFT loss
is then `cl_jax.losses.next_token_loss` unchanged:

  loss = sum_{b,t} mask[b,t] * -log p(y[b,t] | x[b,<=t], same segment) / sum_{b,t} mask[b,t]

the mean next-token NLL over the assistant tokens of the batch (every assistant token weighs the same, whichever
example it is in).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np


class PackStats(NamedTuple):
  examples: int
  rows: int
  truncated: int
  fill: float  # share of non-padding tokens


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
         return_index: bool = False):
  """Packs `(ids, mask)` examples into rows (module docstring). Returns the dict of [N, L] arrays (and, with
  `return_index`, `row_of` int32 [len(examples)]: the row each example went to), plus `PackStats`."""
  if seq_len < 2:
    raise ValueError(f"pack: seq_len={seq_len} must be >= 2")
  rows, row_of, truncated = [], [], 0
  current, used = [], 0
  for ids, mask in examples:
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if len(ids) != len(mask):
      raise ValueError(f"pack: ids ({len(ids)}) and mask ({len(mask)}) differ in length")
    if len(ids) > seq_len:
      ids, mask, truncated = ids[:seq_len], mask[:seq_len], truncated + 1
    if used + len(ids) > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append((ids, mask))
    used += len(ids)
    row_of.append(len(rows))
  if current:
    rows.append(current)
  n = len(rows)
  out = {"tokens": np.full((n, seq_len), pad_id, np.int32), "mask": np.zeros((n, seq_len), np.int32),
         "segment_ids": np.zeros((n, seq_len), np.int32), "positions": np.zeros((n, seq_len), np.int32)}
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(row):
      k = len(ids)
      out["tokens"][r, at:at + k] = ids
      out["mask"][r, at:at + k] = mask
      out["segment_ids"][r, at:at + k] = s + 1
      out["positions"][r, at:at + k] = np.arange(k)
      at += k
  stats = PackStats(len(row_of), n, truncated, float((out["segment_ids"] > 0).mean()) if n else 0.0)
  if return_index:
    return out, np.asarray(row_of, np.int32), stats
  return out, stats


def sft_batch(rows: dict, task: int | np.ndarray = 0) -> dict:
  """Packed rows (`pack`'s dict, any subset of its rows) -> the SFT batch (module docstring)."""
  tokens, seg, pos = rows["tokens"], rows["segment_ids"], rows["positions"]
  x = np.stack([tokens[:, :-1], seg[:, :-1], pos[:, :-1]], axis=-1).astype(np.int32)
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  mask = (rows["mask"][:, 1:] * same).astype(np.float32)
  task = np.broadcast_to(np.asarray(task, np.int32), (len(tokens),)).copy()
  return {"x": x, "y": tokens[:, 1:].astype(np.int32), "mask": mask, "task": task}


def packed_apply(model):
  """`apply(params, x, task=None) -> logits` for a `TransformerLM`'s `FunctionalModel`, reading a packed input
  x [B, T, 3] (tokens, segment_ids, positions) or plain tokens [B, T]."""
  from flax import nnx

  def apply(params, x, task=None):
    del task
    return nnx.merge(model.graphdef, params)(jnp.asarray(x))  # TransformerLM unpacks a [B, T, 3] input

  return apply


def sft_loss(model):
  """The SFT task loss in the train-step convention `(params, batch, ctx) -> (loss, aux)` (module docstring)."""
  from cl_jax.losses import next_token_loss
  from cl_jax.strategies.base import Learner
  return next_token_loss(Learner(packed_apply(model), lambda task, index: None))


__all__ = ["PackStats", "pack", "sft_batch", "packed_apply", "sft_loss"]
