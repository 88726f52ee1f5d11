"""Regression monitor for continual pre-training: a baseline, periodic re-measurement, a hard stop.

Before adaptation the base model is measured on general held-out data (perplexity, next-token accuracy,
cloze accuracy on held-out prose) and on the new domain. Every `eval_every` steps the same metrics are
re-measured and each *general* metric's relative regression against the baseline is

    r_m = (value_m - base_m) / base_m      for metrics where lower is better (perplexity),
    r_m = (base_m - value_m) / base_m      for metrics where higher is better (accuracies),

so r_m > 0 always means "worse than before adaptation". When any r_m exceeds `threshold` (2% by default,
the seed's evaluation framework) training stops (a hard stop). Among the evaluations whose general metrics
all stayed inside the threshold, the best one by the domain objective (lowest domain perplexity by
default) is the checkpoint to keep.

Optional noise guard (`min_z > 0`): an accuracy measured on n items moves by 1/n per flipped item, so a
small evaluation set can cross 2% by noise alone. With `min_z`, a crossing counts only when the paired
drop is also `min_z` standard errors large, SE = sqrt(p_b (1 - p_b) / n) (a one-sided binomial test
against the baseline rate); perplexities are averaged over thousands of tokens and are not guarded.

The monitor is plain Python over floats (it runs between jitted steps) and its history is JSON.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

LOWER_IS_BETTER = ("perplexity", "loss", "bits_per_byte")


def higher_is_better(name: str) -> bool:
  return not any(name.endswith(k) for k in LOWER_IS_BETTER)


def relative_regression(base: float, value: float, higher_better: bool) -> float:
  """How much worse `value` is than `base`, relative to `base` (> 0: worse; < 0: better)."""
  if base == 0:
    return 0.0 if value == base else math.inf
  return (base - value) / abs(base) if higher_better else (value - base) / abs(base)


@dataclasses.dataclass
class Verdict:
  step: int
  regressions: dict    # general metric -> relative regression r_m
  crossed: list        # general metrics whose regression exceeded the threshold (and the noise guard)
  within: bool         # no general metric crossed
  is_best: bool        # the best in-threshold evaluation so far


class RegressionMonitor:
  """Tracks general-metric regression against a baseline; see the module docstring.

  Args:
    baseline: `{metric name: value}` of the base model; metric names are '<group>/<metric>', and the
      general ones are those starting with `general_prefix`.
    threshold: the relative regression allowed on any general metric (0.02 = 2%).
    select: the metric that picks the best in-threshold checkpoint (default: 'domain/perplexity').
    counts: `{metric: n}` evaluation-set sizes of accuracy metrics, for the `min_z` noise guard.
    hard_stop: whether the crossing ends training (the caller acts on `should_stop`); only the wording of
      `describe` depends on it.
    patience: how many consecutive evaluations must cross before the stop (1, the default: the first
      crossing stops). Continual pre-training often dips at its first evaluations and recovers (the
      "stability gap", De Lange et al. 2023); patience > 1 lets a run ride out a dip that recovers.
  """

  def __init__(self, baseline: Mapping[str, float], threshold: float = 0.02, *,
               select: str = "domain/perplexity", general_prefix: str = "general/",
               min_z: float = 0.0, counts: Mapping[str, int] | None = None, hard_stop: bool = True,
               patience: int = 1):
    if not isinstance(patience, int) or patience < 1:
      raise ValueError(f"regression.patience={patience!r}: must be a positive integer")
    if not threshold > 0:
      raise ValueError(f"regression.threshold={threshold}: must be a positive fraction (0.02 = 2%)")
    if min_z < 0:
      raise ValueError(f"regression.min_z={min_z}: must be >= 0 (0 disables the noise guard)")
    self.baseline = {k: float(v) for k, v in baseline.items()}
    self.general = sorted(k for k in self.baseline if k.startswith(general_prefix))
    if not self.general:
      raise ValueError(f"RegressionMonitor: the baseline has no general metric (names starting with "
                       f"{general_prefix!r}): {sorted(self.baseline)}")
    if select not in self.baseline:
      raise ValueError(f"regression.select={select!r}: not a measured metric; metrics: {sorted(self.baseline)}")
    self.threshold = float(threshold)
    self.hard_stop = bool(hard_stop)  # False: record-only (the crossing is reported, training goes on)
    self.select = select
    self.min_z = float(min_z)
    self.counts = dict(counts or {})
    self.patience = patience
    self.history: list[dict] = []
    self.best: dict | None = None     # {'step', 'metrics'} of the best in-threshold evaluation
    self.stopped: dict | None = None  # {'step', 'metrics': [crossed...], 'regressions'} at the hard stop

  def _significant(self, name: str, value: float) -> bool:
    if self.min_z == 0 or name not in self.counts or not higher_is_better(name):
      return True
    p, n = self.baseline[name], max(self.counts[name], 1)
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return (p - value) >= self.min_z * se

  def check(self, step: int, metrics: Mapping[str, float]) -> Verdict:
    """Records one evaluation and returns its verdict; `stopped` is set on the first crossing."""
    missing = [m for m in self.general + [self.select] if m not in metrics]
    if missing:
      raise KeyError(f"RegressionMonitor.check: metrics {missing} were not measured at step {step}")
    regressions = {m: relative_regression(self.baseline[m], float(metrics[m]), higher_is_better(m))
                   for m in self.general}
    crossed = [m for m, r in regressions.items()
               if (r > self.threshold or not math.isfinite(r)) and self._significant(m, float(metrics[m]))]
    within = not crossed
    score = float(metrics[self.select])
    better = (self.best is None or
              (score > self.best["score"] if higher_is_better(self.select) else score < self.best["score"]))
    is_best = within and better
    if is_best:
      self.best = {"step": int(step), "score": score, "metrics": {k: float(v) for k, v in metrics.items()}}
    streak = 0
    for h in reversed(self.history):
      if not h["crossed"]:
        break
      streak += 1
    if crossed and self.stopped is None and streak + 1 >= self.patience:
      self.stopped = {"step": int(step), "metrics": crossed,
                      "regressions": {m: regressions[m] for m in crossed}}
    self.history.append({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()},
                         "regressions": regressions, "crossed": crossed})
    return Verdict(int(step), regressions, crossed, within, is_best)

  @property
  def should_stop(self) -> bool:
    return self.stopped is not None

  def state_dict(self) -> dict:
    return {"baseline": self.baseline, "history": self.history, "best": self.best, "stopped": self.stopped}

  def load_state_dict(self, d: Mapping) -> None:
    if dict(d["baseline"]) != self.baseline:
      raise ValueError("RegressionMonitor.load_state_dict: the saved baseline differs from this monitor's")
    self.history, self.best, self.stopped = list(d["history"]), d["best"], d["stopped"]

  def describe(self) -> str:
    """One sentence for the report: whether and why training stopped, and which checkpoint is kept."""
    best = (f"best in-threshold checkpoint: step {self.best['step']} ({self.select} "
            f"{self.best['score']:.4g})" if self.best else "no evaluation stayed inside the threshold")
    if self.stopped is None:
      return f"No general metric regressed beyond {100 * self.threshold:.1f}%; {best}."
    parts = ", ".join(f"{m} {100 * r:+.2f}%" for m, r in self.stopped["regressions"].items())
    what = "Hard stop" if self.hard_stop else "Threshold crossed (record-only, training continued)"
    return f"{what} at step {self.stopped['step']}: {parts} (threshold {100 * self.threshold:.1f}%); {best}."


def monitor_figure(history: list[dict], baseline: Mapping[str, float], threshold: float, *, title: str = "",
                   stopped_step: int | None = None, best_step: int | None = None):
  """A matplotlib Figure (built without pyplot, so nothing is displayed or kept alive): general metrics' relative
  regression (left, with the threshold drawn) and domain metrics' improvement (right) over adaptation steps."""
  from matplotlib.figure import Figure
  steps = [h["step"] for h in history]
  general = sorted({m for h in history for m in h["regressions"]})
  domain = sorted(m for m in baseline if m.startswith("domain/"))
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  ax = axes[0]
  for m in general:
    ax.plot(steps, [100 * h["regressions"][m] for h in history], marker="o", ms=3, label=m)
  ax.axhline(100 * threshold, color="red", ls="--", label=f"threshold {100 * threshold:.0f}%")
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xlabel("adaptation step")
  ax.set_ylabel("general regression vs base (%)")
  ax.set_title("general (higher = worse)")
  ax = axes[1]
  for m in domain:
    vals = [h["metrics"][m] for h in history]
    ax.plot(steps, [100 * relative_regression(baseline[m], v, higher_is_better(m)) * -1 for v in vals],
            marker="o", ms=3, label=m)
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xlabel("adaptation step")
  ax.set_ylabel("domain improvement vs base (%)")
  ax.set_title("domain (higher = better)")
  for ax in axes:
    if stopped_step is not None:
      ax.axvline(stopped_step, color="red", lw=1, label="threshold crossed")
    if best_step is not None:
      ax.axvline(best_step, color="green", lw=1, ls=":", label="best kept")
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_monitor(history: list[dict], baseline: Mapping[str, float], threshold: float, path: str,
                 title: str = "", stopped_step: int | None = None, best_step: int | None = None) -> None:
  """`monitor_figure` saved as a PNG at `path`."""
  monitor_figure(history, baseline, threshold, title=title, stopped_step=stopped_step,
                 best_step=best_step).savefig(path, dpi=110)


__all__ = ["RegressionMonitor", "Verdict", "relative_regression", "higher_is_better", "monitor_figure",
           "plot_monitor"]
