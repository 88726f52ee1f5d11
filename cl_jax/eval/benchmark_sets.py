"""Offline benchmark sets in the formats practice reports forgetting with, generated from local material.

Continual pre-training is judged by general-benchmark deltas -- MMLU (Hendrycks et al. 2021), HellaSwag (Zellers
et al. 2019), GSM8K (Cobbe et al. 2021) -- and a machine without network has none of them. These sets are built
here, deterministically, from what ships with CPython (the `general` corpus of `cl_jax.data.text`: the
`pydoc_data.topics` reference pages and the docstrings of the general half of the standard library) and from
seeded templates; no benchmark text is copied. Each is an lm-eval task (YAML + JSONL in `task_dir()`) and a
monitor benchmark (`load` + `score`, which scores exactly as lm-eval 0.4.13 scores the YAML).

| name              | lm-eval task             | scored like                                            | test items | primary     |
| ----------------- | ------------------------ | ------------------------------------------------------ | ---------- | ----------- |
| `knowledge`       | `cl_jax_knowledge`       | MMLU: 4 choices, continuations " A".." D", 0-shot      | 2,000      | acc         |
| `knowledge_cloze` | `cl_jax_knowledge_cloze` | the same items, the answer's text as continuation      | 2,000      | acc_norm    |
| `completion`      | `cl_jax_completion`      | HellaSwag: 4 endings, acc_norm by characters           | 1,714      | acc_norm    |
| `arithmetic`      | `cl_jax_arithmetic`      | GSM8K: 4-shot, "#### N", strict-match exact_match      | 2,000      | exact_match |

What a model needs to know:
  * `knowledge` -- facts stated in the general corpus's TRAIN split (the documents an LM run pre-trains on, split
    as the LM runs split them: `text.split_documents(seed=0, validation=0.15, test=0.15)`), as MMLU asks for what
    pre-training taught: a sentence of a pydoc page or docstring with one term blanked -- a stdlib module, built-in
    function, keyword, exception, dunder name, constant, built-in type or documentation noun ("argument",
    "iterator", ...), the most specific kind present -- the true term and three distractors of its kind that the
    sentence does not contain ("Return a ____ of strings": list, not dict or tuple). A model that read the corpus
    and still remembers it picks the documented term; forgetting general text loses exactly these facts. The
    prompt is MMLU's ("Question\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:", continuations " A".." D"), which also
    needs the letter-answer convention, which small models lack (they score MMLU near chance).
  * `knowledge_cloze` -- the same items as a cloze: context = the sentence up to the blank, continuation = each
    term followed by the rest of the sentence (lm-eval `target_delimiter: ""`; acc_norm by characters), the form a
    small model trained on the corpus is measured with. Every scored continuation (here and in `completion`) is
    at most 100 UTF-8 bytes, so a byte-level model at the LM runs' lm.seq_len = 128 scores every item (contexts
    beyond a model's window are left-truncated, as lm-eval does).
  * `completion` -- held-out language: a sentence of the corpus's TEST and VALIDATION splits (an LM run trains on
    neither) cut at a word boundary between 40% and 60% of its words (later where the ending would exceed 100
    bytes), after the sentence before it; the true ending against the endings of three sentences of similar
    length (the 40 nearest by length) from other documents. Grammar, topic coherence and the documentation's
    style decide it -- what general pre-training builds and domain training erodes. Every usable held-out
    sentence is an item (1,714 of the 2,000 asked for).
  * `arithmetic` -- templated multi-step word problems (8 templates; seeded names, objects and numbers 2-99), each
    with a worked solution ending "#### N". The first 4 train items precede every test question (lm-eval's
    `first_n` sampler on the `train` split; `load(num_fewshot=k)` / `--num_fewshot k` choose k). Prompts are
    ~880 bytes at 4-shot: a model with a short context (the byte tokenizer at seq_len 128) is scored on a
    left-truncated prompt. The train split (1,000 committed; `arithmetic_items("train", n)` makes more, drawn
    disjoint from the test questions) may be mixed into general pre-training so a small model learns the format;
    a run that does so must say it, as its arithmetic score then measures retention of a trained skill.

How much of each set general text answers, and how far a model without it falls (character 6-gram models counted
on the general train split vs on code only, scored by `score`): results/benchmark_sets_baseline.md
(`python scripts/benchmark_sets_baseline.py`).

Detectable difference. Two checkpoints are compared on the same items (the monitor's paired rule); McNemar's test
at two-sided level a with power 1-b, when a fraction p_d of the items changes correctness between them, needs
(Connor 1987)
  n = (z_{1-a/2} sqrt(p_d) + z_{1-b} sqrt(p_d - d^2))^2 / d^2
items to detect an accuracy difference d. Solved for d at a = 0.05, power 0.8 (`detectable_difference`):

| n            | p_d = 0.05 | p_d = 0.10 | p_d = 0.20 |
| ------------ | ---------- | ---------- | ---------- |
| 2,000        | 1.40       | 1.98       | 2.80       |
| 1,714        | 1.51       | 2.14       | 3.02       |
| 500 (limit)  | 2.79       | 3.95       | 5.59       |

(points). So a 2-point change is detectable on the 2,000-item sets when at most 10% of items flip between the
checkpoints (completion: at most ~8.5%); a larger flip rate or a `limit` needs a larger change.

Regenerate (byte-identical for the same seed and CPython: the general corpus is the running interpreter's, so
`MANIFEST.json` records the version the committed files were built with, and the SHA-256 of each), or compare:
  python -m cl_jax.eval.benchmark_sets --write
  python -m cl_jax.eval.benchmark_sets --check        # exit 1 naming the files a fresh generation changes
Run through lm-eval (`cl-jax lm-eval` registers the `cl_jax` model):
  cl-jax lm-eval --model cl_jax --model_args pretrained=<dir> --tasks cl_jax_knowledge --include_path <task_dir()>
"""
from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import keyword
import math
import os
import platform
import re
import statistics
import sys
import types
from typing import NamedTuple, Sequence

import numpy as np

from cl_jax.errors import ConfigError

BUILTIN = ("knowledge", "completion", "arithmetic", "knowledge_cloze")
TASK_NAMES = {name: f"cl_jax_{name}" for name in BUILTIN}
SEED = 0
# The general corpus is split as the LM runs split it (cl_jax/lm/config.py: text.split_seed, validation, test);
# tests/test_benchmark_sets.py checks these equal the LM config's defaults.
SPLIT_SEED, SPLIT_VALIDATION, SPLIT_TEST = 0, 0.15, 0.15
# Items per data file (completion holds every usable held-out sentence, fewer than asked for).
SIZES = {"knowledge": {"dev": 5, "test": 2000}, "completion": {"test": 2000},
         "arithmetic": {"train": 1000, "test": 2000}}


# A scored continuation (the delimiter, an ending or a cloze term with the rest of its sentence) is at most this many
# UTF-8 bytes, so a byte-level model with lm.seq_len = 128 (the LM runs' default) can score every item; contexts
# longer than a model's window are left-truncated, as lm-eval truncates them.
MAX_CONTINUATION_BYTES = 100


class _Spec(NamedTuple):
  data: str             # the stem of the JSONL files (`<data>_<split>.jsonl`)
  kind: str             # lm-eval output type
  metrics: tuple
  primary: str
  fewshot_split: str | None
  num_fewshot: int
  delimiter: str = " "  # lm-eval's target_delimiter: between the context and a choice / a few-shot answer


# knowledge_cloze scores the knowledge items by the text of the answer, as ARC and HellaSwag score theirs (a model
# without MMLU's letter-answer convention is measured too): the sentence up to the blank, then each term with the
# rest of the sentence.
SPECS = {"knowledge": _Spec("knowledge", "multiple_choice", ("acc",), "acc", "dev", 0),
         "completion": _Spec("completion", "multiple_choice", ("acc", "acc_norm"), "acc_norm", None, 0),
         "arithmetic": _Spec("arithmetic", "generate_until", ("exact_match", "exact_match_flexible"), "exact_match",
                             "train", 4),
         "knowledge_cloze": _Spec("knowledge", "multiple_choice", ("acc", "acc_norm"), "acc_norm", "dev", 0, "")}

# The prompt conventions of the three lm-eval tasks (MMLU's, HellaSwag's, GSM8K's). The YAML files are written from
# these same constants, so `score` and lm-eval cannot drift apart.
KNOWLEDGE_DESCRIPTION = "The following are multiple choice questions (with answers) about the Python language.\n\n"
LETTERS = ("A", "B", "C", "D")
GEN_KWARGS = {"until": ["Question:", "</s>", "<|im_end|>", "\n\n"], "do_sample": False, "temperature": 0.0}
STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE_REGEXES = (",", "\\$", "(?s).*#### ", "\\.$")  # GSM8K's exact_match: ignore_case, these removed
FALLBACK = "[invalid]"  # lm-eval's regex filter's answer when nothing matches


class Benchmark(NamedTuple):
  name: str
  kind: str            # 'multiple_choice' | 'generate_until'
  items: list          # dicts (the JSONL rows)
  metrics: tuple       # e.g. ('acc', 'acc_norm') or ('exact_match', 'exact_match_flexible')
  primary: str         # the metric the monitor guards by default
  style: str = ""      # the BUILTIN name whose prompt format the rows take ('knowledge', 'completion', ...)
  fewshot: tuple = ()  # rows prepended as worked examples (lm-eval's first_n sampler)


def _h(*parts) -> float:
  """A uniform number in [0, 1) from the parts: order and choices without RNG state (stable across versions)."""
  digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def _order(keys, *salt):
  return sorted(keys, key=lambda k: _h(*salt, k))


# ----------------------------------------------------------------------------- statistics

def _z(p: float) -> float:
  return statistics.NormalDist().inv_cdf(p)


def detectable_difference(n: int, discordance: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
  """The smallest paired accuracy difference d that McNemar's test detects with `power` at two-sided `alpha` on n
  items when a fraction `discordance` of them flips: the root of
  n d^2 = (z_{1-a/2} sqrt(p_d) + z_power sqrt(p_d - d^2))^2 (Connor 1987), by bisection on d in (0, sqrt(p_d))."""
  za, zb = _z(1 - alpha / 2), _z(power)
  lo, hi = 0.0, math.sqrt(discordance)
  for _ in range(100):
    d = (lo + hi) / 2
    need = (za * math.sqrt(discordance) + zb * math.sqrt(max(discordance - d * d, 0.0))) ** 2 / (d * d)
    lo, hi = (d, hi) if need > n else (lo, d)
  return hi


# ----------------------------------------------------------------------------- sentences of the general corpus

# A sentence ends at . ! ? or : after a word (not after "e.g." / "i.e.") and before a capital or an opening quote.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'’”][.!?:])(?<!\be\.g\.)(?<!\bi\.e\.)\s+(?=[A-Z\"“])")


def _paragraph_sentences(text: str) -> list[list[str]]:
  """Prose paragraphs (blank-line separated; a bullet item is its own paragraph; indented blocks -- examples,
  grammar, argument tables -- and ruled tables dropped) as lists of whitespace-normalised sentences."""
  out = []
  for para in re.split(r"\n\s*\n", text):
    # A bullet ("* ", "- ") starts its own item; an item with an indented or ruled line is code, grammar or a table.
    items = re.split(r"\n(?=[*-] )", para)
    for item in items:
      lines = item.splitlines()
      if not lines or any(ln.startswith((" ", "\t", ">>>", "=", "+", "|")) for ln in lines):
        continue
      flat = " ".join(item.split())
      flat = flat[2:] if flat.startswith(("* ", "- ")) else flat
      if "::=" in flat or ">>>" in flat:
        continue
      out.append([s for s in _SENTENCE_END.split(flat) if s])
  return out


_PROSE_CHARS = set(" ,.;:'\"()-?!’‘“”")


def _prose(sentence: str, lo: int, hi: int) -> bool:
  """A sentence of running text: length in [lo, hi], at least 85% letters, spaces and punctuation, and it ends."""
  plain = sum(c.isalpha() or c in _PROSE_CHARS for c in sentence)
  return lo <= len(sentence) <= hi and plain >= 0.85 * len(sentence) and sentence[-1] in ".!?:)\""


def _general_splits():
  from cl_jax.data import text as textdata
  docs = textdata.deduplicate(textdata.general_documents())
  return textdata.split_documents(docs, seed=SPLIT_SEED, validation=SPLIT_VALIDATION, test=SPLIT_TEST)


# ----------------------------------------------------------------------------- knowledge (MMLU-like)

def _vocabularies() -> dict[str, tuple[str, ...]]:
  """The closed term kinds a knowledge item blanks; distractors are drawn from the blanked term's own kind."""
  names = dir(builtins)
  exceptions = tuple(n for n in names if isinstance(getattr(builtins, n), type)
                     and issubclass(getattr(builtins, n), BaseException) and not n.startswith("_"))
  # Not "set", "object", "range", "type": in running text they are English words more often than Python names.
  type_names = ("int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple", "dict", "frozenset", "bool",
                "memoryview")
  # Built-in functions proper: not the helpers `site` adds (help, exit, license) or a notebook's, so the set does not
  # depend on how the interpreter was started.
  functions = tuple(n for n in names if not n.startswith("_")
                    and isinstance(getattr(builtins, n), types.BuiltinFunctionType))
  modules = tuple(sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m.isidentifier()))
  plural = {c: c[:-1] + "ies" if c.endswith("y") else c + "es" if c.endswith(("s", "x", "ch")) else c + "s"
            for c in _CONCEPTS}
  # Dunder names: those of the built-in types plus the protocol and module ones no built-in type carries.
  dunders = {a for t in (object, type, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
                         BaseException, property, range, slice, memoryview) for a in dir(t)}
  dunders = tuple(sorted({a for a in dunders if a.startswith("__") and a.endswith("__")} | set(_MORE_DUNDERS)))
  return {"module": modules, "function": functions, "keyword": tuple(keyword.kwlist), "exception": exceptions,
          "dunder": dunders, "constant": ("True", "False", "None"), "type": type_names, "concept": _CONCEPTS,
          "concepts": tuple(plural[c] for c in _CONCEPTS)}


_MORE_DUNDERS = ("__enter__", "__exit__", "__aenter__", "__aexit__", "__await__", "__aiter__", "__anext__", "__get__",
                 "__set__", "__delete__", "__set_name__", "__missing__", "__call__", "__main__", "__name__",
                 "__file__", "__all__", "__slots__", "__path__", "__spec__", "__loader__", "__package__",
                 "__debug__", "__future__", "__builtins__", "__import__", "__annotations__", "__qualname__",
                 "__module__", "__wrapped__", "__code__", "__defaults__", "__kwdefaults__", "__globals__",
                 "__closure__", "__self__", "__func__", "__version__")

# Nouns of the language's documentation (the "concept" kind; its plurals are the "concepts" kind): a sentence that
# states what something is, takes or returns is answered by the noun the documentation uses.
_CONCEPTS = ("argument", "attribute", "buffer", "bytecode", "callback", "character", "class", "coroutine",
             "decorator", "descriptor", "dictionary", "directory", "encoding", "exception", "expression", "file",
             "function", "generator", "handler", "header", "identifier", "index", "instance", "integer",
             "interpreter", "iterator", "keyword", "line", "list", "loop", "mapping", "message", "method", "module",
             "name", "namespace", "number", "object", "operator", "package", "parameter", "path", "pattern",
             "process", "protocol", "queue", "request", "scope", "sequence", "server", "signal", "socket",
             "statement", "stream", "string", "subclass", "thread", "timeout", "token", "tuple", "value",
             "variable", "warning", "widget")


def _term_pattern(kind: str, term: str) -> str:
  """Where a term counts as that kind of term (plain English words like "list", "in" or "time" only in the places
  where the documentation uses them as Python names)."""
  t = re.escape(term)
  if kind == "keyword":
    return rf'(?<=")({t})(?=")'                       # pydoc quotes keywords: "for", "while"
  if kind == "function":
    return rf"(?<![\w.])({t})(?=\(\))"                # len(), isinstance()
  if kind == "module":
    return rf"(?<=the )({t})(?= module)"              # the os module
  return rf"(?<![\w.])({t})(?![\w])"                  # types, exceptions, constants as words


def _sentences(docs, lo: int, hi: int):
  """(key, group, sentence, the sentence before it or "") for every prose sentence of length in [lo, hi]. The key
  names the document by its ordinal within its group (the docstrings of one file share the group), so an item's
  construction depends on its own document alone."""
  ordinal = {}
  for d in docs:
    j = ordinal[d.group] = ordinal.get(d.group, -1) + 1
    for p, sentences in enumerate(_paragraph_sentences(d.text)):
      for s_i, s in enumerate(sentences):
        if _prose(s, lo, hi):
          yield f"{d.group}|{j}|{p}|{s_i}", d.group, s, sentences[s_i - 1] if s_i else ""


def _word(t: str) -> str:
  return rf"(?<!\w){re.escape(t)}(?!\w)"


def knowledge_candidates(docs, *, seed: int = SEED) -> list[tuple[str, dict]]:
  """(key, item) for every sentence of the documents that holds exactly one term of a known kind (`_vocabularies`):
  the most specific kind present (a module or function name before a common noun), a hashed pick within it, blanked;
  three distractors of the same kind that the sentence does not contain; the answer at a hashed position."""
  vocab = _vocabularies()
  patterns = {(k, t): re.compile(_term_pattern(k, t)) for k, ts in vocab.items() for t in ts}
  kinds = list(vocab)
  out = []
  for key, group, s, _ in _sentences(docs, 40, 320):
    words = set(re.findall(r"\w+", s))
    found = [(k, t) for k, ts in vocab.items() for t in ts if t in words and len(patterns[(k, t)].findall(s)) == 1
             and len(re.findall(_word(t), s)) == 1]
    if not found:
      continue
    first = min(kinds.index(k) for k, _ in found)
    k, t = _order([f for f in found if kinds.index(f[0]) == first], seed, "term", key)[0]
    others = [o for o in vocab[k] if o != t and not re.search(_word(o), s)]
    if len(others) < 3:
      continue
    distractors = _order(others, seed, "distractor", key)[:3]
    answer = int(_h(seed, "position", key) * 4)
    m = patterns[(k, t)].search(s)
    pre, post = s[:m.start(1)], s[m.end(1):]
    if not pre.strip():  # the cloze form needs a context before the blank
      continue
    choices = distractors[:answer] + [t] + distractors[answer:]
    # The cloze form: the sentence up to the blank is the context, each term with the rest of the sentence a
    # continuation (the space before the blank, where there is one, begins it: the text reads as written).
    space = " " if pre.endswith(" ") else ""
    if max(len((space + c + post).encode("utf-8")) for c in choices) > MAX_CONTINUATION_BYTES:
      continue
    out.append((key, {"question": f"Which term completes this statement about Python? {pre}____{post}",
                      "choices": choices, "answer": answer, "kind": k, "source": group,
                      "cloze_context": pre[:len(pre) - len(space)],
                      "cloze_choices": [space + c + post for c in choices]}))
  return out


def knowledge_items(docs, n: int, *, seed: int = SEED) -> list[dict]:
  """n MMLU-style items: the first n candidates (`knowledge_candidates`) in hashed order, one per sentence text."""
  items, seen = [], set()
  for key, item in sorted(knowledge_candidates(docs, seed=seed), key=lambda c: _h(seed, "knowledge", c[0])):
    if len(items) == n:
      break
    if item["question"] not in seen:
      seen.add(item["question"])
      items.append(item)
  return items


# ----------------------------------------------------------------------------- completion (HellaSwag-like)

def completion_pool(docs, *, seed: int = SEED) -> list[tuple[str, str, str, str]]:
  """(key, group, query, true ending) for every prose sentence of 8+ words: the cut is a word boundary between 40%
  and 60% of its words (placed by the hash), the query the sentence before it (when at most 240 characters) and
  the words before the cut."""
  pool = []
  for key, group, s, before in _sentences(docs, 40, 320):
    words = s.split(" ")
    if len(words) < 8:
      continue
    cut = min(max(int(len(words) * (0.4 + 0.2 * _h(seed, "cut", key))), 3), len(words) - 3)
    while len(" ".join(words[cut:]).encode("utf-8")) + 1 > MAX_CONTINUATION_BYTES and cut < len(words) - 3:
      cut += 1  # a long sentence is cut later: its ending (with the delimiter's space) must fit the cap
    if len(" ".join(words[cut:]).encode("utf-8")) + 1 > MAX_CONTINUATION_BYTES:
      continue
    query = ((before if len(before) <= 240 else "") + " " + " ".join(words[:cut])).strip()
    pool.append((key, group, query, " ".join(words[cut:])))
  return pool


def completion_items(docs, n: int, *, seed: int = SEED) -> list[dict]:
  """n HellaSwag-style items: a query of `completion_pool`, its true ending and three endings of similar length
  from other documents."""
  pool = completion_pool(docs, seed=seed)
  by_len = sorted(range(len(pool)), key=lambda i: (len(pool[i][3]), pool[i][0]))
  rank = {i: r for r, i in enumerate(by_len)}
  items, seen = [], set()
  for i in sorted(range(len(pool)), key=lambda i: _h(seed, "completion", pool[i][0], pool[i][2])):
    if len(items) == n:
      break
    key, group, query, ending = pool[i]
    if query in seen:
      continue
    # Distractors: endings of similar length (the 40 nearest by length) from other documents, so length alone
    # does not give the answer away (acc_norm divides by it).
    r = rank[i]
    near = [by_len[j] for j in range(max(0, r - 20), min(len(by_len), r + 21))]
    others = sorted({pool[j][3] for j in near if pool[j][1] != group and pool[j][3] != ending})
    if len(others) < 3:
      continue
    distractors = _order(others, seed, "ending", key)[:3]
    label = int(_h(seed, "label", key) * 4)
    items.append({"query": query, "choices": distractors[:label] + [ending] + distractors[label:], "label": label,
                  "source": group})
    seen.add(query)
  return items


# ----------------------------------------------------------------------------- arithmetic (GSM8K-like)

_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Viktor", "Wen", "Yusuf", "Zoe")
_THINGS = ("apples", "stamps", "marbles", "books", "pencils", "cards", "shells", "stickers", "coins", "cookies",
           "buttons", "tickets")
_CONTAINERS = ("boxes", "bags", "jars", "packs", "crates", "baskets")


def _problem(r: np.random.Generator, template: int) -> tuple[str, str]:
  """One word problem from template `template`: (question, worked answer ending '#### N')."""
  name, other = [_NAMES[i] for i in r.choice(len(_NAMES), 2, replace=False)]
  thing = _THINGS[r.integers(len(_THINGS))]
  box = _CONTAINERS[r.integers(len(_CONTAINERS))]
  a, b, c, d = (int(x) for x in r.integers(2, 13, size=4))
  big = int(r.integers(20, 100))
  if template == 0:
    total = big + a * b - c
    q = f"{name} has {big} {thing}. {name} buys {a} {box} with {b} {thing} each and gives {c} to {other}. " \
        f"How many {thing} does {name} have now?"
    s = f"{a} {box} of {b} is {a} * {b} = {a * b}. {big} + {a * b} = {big + a * b}. " \
        f"{big + a * b} - {c} = {total}."
  elif template == 1:
    price, total = a + 1, (a + 1) * b + c * d
    q = f"A {thing[:-1]} costs ${price} and a pack of {thing} costs ${c}. {name} buys {b} single {thing} and " \
        f"{d} packs. How many dollars does {name} spend?"
    s = f"{b} * {price} = {b * price}. {d} * {c} = {d * c}. {b * price} + {d * c} = {total}."
  elif template == 2:
    total = big * a
    q = f"{name} reads {big} pages a day. How many pages does {name} read in {a} days?"
    s = f"{big} * {a} = {total}."
  elif template == 3:
    each, rest = big // a, big % a
    total = each
    q = f"{name} shares {big} {thing} equally among {a} friends and keeps the {rest} left over. " \
        f"How many {thing} does each friend get?"
    s = f"{big} - {rest} = {big - rest}. {big - rest} / {a} = {each}."
  elif template == 4:
    total = a * b * c
    q = f"A shelf holds {a} {box}, each {box[:-1] if not box.endswith('xes') else box[:-2]} holds {b} rows, " \
        f"and each row holds {c} {thing}. How many {thing} are on the shelf?"
    s = f"{a} * {b} = {a * b}. {a * b} * {c} = {total}."
  elif template == 5:
    total = big - a - b + c
    q = f"{name} had {big} {thing}, lost {a}, gave {b} to {other}, then found {c}. How many {thing} does " \
        f"{name} have?"
    s = f"{big} - {a} = {big - a}. {big - a} - {b} = {big - a - b}. {big - a - b} + {c} = {total}."
  elif template == 6:
    total = (a + b) * c
    q = f"{name} walks {a} km in the morning and {b} km in the evening. How many km does {name} walk in {c} days?"
    s = f"{a} + {b} = {a + b}. {a + b} * {c} = {total}."
  else:
    total = big + (big + a) + 2 * big
    q = f"{name} has {big} {thing}. {other} has {a} more than {name}, and a friend has twice as many as {name}. " \
        f"How many {thing} do they have together?"
    s = f"{other} has {big} + {a} = {big + a}. The friend has 2 * {big} = {2 * big}. " \
        f"{big} + {big + a} + {2 * big} = {total}."
  return q, f"{s}\n#### {total}"


def arithmetic_items(split: str, n: int, *, seed: int = SEED, exclude: Sequence[str] = ()) -> list[dict]:
  """n GSM8K-style items of `split` ('train' / 'test': separate seeded streams; a question in `exclude` is
  skipped, so train can be drawn disjoint from test)."""
  r = np.random.default_rng([seed, {"train": 1, "test": 2}[split]])
  skip, items = set(exclude), []
  while len(items) < n:
    q, a = _problem(r, int(r.integers(8)))
    if q in skip:
      continue
    skip.add(q)
    items.append({"question": q, "answer": a})
  return items


# ----------------------------------------------------------------------------- files: JSONL + lm-eval YAML

def task_dir() -> str:
  """The directory holding the YAML tasks and their JSONL data (`lm_eval --include_path <this>`)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def _jsonl(rows) -> str:
  return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _yaml_str(s: str) -> str:
  return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar


_METRIC = "  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"


def _yaml(name: str) -> str:
  """The lm-eval task of a set. Data: `dataset_path: json` + `data_files`, which lm-eval passes to
  `datasets.load_dataset` unchanged, so a relative path would resolve against the caller's working directory;
  `custom_dataset` (`_local.py`, next to this file) resolves them against the YAML's own directory instead."""
  spec = SPECS[name]
  files = "".join(f"    {s}: {spec.data}_{s}.jsonl\n" for s in SIZES[spec.data])
  out = (f"# Generated by `python -m cl_jax.eval.benchmark_sets --write` (cl_jax.eval.benchmark_sets): do not edit.\n"
         f"task: {TASK_NAMES[name]}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}"
         f"custom_dataset: !function _local.load_json\ntest_split: test\noutput_type: {spec.kind}\n")
  if spec.fewshot_split:
    out += f"fewshot_split: {spec.fewshot_split}\nfewshot_config:\n  sampler: first_n\n"
  if spec.num_fewshot:  # a 0 written here would make lm-eval ignore --num_fewshot (MMLU's YAML leaves it out too)
    out += f"num_fewshot: {spec.num_fewshot}\n"
  if name == "knowledge":  # MMLU's (lm-eval tasks/mmlu/default)
    out += (f"description: {_yaml_str(KNOWLEDGE_DESCRIPTION)}\n"
            "doc_to_text: \"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n"
            "D. {{choices[3]}}\\nAnswer:\"\n"
            "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\ndoc_to_target: answer\n")
  elif name == "knowledge_cloze":  # the answer's text as the continuation (as ARC / HellaSwag score)
    out += ("doc_to_text: cloze_context\ndoc_to_choice: cloze_choices\ndoc_to_target: answer\n"
            "target_delimiter: \"\"\n")
  elif name == "completion":  # HellaSwag's (lm-eval tasks/hellaswag), on rows already in its processed form
    out += "doc_to_text: \"{{query}}\"\ndoc_to_target: label\ndoc_to_choice: choices\n"
  else:  # GSM8K's (lm-eval tasks/gsm8k), with "\n\n" among the stop sequences
    until = "".join(f"    - {_yaml_str(u)}\n" for u in GEN_KWARGS["until"])
    out += ("training_split: train\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{answer}}\"\n"
            f"generation_kwargs:\n  until:\n{until}  do_sample: false\n  temperature: 0.0\nrepeats: 1\n"
            "filter_list:\n"
            f"  - name: \"strict-match\"\n    filter:\n      - function: \"regex\"\n"
            f"        regex_pattern: {_yaml_str(STRICT_REGEX)}\n      - function: \"take_first\"\n"
            f"  - name: \"flexible-extract\"\n    filter:\n      - function: \"regex\"\n        group_select: -1\n"
            f"        regex_pattern: {_yaml_str(FLEXIBLE_REGEX)}\n      - function: \"take_first\"\n")
  out += "metric_list:\n" + "".join(_METRIC.format(m) for m in spec.metrics if m != "exact_match_flexible")
  if spec.kind == "generate_until":
    out += ("    ignore_case: true\n    ignore_punctuation: false\n    regexes_to_ignore:\n"
            + "".join(f"      - {_yaml_str(x)}\n" for x in IGNORE_REGEXES))
  return out + "metadata:\n  version: 1.0\n"


_LOCAL_PY = '''"""lm-eval `custom_dataset` of the cl_jax offline sets (generated by cl_jax.eval.benchmark_sets: do not edit).

lm-eval 0.4.13 hands `dataset_kwargs.data_files` to `datasets.load_dataset` unchanged, so a relative path would
resolve against the working directory; here it resolves against this directory. The rows are read with `json` and
wrapped in a `datasets.DatasetDict` directly: nothing is written to the Hugging Face cache, nothing is downloaded.
"""
import json
import os


def load_json(data_files=None, **_metadata):
  import datasets
  here = os.path.dirname(os.path.abspath(__file__))
  out = {}
  for split, path in data_files.items():
    with open(os.path.join(here, path), encoding="utf-8") as f:
      out[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
  return datasets.DatasetDict(out)
'''


def generate(seed: int = SEED) -> dict[str, str]:
  """Every file of `task_dir()`: file name -> text (JSONL rows, the YAML tasks, the loader, MANIFEST.json)."""
  split = _general_splits()
  files = {}
  know = knowledge_items(split["train"], SIZES["knowledge"]["test"], seed=seed)
  dev = knowledge_items(split["validation"], SIZES["knowledge"]["dev"], seed=seed)
  files["knowledge_test.jsonl"], files["knowledge_dev.jsonl"] = _jsonl(know), _jsonl(dev)
  # Completion needs held-out prose: the test and validation splits (an LM run trains on neither) together.
  held_out = split["test"] + split["validation"]
  files["completion_test.jsonl"] = _jsonl(completion_items(held_out, SIZES["completion"]["test"], seed=seed))
  test = arithmetic_items("test", SIZES["arithmetic"]["test"], seed=seed)
  train = arithmetic_items("train", SIZES["arithmetic"]["train"], seed=seed, exclude=[r["question"] for r in test])
  files["arithmetic_test.jsonl"], files["arithmetic_train.jsonl"] = _jsonl(test), _jsonl(train)
  for name in BUILTIN:
    files[f"{TASK_NAMES[name]}.yaml"] = _yaml(name)
  files["_local.py"] = _LOCAL_PY
  manifest = {"generator": "python -m cl_jax.eval.benchmark_sets --write", "seed": seed,
              "python": platform.python_version(),  # pydoc_data and docstrings change between releases
              "corpus_split": {"seed": SPLIT_SEED, "validation": SPLIT_VALIDATION, "test": SPLIT_TEST},
              "items": {f: t.count("\n") for f, t in sorted(files.items()) if f.endswith(".jsonl")},
              "sha256": {f: hashlib.sha256(t.encode("utf-8")).hexdigest() for f, t in sorted(files.items())}}
  files["MANIFEST.json"] = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
  return files


def write(directory: str | None = None, seed: int = SEED) -> dict[str, str]:
  directory = directory or task_dir()
  os.makedirs(directory, exist_ok=True)
  files = generate(seed)
  for name, text in files.items():
    with open(os.path.join(directory, name), "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
  return files


# ----------------------------------------------------------------------------- load

_ROW_KEYS = {"knowledge": ("question", "choices", "answer"), "knowledge_cloze": ("cloze_context", "cloze_choices", "answer"),
             "completion": ("query", "choices", "label"), "arithmetic": ("question", "answer")}


def _row_style(row, where: str) -> str:
  """The set a row belongs to: its "style" key when it has one (one of `BUILTIN`), else read from its keys."""
  if not isinstance(row, dict):
    raise ConfigError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
  style = row.get("style")
  if style is None:
    style = ("completion" if "query" in row else "knowledge" if "choices" in row
             else "knowledge_cloze" if "cloze_choices" in row
             else "arithmetic" if "question" in row and "answer" in row else None)
  if style not in SPECS:
    raise ConfigError(f"{where}: a row is {{question, choices, answer}} (4-choice knowledge), {{cloze_context, "
                      f"cloze_choices, answer}} (knowledge cloze), {{query, choices, label}} (completion) or "
                      f"{{question, answer}} (arithmetic), with an optional \"style\" in "
                      f"{list(BUILTIN)}; got keys {sorted(row)}" + (f", style {style!r}" if "style" in row else ""))
  missing = [k for k in _ROW_KEYS[style] if k not in row]
  if missing:
    raise ConfigError(f"{where}: a {style} row needs {list(_ROW_KEYS[style])}; missing {missing}")
  if style == "arithmetic":
    if not isinstance(row["question"], str) or not isinstance(row["answer"], str) or "#### " not in row["answer"]:
      raise ConfigError(f"{where}: 'question' and 'answer' must be strings, the answer ending '#### N'")
    return style
  field = "cloze_choices" if style == "knowledge_cloze" else "choices"
  choices, gold = row[field], row["label" if style == "completion" else "answer"]
  if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
    raise ConfigError(f"{where}: '{field}' must be a list of at least 2 non-empty strings")
  if style == "knowledge" and len(choices) != 4:
    raise ConfigError(f"{where}: a knowledge row has exactly 4 choices (letters A-D), got {len(choices)}")
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise ConfigError(f"{where}: the gold index must be an int in [0, {len(choices)}), got {gold!r}")
  text = {"knowledge": "question", "knowledge_cloze": "cloze_context", "completion": "query"}[style]
  if not isinstance(row[text], str):
    raise ConfigError(f"{where}: '{text}' must be a string")
  return style


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  try:
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ConfigError(f"{path}:{i}: not JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  return rows


def load(name_or_path: str, split: str = "test", limit: int | None = None,
         num_fewshot: int | None = None) -> Benchmark:
  """A built-in set (a name of `BUILTIN`, or its lm-eval task name `cl_jax_<name>`) or a user's .jsonl file in
  the same row format (the set's style read from each row's "style" key or its keys; a user's file is scored
  0-shot). `limit` keeps the first items (lm-eval's `--limit`); `num_fewshot` replaces the YAML's number of worked
  examples of a built-in set (lm-eval's `--num_fewshot`: the first k rows of its few-shot split)."""
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
    raise ConfigError(f"benchmark {name_or_path!r}: limit={limit!r}, expected a positive int or None")
  if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                  or num_fewshot < 0):
    raise ConfigError(f"benchmark {name_or_path!r}: num_fewshot={num_fewshot!r}, expected an int >= 0 or None")
  name = next((b for b in BUILTIN if name_or_path in (b, TASK_NAMES[b])), None)
  fewshot = ()
  if name is not None:
    spec = SPECS[name]
    if split not in SIZES[spec.data]:
      raise ConfigError(f"benchmark {name!r}: split={split!r}, expected one of {sorted(SIZES[spec.data])}")
    rows = _read_jsonl(os.path.join(task_dir(), f"{spec.data}_{split}.jsonl"))
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k:
      if spec.fewshot_split is None:
        raise ConfigError(f"benchmark {name!r}: num_fewshot={k}, but the set has no few-shot split (0 only)")
      fewshot_rows = _read_jsonl(os.path.join(task_dir(), f"{spec.data}_{spec.fewshot_split}.jsonl"))
      if k > len(fewshot_rows):
        raise ConfigError(f"benchmark {name!r}: num_fewshot={k}, but its {spec.fewshot_split} split holds "
                          f"{len(fewshot_rows)} rows")
      fewshot = tuple(fewshot_rows[:k])
    style = name
  else:
    path = name_or_path
    if num_fewshot:
      raise ConfigError(f"benchmark {path!r}: num_fewshot={num_fewshot}: a user's file is scored 0-shot")
    if not str(path).endswith(".jsonl") or not os.path.isfile(path):
      raise ConfigError(f"benchmark {path!r}: expected one of {list(BUILTIN)} or an existing .jsonl file")
    rows = _read_jsonl(path)
    if not rows:
      raise ConfigError(f"benchmark {path!r}: the file has no rows")
    styles = {_row_style(r, f"{path}:{i + 1}") for i, r in enumerate(rows)}
    if len(styles) != 1:
      raise ConfigError(f"benchmark {path!r}: rows of several styles {sorted(styles)}; one file holds one set")
    style = styles.pop()
    name = os.path.splitext(os.path.basename(path))[0]
  spec = SPECS[style]
  return Benchmark(name, spec.kind, rows[:limit], spec.metrics, spec.primary, style, fewshot)


# ----------------------------------------------------------------------------- score (as lm-eval scores the YAML)

def _text(style: str, row: dict) -> str:
  """lm-eval's `doc_to_text` of the set's YAML."""
  if style == "knowledge":
    c = row["choices"]
    return f"{row['question'].strip()}\n" + "".join(f"{LETTERS[i]}. {c[i]}\n" for i in range(4)) + "Answer:"
  if style == "knowledge_cloze":
    return row["cloze_context"]
  if style == "completion":
    return row["query"]
  return f"Question: {row['question']}\nAnswer:"


def _choices(style: str, row: dict) -> list[str]:
  """lm-eval's `doc_to_choice` (multiple choice)."""
  if style == "knowledge":
    return list(LETTERS)
  return list(row["cloze_choices" if style == "knowledge_cloze" else "choices"])


def _gold(style: str, row: dict) -> int:
  return row["label"] if style == "completion" else row["answer"]


def _target(style: str, row: dict) -> str:
  """lm-eval's `doc_to_target` as text: the gold choice, or the worked answer."""
  return row["answer"] if style == "arithmetic" else _choices(style, row)[_gold(style, row)]


def context(bench: Benchmark, row: dict) -> str:
  """lm-eval's prompt for a row (`Task.fewshot_context`, plain text, no chat template): the description, each
  few-shot example as text + " " + target + "\\n\\n", then the row's text."""
  out = KNOWLEDGE_DESCRIPTION if bench.style == "knowledge" else ""
  for ex in bench.fewshot:
    out += _text(bench.style, ex) + SPECS[bench.style].delimiter + _target(bench.style, ex) + "\n\n"
  return out + _text(bench.style, row)


def requests(bench: Benchmark) -> list:
  """The engine requests of the set in item order: (context, delimiter + choice) pairs, choices of an item adjacent,
  for a multiple-choice set (the delimiter is " ", "" for knowledge_cloze); (context, generation kwargs) for a
  generation set."""
  if bench.kind == "multiple_choice":
    d = SPECS[bench.style].delimiter
    return [(context(bench, r), d + c) for r in bench.items for c in _choices(bench.style, r)]
  return [(context(bench, r), json.loads(json.dumps(GEN_KWARGS))) for r in bench.items]


def _extract(text: str, regex: str, group_select: int) -> str:
  """lm-eval's `regex` filter followed by `take_first`."""
  match = re.findall(regex, text if isinstance(text, str) else "")
  if not match:
    return FALLBACK
  match = match[group_select]
  if isinstance(match, tuple):
    match = next((m for m in match if m), FALLBACK)
  return match.strip()


def _normalise_answer(s: str) -> str:
  """GSM8K's exact_match normalisation (lm-eval `exact_match_hf_evaluate`): regexes removed, then lower-cased."""
  for r in IGNORE_REGEXES:
    s = re.sub(r, "", s)
  return s.lower()


def score(bench: Benchmark, engine) -> tuple[dict, dict]:
  """Scores the set with `engine.loglikelihood` / `engine.generate_until` exactly as lm-eval scores its YAML task.

  Multiple choice (lm-eval `ConfigurableTask.process_results`): acc = [argmax_i ll_i == gold]; acc_norm =
  [argmax_i ll_i / len(choice_i) == gold], len in characters of the choice without the leading space (first index
  wins a tie, as np.argmax). Generation: the strict-match filter (`#### (-?[0-9.,]+)`, first match) and the
  flexible-extract one (last number), each compared with the answer after `,`, `$`, everything up to `#### ` and a
  final `.` are removed and both are lower-cased.
  Returns ({metric: mean}, {metric: per-item float64 array, item order}).
  """
  if not bench.items:
    raise ConfigError(f"benchmark {bench.name!r}: no items to score")
  reqs = requests(bench)
  per = {}
  if bench.kind == "multiple_choice":
    out = engine.loglikelihood(reqs)
    acc, acc_norm, k = [], [], 0
    for row in bench.items:
      choices = _choices(bench.style, row)
      lls = np.array([float(ll) for ll, _ in out[k:k + len(choices)]])
      k += len(choices)
      gold = _gold(bench.style, row)
      acc.append(float(np.argmax(lls) == gold))
      acc_norm.append(float(np.argmax(lls / np.array([float(len(c)) for c in choices])) == gold))
    per = {"acc": np.array(acc), "acc_norm": np.array(acc_norm)}
  else:
    outs = engine.generate_until(reqs)
    gold = [_normalise_answer(r["answer"]) for r in bench.items]
    for metric, (regex, group) in {"exact_match": (STRICT_REGEX, 0), "exact_match_flexible": (FLEXIBLE_REGEX, -1)}.items():
      per[metric] = np.array([float(_normalise_answer(_extract(o, regex, group)) == g) for o, g in zip(outs, gold)])
  per = {m: per[m] for m in bench.metrics}
  return {m: float(v.mean()) for m, v in per.items()}, per


def check(directory: str | None = None, seed: int = SEED) -> list[str]:
  """The files of `directory` (default `task_dir()`) that differ from a fresh generation (empty: all identical)."""
  directory = directory or task_dir()
  differ = []
  for name, text in generate(seed).items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path) or open(path, encoding="utf-8", newline="").read() != text:
      differ.append(name)
  return differ


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m cl_jax.eval.benchmark_sets", description=__doc__.split("\n")[0])
  p.add_argument("--write", action="store_true", help="regenerate the files of task_dir() (or --dir)")
  p.add_argument("--check", action="store_true",
                 help="regenerate in memory and compare with task_dir() (or --dir): exit 1 naming what differs")
  p.add_argument("--dir", default=None, help="the directory to write or check instead of the package's")
  p.add_argument("--seed", type=int, default=SEED)
  a = p.parse_args(argv)
  if a.check:
    differ = check(a.dir, a.seed)
    print(f"differ from a fresh generation: {', '.join(differ)}" if differ else "identical to a fresh generation")
    return 1 if differ else 0
  if not a.write:
    p.print_help()
    return 0
  files = write(a.dir, a.seed)
  manifest = json.loads(files["MANIFEST.json"])
  for f, n in manifest["items"].items():
    print(f"{f}: {n} items")
  return 0


if __name__ == "__main__":
  sys.exit(main())
