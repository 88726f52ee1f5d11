"""Data of a language-model run: its sources, fixed evaluation subsets, cloze items, and per-host batches.

Sources and roles. A run reads any number of named sources (`data.sources = {name: spec}`; `text.general` /
`text.domain` are the shorthand for two sources named `general` and `domain`), each with a role: `general` (what the
base knows: pre-training draws from these, the regression monitor guards them) or `domain` (what the run adapts
to). Source order (sampler domain ids, the evaluation concatenation) is the general sources, then the domain
sources, each sorted by name: a pure function of the config, whatever order a dict or a JSON round trip gives.

  train     source -> int32 [N, L] train sequences (arrays, or a prepared cache's rows read on demand)
  eval      split -> role -> int32 [n, L]: the role's evaluation set, the concatenation of its sources' capped
            subsets in source order (what the monitor and the summaries read as `general/...`, `domain/...`)
  parts     split -> role -> ((source, rows), ...): where each source's rows sit in the role's set

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

import re
from typing import Any, NamedTuple

import numpy as np

from cl_jax import sharding
from cl_jax.data import prepare
from cl_jax.data import text as textdata
from cl_jax.data.tokenizer import load_tokenizer

# The two roles of an LM run's sources: the general text the base knows, the domain it adapts to.
GENERAL, DOMAIN = "general", "domain"
ROLES = (GENERAL, DOMAIN)


class CPTData(NamedTuple):
  tokenizer: Any
  train: dict      # source -> int32 [N, L] train sequences
  doc_index: dict  # source -> int32 [N] document of each train sequence
  eval: dict       # split -> role -> int32 [n, L] fixed evaluation sequences (its sources' subsets, concatenated)
  cloze: dict      # split -> ClozeItems on held-out general prose
  num_docs: dict   # source -> number of train documents
  roles: dict | None = None  # role -> (source, ...) in source order; None: one source per role, named as the role
  parts: dict | None = None  # split -> role -> ((source, rows), ...) of `eval`; None: one source per role


class Source(NamedTuple):
  """One source of a run: its name, its spec (`cl_jax.data.prepare.load_domain`), its role and the cap on its
  evaluation subset per split (sequences; 0: the whole split)."""
  name: str
  spec: str
  role: str
  eval_sequences: int


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
# The default evaluation budget of a `data.sources` source that states no `eval_sequences`, per split:
# `data.eval_tokens` tokens, i.e. floor(eval_tokens / seq_len) sequences (4,096 at seq_len 128, the cache's cap
# above; 256 at 2,048). Evaluation cost is linear in tokens, so the budget bounds the time every evaluation takes
# however large the corpus; summary.md states each set's size and the regression it resolves.
EVAL_TOKENS = 2 ** 19
# Source names become metric names (`source/<name>/perplexity`) and JSON keys.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SOURCE_KEYS = ("spec", "role", "eval_sequences")


def run_sources(c) -> tuple[Source, ...]:
  """The run's sources in source order (module docstring), from `data.sources` or the shorthand `text.general` /
  `text.domain`; ConfigError naming the key on a bad entry (before anything is read).

  `data.sources = {name: spec}` or `{name: {"spec": ..., "role": "general" | "domain", "eval_sequences": N}}`;
  the role defaults to `general` for a source named `general`, `domain` for any other. `eval_sequences` defaults
  to the budget floor(data.eval_tokens / lm.seq_len); 0 takes the whole split. The shorthand keeps `text.*`'s
  own caps: `text.general_eval_sequences` / `text.eval_sequences`, 0 being the whole split (CACHED_EVAL_SEQUENCES
  for a prepared cache), so every config written before `data.sources` reads exactly the same sequences."""
  from cl_jax.errors import ConfigError
  t = c.text
  given = c.data.sources if "data" in c else {}
  if not given:
    out = []
    for name, spec, cap in ((GENERAL, t.general, t.general_eval_sequences), (DOMAIN, t.domain, t.eval_sequences)):
      cap = int(cap)
      if cap <= 0 and str(spec).startswith("cache:"):
        cap = CACHED_EVAL_SEQUENCES
      out.append(Source(name, str(spec), name, max(cap, 0)))
    return tuple(out)
  budget = max(1, int(c.data.eval_tokens) // int(c.lm.seq_len))
  out = []
  for name in given.keys():
    entry, key = given[name], f"data.sources.{name}"
    if not _NAME.match(str(name)):
      raise ConfigError(f"{key}: a source name is letters, digits, '_', '.', '-' (it names metrics and files)")
    if isinstance(entry, str):
      entry = {"spec": entry}
    elif hasattr(entry, "keys"):
      entry = {k: entry[k] for k in entry.keys()}
    else:
      raise ConfigError(f"{key}={entry!r}: expected a spec string or {{'spec': ..., 'role': 'general' | "
                        "'domain', 'eval_sequences': N}")
    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
    if unknown:
      raise ConfigError(f"{key}: unknown key(s) {unknown}; a source has {list(_SOURCE_KEYS)}")
    spec = entry.get("spec")
    if not isinstance(spec, str) or not spec:
      raise ConfigError(f"{key}.spec={spec!r}: expected a source spec (dir:<d>, files:<glob>, cache:<dir>, ...)")
    role = entry.get("role", GENERAL if name == GENERAL else DOMAIN)
    if role not in ROLES:
      raise ConfigError(f"{key}.role={role!r}: expected 'general' (what the base knows; the monitor guards it) or "
                        "'domain' (what the run adapts to)")
    cap = entry.get("eval_sequences", budget)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
      raise ConfigError(f"{key}.eval_sequences={cap!r}: expected an integer >= 0 (0: the whole split)")
    out.append(Source(str(name), spec, role, cap))
  for role in ROLES:
    if not any(s.role == role for s in out):
      raise ConfigError(f"data.sources: no {role!r} source among {sorted(s.name for s in out)}; a run needs at least "
                        "one general source (pre-training, the regression monitor) and one domain source")
  return tuple(sorted(out, key=lambda s: (ROLES.index(s.role), s.name)))


def roles_of(data: CPTData) -> dict:
  """role -> (source, ...) in source order (one source per role, named as the role, for data built without)."""
  return data.roles if data.roles is not None else {GENERAL: (GENERAL,), DOMAIN: (DOMAIN,)}


def source_order(data: CPTData) -> tuple:
  """Every source in source order (general ones first): the sampler's domains."""
  return tuple(n for role in ROLES for n in roles_of(data)[role])


def general_sample(data: CPTData, cap: int = CACHED_CONSOLIDATION_SEQUENCES) -> np.ndarray:
  """The general training sequences a strategy consolidates on after the base phase: all of them when they are in
  memory, else a fixed subset of `cap` sequences of a prepared cache (each general source's share in proportion
  to its size when there are several); concatenated in source order."""
  names = roles_of(data)[GENERAL]
  total = sum(len(data.train[n]) for n in names)
  parts = []
  for i, name in enumerate(names):
    rows = data.train[name]
    if not isinstance(rows, np.ndarray):
      k = cap if len(names) == 1 else max(1, int(round(cap * len(rows) / max(total, 1))))
      rows = rows[subset(len(rows), k, 23 + i)]
    parts.append(rows)
  return parts[0] if len(parts) == 1 else np.concatenate(parts)


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
  """Every source, packed; fixed evaluation subsets per source (concatenated per role) and cloze items on the
  general sources' held-out prose (all a function of the config).

  `tokenizer`: read the corpora with this one instead of the config's (a vocabulary-extended run: cl_jax.lm.vocab)."""
  tok = tokenizer if tokenizer is not None else run_tokenizer(c)
  t = c.text
  sources = run_sources(c)
  domains = {s.name: prepare.load_domain(s.spec, tok, c.lm.seq_len, seed=t.split_seed, validation=t.validation,
                                         test=t.test, name=s.name)
             for s in sources}
  train, doc_index = {}, {}
  by_source = {"validation": {}, "test": {}}
  for i, (src, dom) in enumerate(zip(sources, domains.values())):
    tr = dom.splits["train"]
    keep = subset(len(tr.tokens), t.max_train_sequences, 11 + i)
    if isinstance(tr.tokens, np.ndarray):
      train[src.name], doc_index[src.name] = tr.tokens[keep], tr.doc_index[keep]
    else:  # a prepared cache: rows stay on disk, read per batch (only this process's rows)
      lazy = len(keep) == len(tr.tokens)
      train[src.name] = tr.tokens if lazy else tr.tokens.view(keep)
      doc_index[src.name] = tr.doc_index if lazy else np.asarray(tr.doc_index)[keep]
    for j, split in enumerate(("validation", "test")):
      ev = dom.splits[split].tokens
      by_source[split][src.name] = np.asarray(ev[subset(len(ev), src.eval_sequences, 101 + 10 * i + j)])
  roles = {role: tuple(s.name for s in sources if s.role == role) for role in ROLES}
  evals, parts = {}, {}
  for split, arrays in by_source.items():
    evals[split] = {role: arrays[names[0]] if len(names) == 1 else np.concatenate([arrays[n] for n in names])
                    for role, names in roles.items()}
    parts[split] = {role: tuple((n, int(len(arrays[n]))) for n in names) for role, names in roles.items()}
  cloze = {split: textdata.make_cloze_items([d for n in roles[GENERAL] for d in domains[n].documents[split]], tok,
                                            num_items=t.cloze_items, context_tokens=t.cloze_context,
                                            num_choices=t.cloze_choices, seed=7 + j)
           for j, split in enumerate(("validation", "test"))}
  return CPTData(tok, train, doc_index, evals, cloze, {n: dom.count("train") for n, dom in domains.items()},
                 roles, parts)


def multi_source_roles(data: CPTData) -> tuple:
  """The roles with more than one source: their sources' own metrics are recorded (`with_source_metrics`)."""
  return tuple(role for role, names in roles_of(data).items() if len(names) > 1)


def source_metric(name: str, metric: str = "perplexity") -> str:
  """A source's own metric name. Not under `general/`: the monitor guards the role's set, a source's share of it
  is recorded, not guarded."""
  return f"source/{name}/{metric}"


def source_metrics(data: CPTData, split: str = "test") -> list:
  """`source/<name>/perplexity` of every source of a role with several sources that has >= 2 rows in `split`'s set
  (a paired interval needs two): the per-source metrics the run reports intervals for, recorded, never guarded."""
  if data.parts is None:
    return []
  return [source_metric(name) for role in multi_source_roles(data) for name, n in data.parts[split][role] if n >= 2]


def with_source_metrics(evaluate, data: CPTData):
  """The LM evaluator (`cl_jax.eval.evaluator.make_lm_evaluator`) plus, for each role with several sources, every
  source's own perplexity and next-token accuracy (`source_metric`), computed from the role's per-sequence scores
  over the source's rows of the role's set (`data.parts`): the same numbers as scoring the source alone, at no
  extra model call. Their per-sequence items go into `per_item` too (paired intervals against the base).
  Unchanged when every role has one source."""
  roles = multi_source_roles(data)
  if not roles or data.parts is None:
    return evaluate
  # The role arrays are the very objects the callers pass (`data.eval[split]`, or a dict holding them): their
  # identity names the split, whose row counts locate each source.
  where = {id(data.eval[split][role]): data.parts[split][role] for split in data.parts for role in roles}

  def evaluate_with_sources(params, sequences: dict, cloze=None, per_item: dict | None = None) -> dict:
    items = {} if per_item is None else per_item
    out = evaluate(params, sequences, cloze, per_item=items)
    for role in roles:
      parts = where.get(id(sequences.get(role)))
      if parts is None or sum(n for _, n in parts) != len(sequences[role]):
        continue
      nll, hit = items[f"{role}/perplexity"], items[f"{role}/accuracy"]
      at = 0
      for name, n in parts:
        if n:
          sl = slice(at, at + n)
          out[source_metric(name)] = float(np.exp(np.mean(nll[sl])))
          out[source_metric(name, "accuracy")] = float(np.mean(hit[sl]))
          items[source_metric(name)], items[source_metric(name, "accuracy")] = nll[sl], hit[sl]
        at += n
    return out

  return evaluate_with_sources


def eval_sizes(data: CPTData) -> dict:
  """{split: {role: {'sequences', 'tokens' (scored targets)}, 'cloze_items': n}} of the evaluation sets, and
  `'sources': {source: {'role', 'sequences', 'tokens'}}` when a role has several sources."""
  out = {}
  for split, by_role in data.eval.items():
    out[split] = {role: {"sequences": int(len(tok)), "tokens": int(len(tok) * (tok.shape[1] - 1))}
                  for role, tok in by_role.items()}
    out[split]["cloze_items"] = int(len(data.cloze[split].answer))
    if multi_source_roles(data) and data.parts is not None and split in data.parts:
      width = int(next(iter(by_role.values())).shape[1]) - 1
      out[split]["sources"] = {name: {"role": role, "sequences": n, "tokens": n * width}
                               for role, parts in data.parts[split].items() for name, n in parts}
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


__all__ = ["CACHED_EVAL_SEQUENCES", "CACHED_CONSOLIDATION_SEQUENCES", "EVAL_TOKENS", "CPTData", "Source", "ROLES",
           "run_sources", "roles_of", "source_order", "general_sample", "run_tokenizer", "load_data",
           "multi_source_roles", "source_metric", "source_metrics", "with_source_metrics", "eval_sizes", "subset", "next_token_batch",
           "sampler_batch"]
