"""Regression monitor for continual pre-training: a paired confidence interval on general regression, a hard stop.

Before adaptation the base model is measured on a fixed general evaluation set (perplexity, next-token accuracy,
cloze accuracy on held-out prose) and on the new domain, keeping every item's value: per-sequence mean token NLL
a_i, per-sequence next-token accuracy, per-item cloze correctness (0/1). Every `eval_every` steps the same items
are measured again, so each general metric m has paired values (b_i: base, a_i: now, i = 1..n) and a relative
regression (> 0 always means "worse than before adaptation"):

    perplexity (items: per-sequence NLL, every sequence has the same number of targets)
        r = exp(mean_i a_i - mean_i b_i) - 1                   (the relative perplexity increase, exactly)
    accuracies (higher is better)      r = (mean_i b_i - mean_i a_i) / mean_i b_i
    other lower-is-better metrics      r = (mean_i a_i - mean_i b_i) / mean_i b_i

and a two-sided `confidence` interval [lo, hi] for r from the paired differences d_i = a_i - b_i:

    interval='bootstrap'  (default) paired percentile bootstrap: B resamples of the item indices, the same indices
                          for a and b, r recomputed on each; lo, hi = the alpha/2, 1 - alpha/2 quantiles
                          (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for paired bootstrap between two systems).
                          The generator is seeded by the evaluation step, so a resumed run decides identically.
    interval='t'          Student t on the mean difference: mean(d) +- t_{1-alpha/2, n-1} sd(d) / sqrt(n), mapped
                          through the formulas above (the base mean in a denominator is held fixed).

The decision for each general metric, with threshold tau (2% by default, the seed's evaluation framework):

    regressed     lo > tau     the regression is larger than tau with (1 + confidence) / 2 one-sided confidence
    within        r <= tau     the point estimate is inside the threshold
    inconclusive  otherwise    above tau, but not distinguishable from it at this evaluation set's size

An evaluation is `regressed` when any metric is, `within` when every metric is, else `inconclusive`. Two
thresholds, because continual pre-training's general loss typically rises for the first hundred steps of a
re-warmed learning rate and then recovers (the "stability gap", De Lange et al. 2023; measured here: a 70/30 run's
general perplexity at +2.5% [+2.3, +2.8] at step 50, back to +1.1% [+0.8, +1.4] at step 150):

    threshold       tau        (2%) what may be kept: a regressed evaluation is never the kept checkpoint;
    stop_threshold  tau_stop   (5% in the LM config) the hard stop: the run ends when some metric's lower bound
                               exceeds tau_stop (`patience` consecutive evaluations when patience > 1). Domain-only
                               training at a high learning rate crosses it at its first evaluations; a run that only
                               dips past tau goes on and is kept once it is back inside.

The stop uses max(tau, tau_stop); tau_stop <= tau stops at the first significant crossing. Which evaluations may be kept (`keep`):

    keep='not_regressed'  (default) every evaluation not called regressed: no general metric is shown to be worse
                          than tau. A 400-item cloze accuracy moves by several percent on noise alone, so holding
                          every point estimate to tau would throw away adapted models that did not regress.
    keep='within'         only evaluations whose every point estimate is within tau (stricter; noisy metrics make
                          it fall back to the base often).

The kept checkpoint is the best keepable evaluation by `select` (lowest validation domain perplexity by default);
the base (step 0) is always keepable, so it is kept when nothing later is. A noise-size wobble therefore never
stops a run, and a real regression stops it at the first evaluation whose interval clears the threshold.

What a set of n items can detect: with SE = sd(d) / sqrt(n), a true regression r* is called with probability 80%
when log(1 + r*) - log(1 + tau) = (z_{1 - alpha/2} + z_0.8) SE (perplexity; for accuracies
r* - tau = (z_{1 - alpha/2} + z_0.8) SE / mean b).
`Decision.detectable` records that r* at every evaluation, and the LM summary reports it with the set's size.

Benchmarks (`regression.benchmarks`, cl_jax.lm.benchmarks; the practice's "a 2% drop on any general benchmark is a
hard stop"). A benchmark metric m is named '<group>/bench/<benchmark>/<metric>' and its items are per-item scores
(0/1 correctness for acc, acc_norm and exact match), the same items at every evaluation. Its regression is in
absolute points by default, not relative to the base:

    absolute (default)  r = sign (mean_i b_i - mean_i a_i)     (sign = +1 higher-is-better; 0.02 = 2 points)
    relative            r as for the accuracies above

with the same paired interval on the differences d_i = a_i - b_i (for 0/1 items the paired bootstrap resamples the
items' (b_i, a_i) pairs: McNemar's setting, where only the items that changed move the estimate), detectable size
tau + (z_{1-alpha/2} + z_0.8) SE in points. Each benchmark has its own tau (its `threshold`) and tau_stop (its
`stop_threshold`, tau unless given: the practice's hard stop at the threshold itself), used in the three calls
above in place of the run's; a general benchmark called regressed is never the kept checkpoint and one whose lower
bound exceeds its tau_stop stops the run (the stop record lists it under `metrics` and its name under
`benchmarks`). A domain benchmark gets the same estimate and interval at every evaluation, recorded and never
guarded. Metrics other than benchmarks keep the relative rule and the run's thresholds; a monitor without
benchmarks records and decides exactly as before.

Metrics measured without per-item values (a caller handing only floats) get a degenerate interval [r, r], so the
rule reduces to "r > tau stops".

The monitor is plain Python/NumPy between jitted steps; its history is JSON (saved in every checkpoint's meta).
"""
from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Mapping

import numpy as np

# The metric direction and relative change live with the figures in cl_jax.report (infrastructure, so that
# `Results.plot` draws an LM run's monitor without importing this kind's modules); re-exported here.
from cl_jax.report import (LOWER_IS_BETTER, higher_is_better, monitor_figure, plot_monitor,  # noqa: F401
                           relative_regression)

INTERVALS = ("bootstrap", "t")
KEEP_RULES = ("not_regressed", "within")
POWER = 0.8  # the power at which `detectable` is quoted
BENCH = "/bench/"  # benchmark metrics are named '<group>/bench/<benchmark>/<metric>' (cl_jax.lm.benchmarks)


def _from_means(name: str, mean_value, mean_base, absolute: bool = False):
  """r of the module docstring from item means (NumPy-broadcasting, for the bootstrap); `absolute`: the change in
  the metric's own units (a benchmark's points / 100), not relative to the base."""
  sign = 1.0 if higher_is_better(name) else -1.0
  if absolute:
    return sign * (mean_base - mean_value)
  if name.endswith("perplexity"):  # items are per-sequence NLLs
    return np.expm1(mean_value - mean_base)
  with np.errstate(divide="ignore", invalid="ignore"):  # a zero base: 0/0 is no change, x/0 is +-inf
    return np.nan_to_num(sign * (mean_base - mean_value) / np.abs(mean_base), nan=0.0, posinf=np.inf,
                         neginf=-np.inf)


def paired_interval(name: str, base_items, items, *, confidence: float = 0.95, interval: str = "bootstrap",
                    samples: int = 2000, seed=0, threshold: float = 0.0, absolute: bool = False) -> dict:
  """The regression of metric `name` from paired items, its interval and its 80%-power detectable size: relative
  to the base, or with `absolute` the difference of means in the metric's units (a benchmark's rule).

  Returns {'estimate', 'lo', 'hi', 'se' (of the mean difference), 'n', 'detectable'} (module docstring).
  """
  b, a = np.asarray(base_items, np.float64), np.asarray(items, np.float64)
  if b.shape != a.shape or b.ndim != 1 or len(b) < 2:
    raise ValueError(f"paired_interval({name}): need two equal-length 1-D item vectors of >= 2 items, got "
                     f"{b.shape} and {a.shape}")
  n = len(a)
  alpha = 1.0 - confidence
  estimate = float(_from_means(name, a.mean(), b.mean(), absolute))
  d = a - b
  se = float(d.std(ddof=1) / math.sqrt(n))
  if interval == "bootstrap":
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    boot = _from_means(name, a[idx].mean(1), b[idx].mean(1), absolute)
    # No interpolation between order statistics: a zero base makes some resamples infinite (inf - inf = nan).
    lo, hi = (float(q) for q in np.quantile(boot, [alpha / 2, 1 - alpha / 2], method="inverted_cdf"))
  elif interval == "t":
    from scipy.stats import t
    half = float(t.ppf(1 - alpha / 2, n - 1)) * se
    ends = [float(_from_means(name, b.mean() + d.mean() + s * half, b.mean(), absolute)) for s in (-1.0, 1.0)]
    lo, hi = min(ends), max(ends)
  else:
    raise ValueError(f"regression.interval={interval!r}: expected one of {INTERVALS}")
  shift = (NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(POWER)) * se
  if absolute:
    detectable = threshold + shift
  elif name.endswith("perplexity"):
    detectable = math.expm1(math.log1p(threshold) + shift)
  else:
    detectable = threshold + shift / max(abs(float(b.mean())), 1e-12)
  return {"estimate": estimate, "lo": lo, "hi": hi, "se": se, "n": n, "detectable": detectable}


@dataclasses.dataclass
class Verdict:
  step: int
  regressions: dict    # general metric -> point estimate of the relative regression r_m
  crossed: list        # general metrics called `regressed` (lower bound beyond the threshold)
  within: bool         # keepable: not regressed (keep='not_regressed') or every estimate inside tau ('within')
  is_best: bool        # the best keepable evaluation so far
  decision: str = ""   # 'within' | 'inconclusive' | 'regressed'
  intervals: dict = dataclasses.field(default_factory=dict)  # metric -> paired_interval(...) record


class RegressionMonitor:
  """Tracks general-metric regression against a baseline with paired intervals; see the module docstring.

  Args:
    baseline: `{metric name: value}` of the base model; metric names are '<group>/<metric>', and the
      general ones are those starting with `general_prefix`.
    threshold: the relative regression tau allowed on any general metric (0.02 = 2%).
    select: the metric that picks the best in-threshold checkpoint (default: 'domain/perplexity').
    base_items: `{metric: per-item values}` of the base (what the evaluator fills in `per_item`); a general
      metric listed here is decided on its paired interval, one missing on its point estimate.
    confidence: the two-sided interval's coverage (0.95: a one-sided 97.5% lower bound decides the stop).
    interval: 'bootstrap' | 't'.   samples: bootstrap resamples.   seed: the bootstrap generator's seed.
    keep: 'not_regressed' | 'within': which evaluations may become the kept checkpoint.
    stop_threshold: tau_stop, the lower bound that stops the run; max(threshold, stop_threshold) is used (None: the
      same as `threshold`).
    hard_stop: whether the stop ends training (the caller acts on `should_stop`); only `describe` depends on it.
    patience: how many consecutive `regressed` evaluations stop the run (1: the first). Continual pre-training
      often dips at its first evaluations and recovers (the "stability gap", De Lange et al. 2023).
    benchmarks: `{metric name: {'threshold', 'stop_threshold' (None: the same), 'absolute'}}` for benchmark
      metrics (names '<group>/bench/<benchmark>/<metric>'; thresholds as fractions of the metric's units, 0.02 = 2
      points for an accuracy when absolute). A general one is guarded by its own thresholds (and decided in
      absolute points when `absolute`); any other group's is recorded (its interval in every evaluation), never
      guarded. Benchmark-named metrics not listed here are values only.
  """

  def __init__(self, baseline: Mapping[str, float], threshold: float = 0.02, *,
               select: str = "domain/perplexity", general_prefix: str = "general/",
               base_items: Mapping[str, object] | None = None, confidence: float = 0.95,
               interval: str = "bootstrap", samples: int = 2000, seed: int = 0, hard_stop: bool = True,
               patience: int = 1, keep: str = "not_regressed", stop_threshold: float | None = None,
               benchmarks: Mapping[str, Mapping] | None = None):
    if not isinstance(patience, int) or patience < 1:
      raise ValueError(f"regression.patience={patience!r}: must be a positive integer")
    if not threshold > 0:
      raise ValueError(f"regression.threshold={threshold}: must be a positive fraction (0.02 = 2%)")
    if not 0 < confidence < 1:
      raise ValueError(f"regression.confidence={confidence}: must be in (0, 1), e.g. 0.95")
    if interval not in INTERVALS:
      raise ValueError(f"regression.interval={interval!r}: expected one of {INTERVALS}")
    if keep not in KEEP_RULES:
      raise ValueError(f"regression.keep={keep!r}: expected one of {KEEP_RULES}")
    if not isinstance(samples, int) or samples < 100:
      raise ValueError(f"regression.bootstrap_samples={samples!r}: must be an integer >= 100")
    self.baseline = {k: float(v) for k, v in baseline.items()}
    self.bench = {m: {"threshold": float(b["threshold"]), "absolute": bool(b.get("absolute", True)),
                      "stop_threshold": max(float(b["threshold"]), float(b.get("stop_threshold") or 0.0))}
                  for m, b in (benchmarks or {}).items()}
    for m, b in self.bench.items():
      if m not in self.baseline:
        raise ValueError(f"RegressionMonitor: benchmark metric {m!r} was not measured: {sorted(self.baseline)}")
      if not b["threshold"] > 0:
        raise ValueError(f"RegressionMonitor: benchmark metric {m!r}: threshold {b['threshold']} must be > 0")
    self.general = sorted(k for k in self.baseline if k.startswith(general_prefix)
                          and (BENCH not in k or k in self.bench))
    # Other groups' benchmarks (the domain's): an interval every evaluation, no decision.
    self.recorded = sorted(k for k in self.bench if k not in self.general)
    if not self.general:
      raise ValueError(f"RegressionMonitor: the baseline has no general metric (names starting with "
                       f"{general_prefix!r}): {sorted(self.baseline)}")
    if select not in self.baseline:
      raise ValueError(f"regression.select={select!r}: not a measured metric; metrics: {sorted(self.baseline)}")
    self.base_items = {k: [float(x) for x in np.asarray(v).ravel()] for k, v in (base_items or {}).items()
                       if k in self.general or k in self.recorded}
    self.threshold = float(threshold)
    # The stop is never below the keep threshold: max(tau, tau_stop).
    self.stop_threshold = max(self.threshold, float(stop_threshold or 0.0))
    self.hard_stop = bool(hard_stop)  # False: record-only (the call is reported, training goes on)
    self.select = select
    self.confidence, self.interval, self.samples, self.seed = float(confidence), interval, samples, int(seed)
    self.patience, self.keep = patience, keep
    self.history: list[dict] = []
    self.best: dict | None = None     # {'step', 'score', 'metrics'} of the best in-threshold evaluation
    self.stopped: dict | None = None  # {'step', 'metrics': [regressed...], 'regressions', 'intervals'} at the stop

  def threshold_of(self, name: str) -> float:
    """tau of metric `name`: its benchmark's own, else `threshold`."""
    return self.bench[name]["threshold"] if name in self.bench else self.threshold

  def stop_threshold_of(self, name: str) -> float:
    """tau_stop of metric `name`: its benchmark's own (the benchmark's threshold unless given), else the run's."""
    return self.bench[name]["stop_threshold"] if name in self.bench else self.stop_threshold

  def is_absolute(self, name: str) -> bool:
    return name in self.bench and self.bench[name]["absolute"]

  def interval_of(self, name: str, step: int, value: float, items=None) -> dict:
    """`paired_interval` of one general (or recorded) metric at `step` (degenerate [r, r] without items)."""
    absolute = self.is_absolute(name)
    if items is not None and name in self.base_items:
      return paired_interval(name, self.base_items[name], items, confidence=self.confidence,
                             interval=self.interval, samples=self.samples, seed=[self.seed, int(step)],
                             threshold=self.threshold_of(name), absolute=absolute)
    if absolute:
      r = (self.baseline[name] - float(value)) * (1.0 if higher_is_better(name) else -1.0)
    else:
      r = relative_regression(self.baseline[name], float(value), higher_is_better(name))
    return {"estimate": r, "lo": r, "hi": r, "se": None, "n": None, "detectable": None}

  def check(self, step: int, metrics: Mapping[str, float], items: Mapping[str, object] | None = None) -> Verdict:
    """Records one evaluation (`items`: per-item values, as for `base_items`) and returns its verdict."""
    missing = [m for m in self.general + self.recorded + [self.select] if m not in metrics]
    if missing:
      raise KeyError(f"RegressionMonitor.check: metrics {missing} were not measured at step {step}")
    items = items or {}
    intervals = {m: self.interval_of(m, step, metrics[m], items.get(m)) for m in self.general + self.recorded}
    regressions = {m: iv["estimate"] for m, iv in intervals.items()}
    decisions = {}
    for m in self.general:
      iv, tau = intervals[m], self.threshold_of(m)
      if iv["lo"] > tau or math.isnan(iv["estimate"]) or iv["estimate"] == math.inf:
        decisions[m] = "regressed"
      elif iv["estimate"] <= tau:
        decisions[m] = "within"
      else:
        decisions[m] = "inconclusive"
    crossed = [m for m in self.general if decisions[m] == "regressed"]
    harmful = [m for m in crossed if intervals[m]["lo"] > self.stop_threshold_of(m)
               or intervals[m]["estimate"] == math.inf or math.isnan(intervals[m]["estimate"])]
    decision = ("regressed" if crossed else "within" if all(v == "within" for v in decisions.values())
                else "inconclusive")
    within = decision == "within" if self.keep == "within" else not crossed
    score = float(metrics[self.select])
    better = (self.best is None or
              (score > self.best["score"] if higher_is_better(self.select) else score < self.best["score"]))
    # After the stop nothing is kept: a record-only run (hard_stop=False) keeps what a stopped run would have kept.
    is_best = within and better and self.stopped is None
    if is_best:
      self.best = {"step": int(step), "score": score, "metrics": {k: float(v) for k, v in metrics.items()}}
    streak = 0
    for h in reversed(self.history):
      if not h.get("stop_metrics", h["crossed"]):
        break
      streak += 1
    if harmful and self.stopped is None and streak + 1 >= self.patience:
      self.stopped = {"step": int(step), "metrics": harmful, "regressions": {m: regressions[m] for m in harmful},
                      "intervals": {m: [intervals[m]["lo"], intervals[m]["hi"]] for m in harmful}}
      stopped_by = [m.split(BENCH, 1)[1].rsplit("/", 1)[0] for m in harmful if BENCH in m]
      if stopped_by:  # the benchmarks that stopped the run, by name (only where one did: older records unchanged)
        self.stopped["benchmarks"] = stopped_by
    self.history.append({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()},
                         "regressions": regressions, "intervals": intervals, "decisions": decisions,
                         "decision": decision, "crossed": crossed, "stop_metrics": harmful, "kept": is_best})
    return Verdict(int(step), regressions, crossed, within, is_best, decision, intervals)

  @property
  def should_stop(self) -> bool:
    return self.stopped is not None

  def state_dict(self) -> dict:
    return {"baseline": self.baseline, "base_items": self.base_items, "history": self.history, "best": self.best,
            "stopped": self.stopped}

  def load_state_dict(self, d: Mapping) -> None:
    if dict(d["baseline"]) != self.baseline:
      raise ValueError("RegressionMonitor.load_state_dict: the saved baseline differs from this monitor's")
    self.base_items = {k: list(v) for k, v in d.get("base_items", {}).items()}
    self.history, self.best, self.stopped = list(d["history"]), d["best"], d["stopped"]

  def rule(self) -> str:
    """The decision rule in one sentence (for reports)."""
    how = (f"paired bootstrap, {self.samples} resamples" if self.interval == "bootstrap" else
           "t interval on the paired differences")
    stop = (f"the run stops when it exceeds {100 * self.stop_threshold:g}%"
            if self.stop_threshold > self.threshold else "the run stops on the first such call")
    return (f"a general metric is called regressed when the lower end of its {100 * self.confidence:g}% interval "
            f"({how}) on the relative regression exceeds {100 * self.threshold:g}%, and {stop}; "
            + ("the kept checkpoint is the best one with no metric called regressed" if self.keep == "not_regressed"
               else f"the kept checkpoint is the best one whose every estimate is within {100 * self.threshold:g}%")
            + self._bench_rule())

  def _bench_rule(self) -> str:
    if not self.bench:
      return ""
    guarded = [f"{m} {self.fmt(m, self.threshold_of(m), sign=False)}"
               + (f" (stop {self.fmt(m, self.stop_threshold_of(m), sign=False)})"
                  if self.stop_threshold_of(m) > self.threshold_of(m) else "") for m in self.general if m in self.bench]
    text = ""
    if guarded:
      text += ("; each general benchmark is held to its own threshold, on the same paired interval of its per-item "
               "scores, beyond which it is never kept and the run stops: " + ", ".join(guarded))
    if self.recorded:
      text += "; recorded, not guarded: " + ", ".join(self.recorded)
    return text

  def fmt(self, name: str, r: float, sign: bool = True) -> str:
    """A regression of metric `name` for reports: points for an absolute (benchmark) metric, else percent."""
    number = f"{100 * r:+.2f}" if sign else f"{100 * r:g}"
    return number + (" points" if self.is_absolute(name) else "%")

  def describe(self) -> str:
    """One sentence for the report: whether and why training stopped, and which checkpoint is kept."""
    best = (f"kept checkpoint: step {self.best['step']} ({self.select} "
            f"{self.best['score']:.4g})" if self.best else "no evaluation could be kept")
    if self.stopped is None:
      called = [h["step"] for h in self.history if h["crossed"]]
      n_inc = sum(h.get("decision") == "inconclusive" for h in self.history)
      extra = f" ({n_inc} evaluation(s) above it but not significantly)" if n_inc else ""
      # With benchmarks the thresholds are per metric: the sentence names them (and keeps its old form without).
      own = " (benchmarks: their own thresholds, in the rule)" if self.bench else ""
      if called:
        return (f"Regressed beyond {100 * self.threshold:.1f}%{own} at step(s) {', '.join(map(str, called))} (not "
                f"kept), never beyond the {100 * self.stop_threshold:.1f}% stop{extra}; {best}.")
      return f"No general metric regressed significantly beyond {100 * self.threshold:.1f}%{own}{extra}; {best}."
    iv = self.stopped.get("intervals", {})
    parts = ", ".join(f"{m} {self.fmt(m, r)}" + (f" [{100 * iv[m][0]:+.2f}, {100 * iv[m][1]:+.2f}]" if m in iv else "")
                      for m, r in self.stopped["regressions"].items())
    what = "Hard stop" if self.hard_stop else "Regression called (record-only, training continued)"
    stops = sorted({f"{100 * self.stop_threshold_of(m):.1f}" + (" points" if self.is_absolute(m) else "%")
                    for m in self.stopped["regressions"]})
    return f"{what} at step {self.stopped['step']}: {parts} (stop threshold {', '.join(stops)}); {best}."


__all__ = ["RegressionMonitor", "Verdict", "paired_interval", "relative_regression", "higher_is_better",
           "monitor_figure", "plot_monitor", "INTERVALS", "KEEP_RULES"]
