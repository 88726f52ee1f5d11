"""Benchmarks in the regression monitor (issue 21 item 4): the absolute-points paired rule on synthetic per-item
correctness (NumPy only), and the specs of `regression.benchmarks`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cl_jax.lm.monitor import RegressionMonitor, paired_interval

N = 2000
KN = "general/bench/knowledge/acc"
DOM = "domain/bench/code_qa/acc"


def _correct(rng, p=0.4):
  return (rng.random(N) < p).astype(np.float64)


def _drop(rng, base, points):
  """The base's per-item correctness with `points` of the items flipped from right to wrong (an exact drop)."""
  a = base.copy()
  right = np.flatnonzero(base == 1)
  a[rng.choice(right, int(round(points / 100 * N)), replace=False)] = 0.0
  return a


def test_absolute_paired_interval_is_the_difference_in_points():
  rng = np.random.default_rng(0)
  b = _correct(rng)
  a = _drop(rng, b, 3.0)
  t = paired_interval(KN, b, a, interval="t", threshold=0.02, absolute=True)
  d = a - b
  se = d.std(ddof=1) / math.sqrt(N)
  # r = mean b - mean a, in the metric's units (0.03 = 3 points), with the t interval of the paired differences.
  assert t["estimate"] == pytest.approx(0.03, abs=1e-12) and t["se"] == pytest.approx(se)
  assert t["lo"] == pytest.approx(0.03 - 1.96115 * se, rel=1e-4) and t["hi"] == pytest.approx(0.03 + 1.96115 * se,
                                                                                               rel=1e-4)
  # 80% power: tau + (z_.975 + z_.8) SE, in points (no division by the base score).
  assert t["detectable"] == pytest.approx(0.02 + 2.80158 * se, rel=1e-4)
  boot = paired_interval(KN, b, a, samples=1000, seed=1, threshold=0.02, absolute=True)
  assert boot["estimate"] == t["estimate"]
  assert boot["lo"] == pytest.approx(t["lo"], abs=0.2 * (t["hi"] - t["lo"]))
  # The relative rule on the same items: 3 points of a 40% base is a 7.5% regression.
  rel = paired_interval(KN, b, a, interval="t")
  assert rel["estimate"] == pytest.approx(0.03 / b.mean(), rel=1e-12)


def _monitor(b, dom_b, **bench):
  baseline = {"general/perplexity": 10.0, "domain/perplexity": 8.0, KN: float(b.mean()), DOM: float(dom_b.mean())}
  settings = {KN: {"threshold": 0.02, "absolute": True, **bench}, DOM: {"threshold": 0.02, "absolute": True}}
  return RegressionMonitor(baseline, 0.02, base_items={KN: b, DOM: dom_b}, benchmarks=settings, samples=1000)


def _check(m, step, a, dom_a, domain_ppl, general_ppl=10.0):
  return m.check(step, {"general/perplexity": general_ppl, "domain/perplexity": domain_ppl, KN: float(a.mean()),
                        DOM: float(dom_a.mean())}, {KN: a, DOM: dom_a})


def test_a_general_benchmark_is_guarded_in_points_and_stops_the_run_by_name():
  rng = np.random.default_rng(1)
  b, dom_b = _correct(rng), _correct(rng, 0.3)
  m = _monitor(b, dom_b)
  assert m.general == [KN, "general/perplexity"] and m.recorded == [DOM]
  assert _check(m, 0, b, dom_b, 8.0).is_best
  # 1.5 points down: inside 2 points (kept), although 3.75% relative would have been called regressed.
  a15 = _drop(rng, b, 1.5)
  v = _check(m, 10, a15, dom_b, 7.0)
  assert m.history[-1]["decisions"][KN] == "within" and v.is_best and not m.should_stop
  relative = _monitor(b, dom_b, absolute=False)
  _check(relative, 0, b, dom_b, 8.0)
  assert _check(relative, 10, a15, dom_b, 7.0).decision == "regressed"
  # The domain benchmark loses 10 points: recorded with its interval, never guarded.
  v = _check(m, 20, b, _drop(rng, dom_b, 10.0), 6.5)
  assert v.regressions[DOM] == pytest.approx(0.10) and v.intervals[DOM]["lo"] > 0.05
  assert DOM not in m.history[-1]["decisions"] and v.decision == "within" and v.is_best and not m.should_stop
  # 4 points down on the general benchmark, perplexity unchanged: the interval clears 2 points, the run stops on it.
  v = _check(m, 30, _drop(rng, b, 4.0), dom_b, 5.0)
  assert v.crossed == [KN] and not v.is_best and m.should_stop
  assert m.stopped["metrics"] == [KN] and m.stopped["benchmarks"] == ["knowledge"]
  assert m.stopped["intervals"][KN][0] > 0.02 and m.best["step"] == 20
  assert "Hard stop at step 30: general/bench/knowledge/acc +4.00 points" in m.describe()
  assert "(stop threshold 2.0 points)" in m.describe() and "knowledge/acc 2 points" in m.rule()


def test_a_benchmark_stop_threshold_above_its_keep_threshold():
  rng = np.random.default_rng(2)
  b, dom_b = _correct(rng), _correct(rng, 0.3)
  m = _monitor(b, dom_b, stop_threshold=0.06)
  _check(m, 0, b, dom_b, 8.0)
  v = _check(m, 10, _drop(rng, b, 4.0), dom_b, 7.0)   # beyond 2 points: not kept, but short of the 6-point stop
  assert v.crossed == [KN] and not v.is_best and not m.should_stop and m.best["step"] == 0
  _check(m, 20, _drop(rng, b, 9.0), dom_b, 6.0)
  assert m.should_stop and m.stopped["step"] == 20


def test_benchmarks_leave_the_other_metrics_alone_and_resume_identically():
  rng = np.random.default_rng(3)
  b, dom_b = _correct(rng), _correct(rng, 0.3)
  plain = RegressionMonitor({"general/perplexity": 10.0, "domain/perplexity": 8.0}, 0.02)
  m = _monitor(b, dom_b)
  runs = [(0, b, 8.0, 10.0), (10, _drop(rng, b, 1.0), 7.0, 10.1), (20, _drop(rng, b, 0.5), 6.0, 10.5)]
  for step, a, dom, gen in runs[:2]:
    assert _check(m, step, a, dom_b, dom, gen).is_best == plain.check(
        step, {"general/perplexity": gen, "domain/perplexity": dom}).is_best
  # The perplexity keeps its relative rule: +5% (no items: the point estimate) stops both monitors.
  saved = json.loads(json.dumps(m.state_dict()))
  resumed = _monitor(b, dom_b)
  resumed.load_state_dict(saved)
  step, a, dom, gen = runs[2]
  v1, v2 = _check(m, step, a, dom_b, dom, gen), _check(resumed, step, a, dom_b, dom, gen)
  assert v1.intervals == v2.intervals and v1.decision == v2.decision == "regressed"
  assert m.stopped == resumed.stopped and m.stopped["metrics"] == ["general/perplexity"]
  assert "benchmarks" not in m.stopped
  plain.check(step, {"general/perplexity": gen, "domain/perplexity": dom})
  assert plain.stopped["metrics"] == ["general/perplexity"] and plain.best == {
      **m.best, "metrics": {k: v for k, v in m.best["metrics"].items() if "/bench/" not in k}}


def test_benchmark_settings_are_checked():
  base = {"general/perplexity": 10.0, "domain/perplexity": 8.0, KN: 0.4}
  with pytest.raises(ValueError, match="not measured"):
    RegressionMonitor(base, benchmarks={"general/bench/other/acc": {"threshold": 0.02}})
  with pytest.raises(ValueError, match="threshold"):
    RegressionMonitor(base, benchmarks={KN: {"threshold": 0.0}})
  # A benchmark metric the settings do not list is a value, not a guarded metric.
  assert RegressionMonitor(base).general == ["general/perplexity"]


def test_regression_benchmarks_are_validated_before_any_work(tmp_path, capsys):
  from cl_jax import lm
  from cl_jax.cli import main
  from cl_jax.kinds import validate
  from cl_jax.lm.benchmarks import load_all, monitor_settings, specs
  items = tmp_path / "items.jsonl"
  items.write_text("".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "label": i % 2}) + "\n"
                           for i in range(3)))
  # The plain list: general, 2 points, the set's primary metric; a builtin by its lm-eval task name too.
  loaded = load_all(["knowledge", {"name": str(items), "role": "domain", "relative": True, "threshold": 5.0}])
  assert [(s["label"], s["role"], s["metric"]) for s, _ in loaded] == [("knowledge", "general", "acc"),
                                                                      ("items", "domain", "acc_norm")]
  assert monitor_settings(loaded) == {
      "general/bench/knowledge/acc": {"threshold": 0.02, "absolute": True, "stop_threshold": None},
      "domain/bench/items/acc_norm": {"threshold": 0.05, "absolute": False, "stop_threshold": None}}
  assert specs({"cl_jax_completion": {"threshold": 1.0}})[0]["label"] == "completion"
  assert specs(None) == [] and specs([]) == []
  c = lm.default_config()
  for value, match in ((["mmlu_pro"], r"^regression.benchmarks\['mmlu_pro'\]: not a builtin benchmark"),
                       ([str(tmp_path / "missing.jsonl")], "no such file"),
                       ([{"name": "knowledge", "role": "both"}], r"role='both': expected one of \('general'"),
                       ([{"name": "knowledge", "threshold": 0}], "threshold=0: expected points in"),
                       ([{"name": "knowledge", "threshold": 2.0, "stop_threshold": 1.0}], "stop_threshold=1.0"),
                       ([{"name": "knowledge", "treshold": 2.0}], r"unknown setting\(s\) \['treshold'\]"),
                       ([{"name": "knowledge", "metric": "f1"}], r"metric='f1': the set measures \['acc'"),
                       (["knowledge", "cl_jax_knowledge"], "a second benchmark named 'knowledge'"),
                       (7, "expected a list"),
                       (["arithmetic"], r"generates up to 256 tokens per answer, so lm.seq_len=128"),
                       (["completion"], r"its longest answer is \d+ tokens, more than lm.seq_len=32 holds")):
    c.regression.benchmarks = None
    c.regression.benchmarks = value
    c.lm.seq_len, c.text.cloze_context = (32, 16) if value == ["completion"] else (128, 48)
    with pytest.raises(ValueError, match=match):
      validate(c)
  # From the command line: one line naming the key, exit 2, nothing written.
  workdir = tmp_path / "w"
  rc = main(["--config", "configs/cpt_lm.py", "--config.regression.benchmarks=['knowledge', 'no_such_set']",
             "--workdir", str(workdir), "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: regression.benchmarks['no_such_set']: not a builtin benchmark")
  assert "\n" not in err and not workdir.exists()
