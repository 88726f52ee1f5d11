"""Data of a language-model run: the two corpora, fixed evaluation subsets, cloze items, and per-host batches.

Batch layout (the one every LM loss, strategy and the evaluator read; `cl_jax.eval.evaluator` documents the mask
convention it shares with the classic path):

  x       int32 [B, L-1]  the model's input, tokens[:, :-1]
  y       int32 [B, L-1]  the targets, tokens[:, 1:] (next-token prediction)
  task    int32 [B]       the task (0: general pre-training, 1: adaptation)
  domain  int32 [B]       which mixture domain each row came from (`MixtureSampler.domains`; host side only)
  mask    float [B, L-1]  optional: 1 on targets that count (generated replay with eos fill has zeros)

Multi-host: the sampler decides every row of the global batch from (seed, step) alone, so each process gathers
only its own rows (`sharding.process_rows` of the row indices) and `sharding.put_batch` assembles the global array
with its global shape given explicitly; no process ever gathers, or feeds, another's rows.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cl_jax import sharding
from cl_jax.data import prepare
from cl_jax.data import text as textdata
from cl_jax.data.tokenizer import load_tokenizer

# The two roles of an LM run's corpora: the general text the base knows, the domain it adapts to.
GENERAL, DOMAIN = "general", "domain"


class CPTData(NamedTuple):
  tokenizer: Any
  train: dict      # role -> int32 [N, L] train sequences
  doc_index: dict  # role -> int32 [N] document of each train sequence
  eval: dict       # split -> role -> int32 [n, L] fixed evaluation sequences
  cloze: dict      # split -> ClozeItems on held-out general prose
  num_docs: dict   # role -> number of train documents


def subset(n: int, k: int, seed: int) -> np.ndarray:
  """A fixed sorted random subset of k of range(n) (all of it when k <= 0 or k >= n)."""
  if k <= 0 or k >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).permutation(n)[:k])


# A prepared cache's evaluation sets when the config asks for all of a split (`*eval_sequences=0`): all of a
# multi-GB corpus's validation split would be scored at every evaluation; 4,096 sequences detect a 1% change in
# mean loss many times over (the monitor's paired interval narrows as 1/sqrt(n)).
CACHED_EVAL_SEQUENCES = 4096
# The general sample a strategy consolidates on after the base phase (EWC's Fisher, MAS's importance, ...) when
# general text is a prepared cache, instead of all of it.
CACHED_CONSOLIDATION_SEQUENCES = 4096


def run_tokenizer(c):
  """The tokenizer an LM run reads its corpora with: the checkpoint's own (`lm.init_from`) or `lm.tokenizer`.

  Documents are packed with `separator_id` between them (`cl_jax.data.text.pack`): the family's end-of-text token
  (`cl_jax.models.hf_tokenizer.HFTokenizer`; an instruct model's chat end-of-turn token, which its config.json may
  name as eos, is not what its pre-training put between documents), or the token `lm.doc_separator` names.
  ConfigError when that token is not in the vocabulary or the tokenizer has no named tokens (byte)."""
  from cl_jax.errors import ConfigError
  sep = str(c.lm.get("doc_separator", "") or "")
  try:
    if c.lm.init_from:  # an imported model reads text through its own tokenizer
      from cl_jax.models import hf_checkpoint
      return hf_checkpoint.load_tokenizer(c.lm.init_from, hf_checkpoint.read_config(c.lm.init_from),
                                          separator=sep or None)
    tok = load_tokenizer(c.lm.tokenizer)
    if sep:
      if not hasattr(tok, "token_id"):
        raise ConfigError(f"the {getattr(tok, 'name', type(tok).__name__)} tokenizer has no named tokens (its eos "
                          "separates documents); leave it ''")
      tok.separator_id = tok.token_id(sep, "separator")
    return tok
  except ValueError as e:
    if not sep:
      raise
    raise ConfigError(f"lm.doc_separator={sep!r}: {e}") from None


def load_data(c, tokenizer=None) -> CPTData:
  """Both corpora, packed; fixed evaluation subsets and cloze items (all a function of the config).

  `tokenizer`: read the corpora with this one instead of the config's (a vocabulary-extended run: cl_jax.lm.vocab)."""
  tok = tokenizer if tokenizer is not None else run_tokenizer(c)
  t = c.text
  domains = {role: prepare.load_domain(spec, tok, c.lm.seq_len, seed=t.split_seed, validation=t.validation,
                                        test=t.test, name=role)
             for role, spec in ((GENERAL, t.general), (DOMAIN, t.domain))}
  train, doc_index, evals = {}, {}, {"validation": {}, "test": {}}
  for i, (role, dom) in enumerate(domains.items()):
    tr = dom.splits["train"]
    keep = subset(len(tr.tokens), t.max_train_sequences, 11 + i)
    if isinstance(tr.tokens, np.ndarray):
      train[role], doc_index[role] = tr.tokens[keep], tr.doc_index[keep]
    else:  # a prepared cache: rows stay on disk, read per batch (only this process's rows)
      lazy = len(keep) == len(tr.tokens)
      train[role] = tr.tokens if lazy else tr.tokens.view(keep)
      doc_index[role] = tr.doc_index if lazy else np.asarray(tr.doc_index)[keep]
    cap = t.general_eval_sequences if role == GENERAL else t.eval_sequences
    if not isinstance(dom.splits["validation"].tokens, np.ndarray) and cap <= 0:
      cap = CACHED_EVAL_SEQUENCES
    for j, split in enumerate(("validation", "test")):
      ev = dom.splits[split].tokens
      evals[split][role] = np.asarray(ev[subset(len(ev), cap, 101 + 10 * i + j)])
  cloze = {split: textdata.make_cloze_items(domains[GENERAL].documents[split], tok, num_items=t.cloze_items,
                                            context_tokens=t.cloze_context, num_choices=t.cloze_choices,
                                            seed=7 + j)
           for j, split in enumerate(("validation", "test"))}
  return CPTData(tok, train, doc_index, evals, cloze,
                 {role: dom.count("train") for role, dom in domains.items()})


def eval_sizes(data: CPTData) -> dict:
  """{split: {role: {'sequences', 'tokens' (scored targets)}, 'cloze_items': n}} of the evaluation sets."""
  out = {}
  for split, by_role in data.eval.items():
    out[split] = {role: {"sequences": int(len(tok)), "tokens": int(len(tok) * (tok.shape[1] - 1))}
                  for role, tok in by_role.items()}
    out[split]["cloze_items"] = int(len(data.cloze[split].answer))
  return out


def next_token_batch(tokens: np.ndarray, task: int, domain: np.ndarray | None = None) -> dict:
  """tokens [B, L] -> the LM batch layout (module docstring)."""
  tokens = np.asarray(tokens)
  out = {"x": tokens[:, :-1].astype(np.int32), "y": tokens[:, 1:].astype(np.int32),
         "task": np.full((len(tokens),), task, np.int32)}
  if domain is not None:
    out["domain"] = np.asarray(domain, np.int32)
  return out


def sampler_batch(sampler, step: int, data_by_role: dict, task: int) -> dict:
  """This process's rows of the mixture's global batch at `step`, in the LM batch layout."""
  ids, example = sampler.indices(step)
  rows = sharding.process_rows({"ids": ids, "example": example})
  ids, example = rows["ids"], rows["example"]
  first = data_by_role[sampler.domains[0]]
  tokens = np.empty((len(ids),) + tuple(first.shape[1:]), first.dtype)
  for d in np.unique(ids):
    where = ids == d
    tokens[where] = data_by_role[sampler.domains[d]][example[where]]  # arrays, or cache rows read on demand
  return next_token_batch(tokens, task, ids)


__all__ = ["CACHED_EVAL_SEQUENCES", "CACHED_CONSOLIDATION_SEQUENCES", "CPTData", "run_tokenizer", "load_data",
           "eval_sizes", "subset", "next_token_batch", "sampler_batch"]
