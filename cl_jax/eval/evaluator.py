"""The one evaluator: classifier accuracy rows and language-model perplexity / next-token accuracy / cloze.

Mask convention (the same for every kind of run):

  valid [B]        bool, per example: False on the padding rows that fill the last evaluation batch up to a
                   multiple of the device count. A padded row never counts.
  mask  [B, ...]   float, per target: 1 where a target counts, 0 where it does not (an LM batch's targets
                   after a generated sequence's eos fill). Absent: every target of a valid example counts.
  logit mask       the scenario's `Learner.logit_mask(task, task_index)`: which classes may be predicted after
                   training up to `task_index` (class-IL: the classes seen so far; task-IL: the example's own
                   task's classes). Evaluation applies it exactly as training does.

Classic accuracy: `accuracy_row(eval_fn, params, scenario, task_index, ...)` is row `task_index + 1` of the
accuracy matrix R (row 0 before any training: `task_index = 0`), the accuracy on every task with the logit mask of
having trained up to `task_index`. The merge runner evaluates a merged model as a row after the last task
(`task_index = T - 1`). A strategy with a `predict` hook (`predict(strategy_state, params, x, task, task_index) ->
logits [B, C]`, `cl_jax.strategies.base`; e.g. iCaRL's nearest-mean-of-exemplars classifier, progressive networks'
router) is evaluated by the argmax of what it returns: hand `evaluation_learner(learner, strategy)` and
`evaluation_params(strategy, state)` to these functions.

LM metrics, over fixed evaluation sequences tokens [n, L] (the model reads tokens[:, :-1], predicts tokens[:, 1:]):

  perplexity = exp( sum_{valid targets} -log p(y_t | x_<=t) / number of valid targets )
  accuracy   = fraction of valid targets where argmax p(. | x_<=t) = y_t
  cloze      = fraction of cloze items whose true word has the highest summed log-likelihood among its choices
               (`cl_jax.data.text.make_cloze_items`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax import sharding


def padded_size(batch_size: int, mesh) -> int:
  """The evaluation batch rounded up to a multiple of the device count (every device gets rows)."""
  return -(-int(batch_size) // mesh.size) * mesh.size


def chunk_rows(n: int, size: int, mesh) -> int:
  """Rows to pad a chunk of `n` rows to: `size` for a full chunk, else the next power of two (on the mesh), so a
  short last chunk (or a small evaluation set) costs about its own rows, not a whole batch, with at most
  log2(size) extra shapes to compile."""
  if n >= size:
    return size
  return min(size, padded_size(1 << max(int(n) - 1, 0).bit_length(), mesh))


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """`x` with zero rows appended up to n rows (their `valid` is False)."""
  x = np.asarray(x)
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if len(x) < n else x


# --------------------------------------------------------------------------------------------- classic


def make_accuracy_fn(learner, replicated, batch_sharding=None):
  """jitted `(params, batch, task_index) -> (hits, count)` over the valid rows of a batch.

  `learner` is the model as the strategies see it, or `cl_jax.strategies.base.evaluation_learner(learner, strategy)`
  when the strategy has a `predict` hook (then `params` is `evaluation_params(strategy, state)`).
  """

  def hits(params, batch, task_index):
    logits = learner.logits(params, batch["x"], batch["task"], task_index)
    hit = (jnp.argmax(logits, -1) == batch["y"]) & batch["valid"]
    return jnp.sum(hit), jnp.sum(batch["valid"])

  del batch_sharding  # the batch arrives placed (sharding.put_global_batch); the counts come back replicated
  return jax.jit(hits, out_shardings=replicated)


def task_accuracy(eval_fn, params, scenario, task_id: int, task_index: int, batch_size: int, mesh) -> float:
  """Test accuracy on task `task_id` with the logit mask of having trained up to `task_index`."""
  from cl_jax.data import test_batches
  hits, total = 0, 0
  ti = sharding.put_global(np.int32(task_index), sharding.replicated(mesh))
  for batch in test_batches(scenario, task_id, batch_size):
    h, n = eval_fn(params, sharding.put_global_batch(batch, mesh), ti)
    hits, total = hits + h, total + n
  return float(hits) / max(float(total), 1.0)


def accuracy_row(eval_fn, params, scenario, task_index: int, batch_size: int, mesh) -> list:
  """Accuracy on every task of the scenario after training up to `task_index`: one row of R."""
  return [task_accuracy(eval_fn, params, scenario, i, task_index, batch_size, mesh) for i in range(scenario.num_tasks)]


class AccuracyEvaluator(NamedTuple):
  """The classic evaluator, as `accuracy_evaluator` assembles it: `row(state, scenario, task_index)`."""
  fn: Callable          # jitted (params, batch, task_index) -> (hits, count)
  strategy: Any         # whose `predict` hook (if any) replaces the model's logits
  batch_size: int       # padded to a multiple of the mesh's devices
  mesh: Any

  def row(self, state, scenario, task_index: int) -> list:
    """Row `task_index + 1` of R for a train state (or a bare params pytree when no strategy predicts)."""
    from cl_jax.strategies.base import evaluation_params
    params = evaluation_params(self.strategy, state) if hasattr(state, "params") else state
    return accuracy_row(self.fn, params, scenario, task_index, self.batch_size, self.mesh)


def accuracy_evaluator(learner, mesh, batch_size: int, strategy=None) -> AccuracyEvaluator:
  """The one way a classic evaluator is assembled (the classic kind, the merge kind, experiments): the learner or
  the strategy's `predict` hook (`evaluation_learner`), jitted with replicated counts, batches padded to the mesh.
  The device-resident paths (`cl_jax.data.device`, `cl_jax.train.seeds`) evaluate the same `evaluation_learner`
  on test data that stays on the devices."""
  from cl_jax.strategies.base import evaluation_learner
  fn = make_accuracy_fn(evaluation_learner(learner, strategy), sharding.replicated(mesh))
  return AccuracyEvaluator(fn, strategy, padded_size(batch_size, mesh), mesh)


# -------------------------------------------------------------------------------------------------- LM


def make_lm_evaluator(apply: Callable, batch_size: int, mesh):
  """`evaluate(params, sequences: {name: tokens [n, L]}, cloze: ClozeItems | None) -> {name/perplexity, ...}`.

  `apply(params, tokens) -> logits`. Every process builds the same padded chunks and feeds only its own rows.
  """
  from cl_jax.losses import token_cross_entropy
  size = padded_size(batch_size, mesh)

  rep = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=rep)
  def nll_batch(params, tokens, valid):
    logits = apply(params, tokens[:, :-1])
    targets = tokens[:, 1:]
    nll = token_cross_entropy(logits, targets)
    hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    w = valid[:, None].astype(jnp.float32)
    return jnp.sum(nll * w, -1), jnp.sum(hit * w, -1)  # per row: the paired monitor reads each sequence

  @functools.partial(jax.jit, out_shardings=rep)  # every process reads every score
  def cloze_batch(params, context, choices, mask):
    b, k, w = choices.shape
    seq = jnp.concatenate([jnp.repeat(context[:, None], k, 1), choices], -1).reshape(b * k, -1)
    logits = apply(params, seq[:, :-1])
    c = context.shape[1]
    nll = token_cross_entropy(logits[:, c - 1:], seq[:, c:]).reshape(b, k, w)
    return -jnp.sum(nll * mask, -1)  # log-likelihood of each choice

  def perplexity(params, tokens):
    """(perplexity, accuracy, per-sequence mean NLL [n], per-sequence accuracy [n])."""
    nll, hit = [], []
    for i in range(0, len(tokens), size):
      chunk = tokens[i:i + size]
      rows = chunk_rows(len(chunk), size, mesh)
      valid = pad_rows(np.ones(len(chunk), bool), rows)
      batch = sharding.put_global_batch({"t": pad_rows(chunk, rows), "v": valid}, mesh)
      a, h = jax.device_get(nll_batch(params, batch["t"], batch["v"]))
      nll.append(np.asarray(a, np.float64)[:len(chunk)])
      hit.append(np.asarray(h, np.float64)[:len(chunk)])
    width = tokens.shape[1] - 1
    nll, hit = np.concatenate(nll) / width, np.concatenate(hit) / width
    return math.exp(float(np.mean(nll))), float(np.mean(hit)), nll, hit

  def cloze_accuracy(params, items):
    per = padded_size(max(size // items.choices.shape[1], 1), mesh)
    scores = []  # -> (accuracy, per-item correct [n])
    for i in range(0, len(items.answer), per):
      sl = slice(i, i + per)
      n = len(items.answer[sl])
      rows = chunk_rows(n, per, mesh)
      batch = sharding.put_global_batch({"c": pad_rows(items.context[sl], rows),
                                         "x": pad_rows(items.choices[sl], rows),
                                         "m": pad_rows(items.choice_mask[sl], rows)}, mesh)
      scores.append(np.asarray(jax.device_get(cloze_batch(params, batch["c"], batch["x"], batch["m"])))[:n])
    correct = (np.argmax(np.concatenate(scores), -1) == items.answer).astype(np.float64)
    return float(np.mean(correct)), correct

  def evaluate(params, sequences: dict, cloze=None, per_item: dict | None = None) -> dict:
    """The metrics; `per_item` (a dict) is filled with each metric's per-item values: per-sequence mean NLL for
    perplexity, per-sequence accuracy, per-item cloze correctness (`cl_jax.lm.monitor` pairs them with the base)."""
    out, items = {}, {}
    for name, tokens in sequences.items():
      ppl, acc, items[f"{name}/perplexity"], items[f"{name}/accuracy"] = perplexity(params, tokens)
      out[f"{name}/perplexity"], out[f"{name}/accuracy"] = ppl, acc
    if cloze is not None:
      out["general/cloze_accuracy"], items["general/cloze_accuracy"] = cloze_accuracy(params, cloze)
    if per_item is not None:
      per_item.update(items)
    return out

  return evaluate


__all__ = ["padded_size", "chunk_rows", "pad_rows", "make_accuracy_fn", "task_accuracy", "accuracy_row", "AccuracyEvaluator",
           "accuracy_evaluator", "make_lm_evaluator"]
