"""Do the offline sets measure general text, and does losing it show? A model-free check with character n-grams.

A character 6-gram language model (Witten-Bell interpolation, Witten & Bell 1991) is counted on (a) the general
corpus's train split -- the text an LM run pre-trains on -- and (b) the same number of characters of the code domain's
train split (standard-library source: a model that knows only the domain, i.e. one that forgot general text). Each
scores the multiple-choice sets through `benchmark_sets.score` exactly as an engine would (its `loglikelihood`:
sum of log p over the continuation's characters), so the numbers say how much of each set the general material
answers and how far a domain-only model falls. `arithmetic` is generation and is not scored here. The paired
flip rate between the two models is the p_d of the detectable-difference table (`detectable_difference`).

  python scripts/benchmark_sets_baseline.py            # writes results/benchmark_sets_baseline.md
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import sys
import time

import numpy as np

from cl_jax.data import text as textdata
from cl_jax.eval import benchmark_sets as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ORDER = 6
SETS = ("knowledge", "knowledge_cloze", "completion")


class CharNgram:
  """p(c | h) = (n(h c) + T(h) p(c | h')) / (n(h) + T(h)), h' = h without its first character, T(h) the number of
  distinct characters seen after h; the order-0 model mixes the unigram with a uniform 1 / 2^16."""

  def __init__(self, texts, order: int = ORDER):
    self.order = order
    self.counts = collections.Counter()  # (h + c) -> n, every length 1..order
    self.totals = collections.Counter()  # h -> n(h)
    self.types = collections.Counter()   # h -> T(h)
    for t in texts:
      t = "\x02" * (order - 1) + t
      for i in range(order - 1, len(t)):
        for n in range(1, order + 1):
          self.counts[t[i - n + 1:i + 1]] += 1
    for gram, c in self.counts.items():
      self.totals[gram[:-1]] += c
      self.types[gram[:-1]] += 1

  def logp(self, history: str, c: str) -> float:
    p = 0.5 / 65536 + 0.5 * self.counts[c] / self.totals[""]
    for n in range(1, self.order):
      h = history[len(history) - n:] if len(history) >= n else None
      if h is None or not self.totals[h]:
        break
      p = (self.counts[h + c] + self.types[h] * p) / (self.totals[h] + self.types[h])
    return math.log(p)

  def loglikelihood(self, requests):
    """The engine interface `benchmark_sets.score` uses: (sum log p(continuation | context), greedy=False)."""
    out = []
    for context, continuation in requests:
      t, s = "\x02" * (self.order - 1) + context, 0.0
      for c in continuation:
        s += self.logp(t[-(self.order - 1):], c)
        t += c
      out.append((s, False))
    return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--limit", type=int, default=None, help="items per set (default: all)")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "benchmark_sets_baseline.md"))
  a = p.parse_args(argv)
  start = time.time()
  general = textdata.split_documents(textdata.deduplicate(textdata.general_documents()), seed=B.SPLIT_SEED,
                                     validation=B.SPLIT_VALIDATION, test=B.SPLIT_TEST)["train"]
  code = textdata.split_documents(textdata.deduplicate(textdata.code_documents()), seed=B.SPLIT_SEED,
                                  validation=B.SPLIT_VALIDATION, test=B.SPLIT_TEST)["train"]
  budget = sum(len(d.text) for d in general)
  code_texts, used = [], 0
  for d in code:  # as many characters of code as of general text
    code_texts.append(d.text[:budget - used])
    used += len(code_texts[-1])
    if used >= budget:
      break
  models = {"general": CharNgram([d.text for d in general]), "code only": CharNgram(code_texts)}
  rows, readings = [], []
  for name in SETS:
    bench = B.load(name, limit=a.limit)
    per = {m: B.score(bench, model)[1] for m, model in models.items()}
    metric = bench.primary
    g, c = per["general"][metric], per["code only"][metric]
    flip = float(np.mean(g != c))
    detectable = f"{100 * B.detectable_difference(len(g), flip):.2f}" if flip > 0 else "-"
    gains, losses = int(np.sum(g > c)), int(np.sum(g < c))
    z = (gains - losses) / math.sqrt(gains + losses) if gains + losses else 0.0  # McNemar's statistic
    above = (g.mean() - 0.25) / math.sqrt(0.25 * 0.75 / len(g))                   # vs chance, in standard errors
    rows.append(f"| `{name}` | {len(bench.items):,} | {metric} | {100 * g.mean():.1f} | {100 * c.mean():.1f} | "
                f"{100 * (g.mean() - c.mean()):+.1f} | {100 * flip:.1f} | {detectable} | {z:.1f} |")
    readings.append(f"`{name}`: the general model is {above:.1f} standard errors "
                    f"{'above' if above > 0 else 'below'} chance, and the code-only model "
                    + ("scores significantly lower (McNemar |z| > 1.96)" if z > 1.96 else
                       "does not score significantly lower (McNemar |z| <= 1.96)") + ".")
    print(rows[-1], flush=True)
  lines = [
      "# The offline benchmark sets against character n-gram models (no neural model)",
      "",
      f"Command: `python scripts/benchmark_sets_baseline.py{'' if a.limit is None else f' --limit {a.limit}'}` "
      f"({time.time() - start:.0f} s on {os.cpu_count()} CPUs; CPython {platform.python_version()}).",
      "",
      f"Character {ORDER}-gram models (Witten-Bell interpolation) counted on the general corpus's train split "
      f"({budget:,} characters: what an LM run pre-trains on) and on as many characters of the code domain's "
      "train split (standard-library source: a model without the general text). Each set is scored by "
      "`benchmark_sets.score` with the model's character log-likelihoods as the engine (chance: 25%). "
      "'flip' is the share of items whose correctness differs between the two models; 'detectable' the paired "
      "difference McNemar's test detects at that flip rate (5% level, 80% power).",
      "",
      "| set | items | metric | general 6-gram | code-only 6-gram | difference | flip % | detectable (points) "
      "| McNemar z |",
      "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
      *rows,
      "",
      *[f"- {r}" for r in readings],
      "",
      "The code domain's files keep their own docstrings, so the code-only model has read some English too. A "
      "character model scores a letter answer (' A'..' D') by the letters alone, the same for every item, so "
      "`knowledge` needs a model that has learnt MMLU's answer convention; `completion` pits fluent endings against each "
      "other, which a 6-character window tells apart mostly at the cut: these numbers say what local character "
      "statistics give, not what a neural model (which sees the whole context) will score.",
  ]
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
