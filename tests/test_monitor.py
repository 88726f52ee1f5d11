"""The paired regression monitor (cl_jax.lm.monitor) on synthetic per-item values: formulas, noise, real regressions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cl_jax.lm.monitor import RegressionMonitor, paired_interval

N = 200


def _items(rng, shift=0.0, sd=0.15, base=None):
  """Per-sequence NLLs of the base (if `base` is None) or of an adapted model: base + shift + noise."""
  if base is None:
    return rng.normal(1.6, 0.3, N)
  return base + shift + rng.normal(0.0, sd, N)


def test_paired_interval_formulas_and_the_two_methods_agree():
  rng = np.random.default_rng(0)
  b = _items(rng)
  a = _items(rng, shift=0.03, sd=0.1, base=b)
  boot = paired_interval("general/perplexity", b, a, samples=4000, seed=1, threshold=0.02)
  t = paired_interval("general/perplexity", b, a, interval="t", threshold=0.02)
  d = a - b
  # Perplexity: r = exp(mean a - mean b) - 1, the relative change of exp(mean NLL).
  assert boot["estimate"] == pytest.approx(math.expm1(d.mean()), rel=1e-12)
  assert boot["estimate"] == pytest.approx(np.exp(a.mean()) / np.exp(b.mean()) - 1, rel=1e-9)
  se = d.std(ddof=1) / math.sqrt(N)
  assert t["se"] == pytest.approx(se) and t["lo"] == pytest.approx(math.expm1(d.mean() - 1.97196 * se), rel=1e-4)
  # The bootstrap's percentile interval is the t interval up to resampling noise (n = 200, symmetric noise).
  assert boot["lo"] == pytest.approx(t["lo"], abs=0.15 * (t["hi"] - t["lo"]))
  assert boot["hi"] == pytest.approx(t["hi"], abs=0.15 * (t["hi"] - t["lo"]))
  # 80% power size: log(1 + r*) = log(1.02) + (1.95996 + 0.84162) SE.
  assert t["detectable"] == pytest.approx(math.expm1(math.log(1.02) + 2.80158 * se), rel=1e-4)
  # Accuracies: r = (mean b - mean a) / mean b, higher is better.
  hb = rng.uniform(0.4, 0.6, N)
  ha = hb - 0.05 + rng.normal(0, 0.01, N)
  acc = paired_interval("general/accuracy", hb, ha, interval="t")
  assert acc["estimate"] == pytest.approx((hb.mean() - ha.mean()) / hb.mean())
  assert acc["lo"] < acc["estimate"] < acc["hi"] and acc["lo"] > 0.05
  # Cloze correctness with a base that got nothing right: no division by zero, no NaN.
  zero = paired_interval("general/cloze_accuracy", np.zeros(20), np.r_[np.ones(2), np.zeros(18)], samples=200)
  assert not any(np.isnan(zero[k]) for k in ("lo", "hi")) and zero["estimate"] == -np.inf and zero["hi"] == 0


def _monitor(rng, **kw):
  b = _items(rng)
  baseline = {"general/perplexity": float(np.exp(b.mean())), "domain/perplexity": 8.0}
  return RegressionMonitor(baseline, 0.02, base_items={"general/perplexity": b}, **kw), b


def _check(m, step, b, a, domain_ppl):
  return m.check(step, {"general/perplexity": float(np.exp(a.mean())), "domain/perplexity": domain_ppl},
                 {"general/perplexity": a})


def test_noise_never_stops_and_a_real_regression_does():
  rng = np.random.default_rng(3)
  m, b = _monitor(rng)
  assert _check(m, 0, b, b.copy(), 8.0).is_best  # the baseline evaluation: no change, kept
  # 30 evaluations with no true change; sd 0.2 over 200 sequences is an SE of ~1.4% on perplexity.
  estimates = []
  for k in range(1, 31):
    v = _check(m, 10 * k, b, _items(rng, 0.0, sd=0.2, base=b), 8.0 - 0.1 * k)
    estimates.append(v.regressions["general/perplexity"])
    assert v.decision in ("within", "inconclusive") and not v.crossed
  # The point estimate crossed 2% on noise (the rule "estimate > 2% stops" would have stopped this run)...
  assert max(estimates) > 0.02
  assert not m.should_stop
  # ...and every evaluation stays keepable: the kept one is the best by domain perplexity (the last).
  assert m.best["step"] == 300
  assert {h["decision"] for h in m.history} >= {"within", "inconclusive"}
  # A true +8% perplexity (0.077 nats): the interval clears 2% and the run stops, keeping step 300.
  v = _check(m, 310, b, _items(rng, math.log(1.08), base=b), 1.0)
  assert v.decision == "regressed" and v.crossed == ["general/perplexity"] and not v.is_best
  lo, hi = m.stopped["intervals"]["general/perplexity"]
  assert 0.02 < lo < 0.08 < hi
  assert m.should_stop and m.stopped["step"] == 310 and m.best["step"] == 300
  assert "Hard stop at step 310: general/perplexity +" in m.describe()


def test_keep_rules_and_inconclusive():
  rng = np.random.default_rng(5)
  for keep, kept in (("not_regressed", 20), ("within", 0)):
    m, b = _monitor(rng, keep=keep)
    _check(m, 0, b, b.copy(), 8.0)
    # Exactly +3%, but on 200 sequences with sd 0.6 (SE ~4%): above the threshold, not shown to be above it.
    noise = rng.normal(0.0, 0.6, N)
    v = _check(m, 20, b, b + math.log(1.03) + noise - noise.mean(), 7.0)
    assert v.regressions["general/perplexity"] == pytest.approx(0.03)
    assert v.decision == "inconclusive" and not m.should_stop
    assert m.best["step"] == kept, keep


def test_state_round_trip_decides_identically():
  rng = np.random.default_rng(7)
  m, b = _monitor(rng)
  _check(m, 0, b, b.copy(), 8.0)
  a = _items(rng, 0.02, base=b)
  _check(m, 10, b, a, 7.0)
  saved = json.loads(json.dumps(m.state_dict()))
  m2, _ = _monitor(np.random.default_rng(7))
  m2.load_state_dict(saved)
  a2 = _items(rng, 0.03, base=b)
  v1, v2 = _check(m, 20, b, a2, 6.0), _check(m2, 20, b, a2, 6.0)
  assert v1.intervals == v2.intervals and v1.decision == v2.decision and m.best == m2.best


def test_scalar_metrics_fall_back_to_the_point_estimate():
  base = {"general/perplexity": 10.0, "general/accuracy": 0.5, "domain/perplexity": 20.0}
  m = RegressionMonitor(base, 0.02)
  assert m.check(0, base).is_best
  v = m.check(5, {**base, "general/accuracy": 0.485})  # -3% without per-item values: stops
  assert v.crossed == ["general/accuracy"] and v.intervals["general/accuracy"]["lo"] == pytest.approx(0.03)
  with pytest.raises(ValueError, match="regression.confidence"):
    RegressionMonitor(base, confidence=1.5)
  with pytest.raises(ValueError, match="regression.bootstrap_samples"):
    RegressionMonitor(base, samples=10)


def test_a_dip_past_the_threshold_that_recovers_is_not_kept_but_does_not_stop():
  """The stability gap: +2.5% (significant) right after the re-warm, back to +1% later; the stop is at 5%."""
  rng = np.random.default_rng(11)
  m, b = _monitor(rng, stop_threshold=0.05)
  _check(m, 0, b, b.copy(), 8.0)

  def exact(r, sd=0.03):  # SE ~0.2%, as on the real 1,188-sequence validation set
    noise = rng.normal(0.0, sd, N)
    return b + math.log1p(r) + noise - noise.mean()

  for step, r, dom in ((50, 0.025, 6.0), (100, 0.03, 5.5)):
    v = _check(m, step, b, exact(r), dom)
    assert v.decision == "regressed" and not v.is_best and not m.should_stop
  v = _check(m, 150, b, exact(0.01), 5.8)
  assert v.decision == "within" and v.is_best and m.best["step"] == 150
  assert "Regressed beyond 2.0% at step(s) 50, 100 (not kept)" in m.describe()
  # A real regression, +9%: its lower bound clears 5% and the run stops; step 150 stays the kept one.
  v = _check(m, 200, b, exact(0.09), 4.0)
  assert m.should_stop and m.stopped["step"] == 200 and m.best["step"] == 150
  assert m.stopped["intervals"]["general/perplexity"][0] > 0.05
  # The stop is never below the keep threshold.
  assert RegressionMonitor({"general/perplexity": 5.0, "domain/perplexity": 8.0}, 0.1,
                           stop_threshold=0.05).stop_threshold == 0.1
