"""The offline benchmark sets (cl_jax.eval.benchmark_sets): committed files = the generator's output, load's
refusals, score's numbers, and score = lm-eval's own scoring of the YAML tasks on the same (fake) model."""
from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib.machinery
import json
import os
import platform
import re
import sys
import tomllib
import types

import numpy as np
import pytest

from cl_jax.errors import ConfigError
from cl_jax.eval import benchmark_sets as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(name):
  with open(os.path.join(B.task_dir(), name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _h(*parts) -> float:
  digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def _number(answer: str) -> int:
  return int(answer.rsplit("#### ", 1)[1])


class FakeEngine:
  """Deterministic text-level scores (a hash of the request), the answers a test asks for, and a record of requests."""

  def __init__(self, answers=None):
    self.answers, self.seen = answers or {}, []

  def loglikelihood(self, requests):
    self.seen += [tuple(r) for r in requests]
    # About one nat per character, within 20%: length normalisation decides (acc and acc_norm part often).
    return [(-len(x) * (1.0 + 0.2 * _h("ll", c, x)), _h("greedy", c, x) < 0.3) for c, x in requests]

  def generate_until(self, requests):
    self.seen += [(c, json.dumps(k, sort_keys=True)) for c, k in requests]
    out = []
    for c, _ in requests:
      n = self.answers[c.rsplit("Question: ", 1)[1][:-len("\nAnswer:")]]
      # strict and flexible both right / flexible only / both wrong / right after GSM8K's ignore rules
      form = int(_h("form", c) * 4)
      out.append([f" {n - 1} + 1 = {n}.\n#### {n}", f" So {n} in total", f" #### {n + 1}", f" #### {n:,}."][form])
    return out


def test_split_constants_are_the_lm_runs():
  # Read from the source (importing cl_jax.lm.config pulls in jax and every strategy): the keywords of the
  # `dict(...)` that holds split_seed in lm/config.py's default_config.
  tree = ast.parse(open(os.path.join(ROOT, "cl_jax", "lm", "config.py")).read())
  calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and any(k.arg == "split_seed" for k in n.keywords)]
  assert len(calls) == 1
  text = {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords if k.arg in ("split_seed", "validation", "test")}
  assert (B.SPLIT_SEED, B.SPLIT_VALIDATION, B.SPLIT_TEST) == (text["split_seed"], text["validation"], text["test"])


def test_committed_files_are_the_generators_output():
  files = sorted(os.listdir(B.task_dir()))
  manifest = json.loads(open(os.path.join(B.task_dir(), "MANIFEST.json")).read())
  assert sorted([*manifest["sha256"], "MANIFEST.json"]) == sorted(f for f in files if f != "__pycache__")
  for f, digest in manifest["sha256"].items():
    with open(os.path.join(B.task_dir(), f), "rb") as fh:
      assert hashlib.sha256(fh.read()).hexdigest() == digest, f
  for name in B.BUILTIN:
    assert open(os.path.join(B.task_dir(), f"cl_jax_{name}.yaml")).read() == B._yaml(name)
  assert open(os.path.join(B.task_dir(), "_local.py")).read() == B._LOCAL_PY
  # Arithmetic: regenerated prefixes, byte for byte (train drawn disjoint from the committed test questions).
  test = open(os.path.join(B.task_dir(), "arithmetic_test.jsonl")).read().splitlines(keepends=True)
  train = open(os.path.join(B.task_dir(), "arithmetic_train.jsonl")).read().splitlines(keepends=True)
  assert B._jsonl(B.arithmetic_items("test", 300)) == "".join(test[:300])
  questions = [json.loads(r)["question"] for r in test]
  assert B._jsonl(B.arithmetic_items("train", 100, exclude=questions)) == "".join(train[:100])
  assert not set(questions) & {json.loads(r)["question"] for r in train}
  assert (len(test), len(train)) == (B.SIZES["arithmetic"]["test"], B.SIZES["arithmetic"]["train"])
  # Knowledge and completion come from the running CPython's corpus: rebuild the items of the pydoc pages (cheap:
  # no source file is parsed) and find every committed item of those pages among them, exactly.
  if manifest["python"] != platform.python_version():
    pytest.skip(f"the sets were built with Python {manifest['python']}: the corpus differs on this one")
  from pydoc_data.topics import topics
  know, comp = _rows("knowledge_test.jsonl"), _rows("completion_test.jsonl")
  pages = sorted({r["source"] for r in know + comp if r["source"].startswith("pydoc:")})[:12]
  # cl_jax.data.text.Document's fields (importing cl_jax.data would start jax: the generator needs only these).
  docs = [types.SimpleNamespace(text=topics[p[len("pydoc:"):]], group=p) for p in pages]
  rebuilt = [json.dumps(item, sort_keys=True) for _, item in B.knowledge_candidates(docs)]
  committed = [json.dumps(r, sort_keys=True) for r in know if r["source"] in pages]
  assert len(committed) >= 40 and set(committed) <= set(rebuilt)
  pool = {(q, e) for _, _, q, e in B.completion_pool(docs)}
  committed = [(r["query"], r["choices"][r["label"]]) for r in comp if r["source"] in pages]
  assert len(committed) >= 20 and set(committed) <= pool


def test_sets_are_well_formed():
  know, comp = _rows("knowledge_test.jsonl"), _rows("completion_test.jsonl")
  assert len(know) == 2000 and len(comp) >= 1700
  for name, n in (("knowledge", len(know)), ("completion", len(comp)), ("arithmetic", 2000)):
    assert re.search(rf"`cl_jax_{name}` +\| [^|]+\| {n:,} ", B.__doc__), name  # the docstring's item counts
  for r in know[:300]:
    gold = r["choices"][r["answer"]]
    assert len(set(r["choices"])) == 4 and r["question"].count("____") == 1
    # The cloze form is the sentence with each term in the blank.
    sentence = r["question"].split("Python? ", 1)[1]
    assert r["cloze_context"] + r["cloze_choices"][r["answer"]] == sentence.replace("____", gold)
  # Gold positions are balanced (a model that always answers "A" scores chance).
  for rows, key in ((know, "answer"), (comp, "label")):
    counts = np.bincount([r[key] for r in rows], minlength=4) / len(rows)
    assert np.all(np.abs(counts - 0.25) < 0.03), counts
  # Completion endings come from other documents: a distractor is never the query's own ending.
  assert all(len(set(r["choices"])) == 4 for r in comp)
  # Arithmetic solutions are right: every "a op b = c" step holds, the answer is the last step's result, and all 8
  # templates occur.
  arith = _rows("arithmetic_test.jsonl")
  for r in arith:
    steps = re.findall(r"(\d+(?: [-+*/] \d+)+) = (\d+)", r["answer"])
    assert steps and all(eval(lhs) == int(rhs) for lhs, rhs in steps), r  # noqa: S307 (digits and operators only)
    assert _number(r["answer"]) == int(steps[-1][1])
  marks = ("buys", "costs", "pages a day", "shares", "A shelf holds", "lost", "walks", "twice as many")
  assert all(sum(m in r["question"] for r in arith) > 150 for m in marks)
  # Every scored continuation fits a byte-level model at lm.seq_len = 128.
  for name in ("completion", "knowledge_cloze"):
    assert max(len(x.encode("utf-8")) for _, x in B.requests(B.load(name))) <= B.MAX_CONTINUATION_BYTES == 100


def test_score_numbers_with_known_engines():
  # An engine that prefers the gold continuation scores 1; one that scores -len(continuation) picks the shortest
  # choice for acc and (ll / len(choice) = -(len + len(delimiter)) / len) the longest for acc_norm.
  for name in ("knowledge", "completion", "knowledge_cloze"):
    bench = B.load(name, limit=60)
    golds = {(B.context(bench, r), B.SPECS[name].delimiter + B._choices(name, r)[B._gold(name, r)])
             for r in bench.items}

    class Oracle:
      def loglikelihood(self, reqs):
        return [(0.0 if tuple(q) in golds else -5.0, False) for q in reqs]

    class Length:
      def loglikelihood(self, reqs):
        return [(-float(len(x)), False) for _, x in reqs]

    means, per = B.score(bench, Oracle())
    assert all(v == 1.0 for v in means.values()) and set(per) == set(bench.metrics)
    means, per = B.score(bench, Length())
    choices = [B._choices(name, r) for r in bench.items]
    gold = [B._gold(name, r) for r in bench.items]
    short = [min(range(len(c)), key=lambda i, c=c: (len(c[i]), i)) for c in choices]
    d = len(B.SPECS[name].delimiter)
    norm = [max(range(len(c)), key=lambda i, c=c: (-(len(c[i]) + d) / len(c[i]), -i)) for c in choices]
    np.testing.assert_array_equal(per["acc"], [float(s == g) for s, g in zip(short, gold)])
    if "acc_norm" in per:
      np.testing.assert_array_equal(per["acc_norm"], [float(n == g) for n, g in zip(norm, gold)])
      assert means["acc_norm"] == pytest.approx(np.mean(per["acc_norm"]))
  # Arithmetic: the four answer forms of FakeEngine, each scored as GSM8K's strict / flexible filters score it.
  bench = B.load("arithmetic", limit=60)
  engine = FakeEngine({r["question"]: _number(r["answer"]) for r in bench.items})
  means, per = B.score(bench, engine)
  forms = [int(_h("form", B.context(bench, r)) * 4) for r in bench.items]
  np.testing.assert_array_equal(per["exact_match"], [float(f in (0, 3)) for f in forms])
  np.testing.assert_array_equal(per["exact_match_flexible"], [float(f != 2) for f in forms])
  assert len(set(forms)) == 4
  # The 4-shot prefix: the first four train items, each "Question: q\nAnswer: a" and a blank line.
  ctx = B.context(bench, bench.items[0])
  assert ctx.count("Question: ") == 5 and ctx.startswith("Question: " + _rows("arithmetic_train.jsonl")[0]["question"])
  # Per-item arrays keep item order: a prefix scores as the prefix of the whole.
  _, head = B.score(B.load("completion", limit=7), FakeEngine())
  _, whole = B.score(B.load("completion", limit=60), FakeEngine())
  np.testing.assert_array_equal(head["acc_norm"], whole["acc_norm"][:7])


def _torch_free_finder():
  """A PathFinder that finds neither torch nor transformers: this process then behaves as CI, where they are not
  installed (sys.modules['torch'] = None would not do: `datasets` treats any 'torch' key as an imported torch)."""

  class Finder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
      return None if name.split(".")[0] in ("torch", "transformers") else super().find_spec(name, path, target)

  return Finder


def test_score_equals_lm_eval_on_the_yaml_tasks(monkeypatch):
  torch_before = "torch" in sys.modules
  meta = list(sys.meta_path)
  meta[meta.index(importlib.machinery.PathFinder)] = _torch_free_finder()
  monkeypatch.setattr(sys, "meta_path", meta)
  pytest.importorskip("lm_eval")
  from lm_eval import simple_evaluate
  from lm_eval.api.model import LM
  from lm_eval.tasks import TaskManager

  class FakeLM(LM):
    def __init__(self, engine):
      super().__init__()
      self.engine = engine

    def loglikelihood(self, requests):
      return self.engine.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests):
      raise NotImplementedError

    def generate_until(self, requests):
      return self.engine.generate_until([r.args for r in requests])

  answers = {r["question"]: _number(r["answer"]) for r in _rows("arithmetic_test.jsonl")}
  manager = TaskManager(include_path=B.task_dir(), include_defaults=False)
  limit = 16
  for name in B.BUILTIN:
    task = B.TASK_NAMES[name]
    ref = FakeEngine(answers)
    out = simple_evaluate(model=FakeLM(ref), tasks=[task], task_manager=manager, limit=limit, log_samples=True)
    mine = FakeEngine(answers)
    means, per = B.score(B.load(task, limit=limit), mine)
    assert mine.seen == ref.seen, name  # the same prompts and continuations, in the same order
    results, samples = out["results"][task], out["samples"][task]
    for metric in B.SPECS[name].metrics:
      key = {"exact_match": "exact_match,strict-match",
             "exact_match_flexible": "exact_match,flexible-extract"}.get(metric, f"{metric},none")
      assert means[metric] == pytest.approx(float(results[key]), abs=1e-12), (name, metric)
      filt = key.split(",")[1]
      rows = sorted((s for s in samples if s["filter"] == filt), key=lambda s: s["doc_id"])
      lm_name = metric.split("_flexible")[0]
      np.testing.assert_array_equal(per[metric], [float(s[lm_name]) for s in rows], err_msg=f"{name} {metric}")
    assert 0 < sum(per[B.SPECS[name].primary]) < limit  # the comparison is not between two all-0 / all-1 arrays
  # Another number of worked examples (lm-eval's --num_fewshot): MMLU's description + dev examples, GSM8K's prefix.
  for name in ("knowledge", "arithmetic"):
    ref, mine = FakeEngine(answers), FakeEngine(answers)
    out = simple_evaluate(model=FakeLM(ref), tasks=[B.TASK_NAMES[name]], task_manager=manager, limit=4,
                          num_fewshot=2)
    means, _ = B.score(B.load(name, limit=4, num_fewshot=2), mine)
    assert mine.seen == ref.seen and len(B.load(name, num_fewshot=2).fewshot) == 2
    key = "acc,none" if name == "knowledge" else "exact_match,strict-match"
    assert means[B.SPECS[name].primary] == pytest.approx(float(out["results"][B.TASK_NAMES[name]][key]))
  assert torch_before or "torch" not in sys.modules


def test_load_refuses_bad_input(tmp_path):
  def write(name, rows):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)

  good = {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 1}
  bench = B.load(write("mine.jsonl", [good, good]), limit=1)
  assert (bench.name, bench.kind, bench.style, len(bench.items), bench.primary) == \
         ("mine", "multiple_choice", "knowledge", 1, "acc")
  assert B.load(write("gen.jsonl", [{"question": "q", "answer": "x\n#### 3"}])).kind == "generate_until"
  cases = [
      ("missing.jsonl", None, r"expected one of .*knowledge.* or an existing \.jsonl file"),
      ("notjson.jsonl", ["{oops"], r"notjson\.jsonl:1: not JSON"),
      ("keys.jsonl", [{"text": "x"}], r"keys\.jsonl:1: a row is .*got keys \['text'\]"),
      ("gold.jsonl", [{**good, "answer": 4}], r"gold\.jsonl:1: the gold index must be an int in \[0, 4\)"),
      ("three.jsonl", [{**good, "choices": ["a", "b", "c"]}], r"exactly 4 choices"),
      ("mixed.jsonl", [good, {"query": "q", "choices": ["a", "b"], "label": 0}], r"rows of several styles"),
      ("answer.jsonl", [{"question": "q", "answer": "12"}], r"answer ending '#### N'"),
      ("style.jsonl", [{**good, "style": "mmlu"}], r"style\.jsonl:1: .*style 'mmlu'"),
      ("empty.jsonl", [], r"empty\.jsonl.*no rows"),
  ]
  for name, rows, message in cases:
    path = write(name, rows) if rows is not None else str(tmp_path / name)
    with pytest.raises(ConfigError, match=message):
      B.load(path)
  with pytest.raises(ConfigError, match=r"split='validation', expected one of \['dev', 'test'\]"):
    B.load("knowledge", split="validation")
  with pytest.raises(ConfigError, match=r"limit=0"):
    B.load("completion", limit=0)
  with pytest.raises(ConfigError, match=r"num_fewshot=1, but the set has no few-shot split"):
    B.load("completion", num_fewshot=1)
  with pytest.raises(ConfigError, match=r"num_fewshot=6, but its dev split holds 5 rows"):
    B.load("knowledge", num_fewshot=6)
  assert len(B.load("cl_jax_arithmetic", split="train").items) == 1000


def test_detectable_difference_is_mcnemars_power():
  # The docstring's numbers, then a simulation: at the computed d, McNemar's test rejects in ~80% of paired runs.
  table = {n: [round(100 * B.detectable_difference(n, p), 2) for p in (0.05, 0.10, 0.20)] for n in (2000, 1714, 500)}
  assert table == {2000: [1.40, 1.98, 2.80], 1714: [1.51, 2.14, 3.02], 500: [2.79, 3.95, 5.59]}
  for n, row in table.items():  # the module docstring's table holds these numbers
    assert re.search(rf"\| {n:,}.*\| " + r" +\| ".join(f"{v:.2f}" for v in row), B.__doc__), n
  n, p_d = 2000, 0.10
  d = B.detectable_difference(n, p_d)
  rng = np.random.default_rng(0)
  flips = rng.binomial(n, p_d, size=20000)                    # discordant items
  gains = rng.binomial(flips, (p_d + d) / (2 * p_d))           # of them, correct only after
  z = (2 * gains - flips) / np.sqrt(np.maximum(flips, 1))
  assert abs(np.mean(np.abs(z) > 1.959964) - 0.8) < 0.015
  # A quarter of the items doubles the detectable difference (d ~ 1 / sqrt(n)).
  assert 1.9 < B.detectable_difference(500, p_d) / d < 2.1


def test_task_files_ship_with_the_package():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["cl_jax.eval"]
  for f in os.listdir(B.task_dir()):
    if f != "__pycache__":
      assert any(fnmatch.fnmatch(f"tasks/{f}", p) for p in patterns), f
  # lm-eval finds the tasks by their YAML `task:` names.
  names = {re.search(r"^task: (\S+)$", open(os.path.join(B.task_dir(), f)).read(), re.M).group(1)
           for f in os.listdir(B.task_dir()) if f.endswith(".yaml")}
  assert names == set(B.TASK_NAMES.values())
