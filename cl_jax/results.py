"""`Results`: what every run returns (classic, lm, merge) and what `Results.load(workdir)` reads back.

A run's `results.json` is `Results.as_dict()`: `kind`, the accuracy matrix and its summaries where the run has
one (classic: R[j, i] = accuracy on task i after training task j, row 0 before any training; see
`cl_jax.eval.metrics` for ACC / BWT / FWT / forgetting), and the kind's own record under the remaining keys
(`extra`: timing, strategy settings, an LM run's monitor history and test metrics, ...).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting")


@dataclasses.dataclass
class Results:
  kind: str                                  # classic | lm | merge
  workdir: str
  accuracy_matrix: np.ndarray | None = None  # [T + 1, T] (classic), [1, T] (merge), None (lm)
  acc: float | None = None
  bwt: float | None = None
  fwt: float | None = None
  forgetting: float | None = None
  extra: dict = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict:
    """results.json: kind, the matrix and its summaries (those the run has), then `extra`."""
    d = {"kind": self.kind}
    if self.accuracy_matrix is not None:
      d["accuracy_matrix"] = np.asarray(self.accuracy_matrix).tolist()
    d.update({k: getattr(self, k) for k in SUMMARY_KEYS if getattr(self, k) is not None})
    d.update(self.extra)
    return d

  @classmethod
  def from_dict(cls, d: dict, workdir: str, kind: str | None = None) -> "Results":
    d = dict(d)
    kind = d.pop("kind", None) or kind or "classic"
    matrix = d.pop("accuracy_matrix", None)
    summaries = {k: d.pop(k, None) for k in SUMMARY_KEYS}
    return cls(kind, workdir, None if matrix is None else np.asarray(matrix, np.float64), **summaries, extra=d)

  @classmethod
  def load(cls, workdir: str) -> "Results":
    """Reads `<workdir>/results.json` of a finished run (any kind)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file (the run has not finished)")
    with open(path) as f:
      d = json.load(f)
    kind = None
    config_path = os.path.join(workdir, "config.json")
    if "kind" not in d and os.path.isfile(config_path):
      with open(config_path) as f:
        kind = json.load(f).get("kind")
    return cls.from_dict(d, workdir, kind)

  def metrics(self, type: str | None = None) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` (optionally only those of one `type`: train | eval)."""
    from cl_jax.workdir import read_metrics
    return [r for r in read_metrics(self.workdir) if type is None or r.get("type") == type]

  def summary(self) -> str:
    """A Markdown summary: the accuracy matrix and ACC / BWT / FWT / forgetting, or the run's summary.md."""
    from cl_jax import report
    e = self.extra
    title = e.get("title") or (f"{e['strategy']} — {e['scenario']} ({e.get('data', '')})" if "scenario" in e
                               else f"{self.kind} run in {self.workdir}")
    if self.accuracy_matrix is not None and np.asarray(self.accuracy_matrix).shape[0] > 1:
      return report.summary_text(self.as_dict(), title)
    path = os.path.join(self.workdir, "summary.md")
    if os.path.isfile(path):
      with open(path) as f:
        return f.read()
    scalars = {k: v for k, v in self.as_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return f"# {title}\n\n| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.6g} |" for k, v in scalars.items())

  def _repr_markdown_(self) -> str:
    return self.summary()

  def plot(self):
    """A matplotlib Figure (no display needed): the matrix heat map and accuracy curves, or the LM monitor."""
    from cl_jax import report
    if self.kind == "lm" and "history" in self.extra:
      from cl_jax.lm.monitor import monitor_figure
      e = self.extra
      return monitor_figure(e["history"], e["baseline"], e["threshold"], best_step=e.get("best_step"),
                            stopped_step=(e.get("stopped") or {}).get("step"))
    if self.accuracy_matrix is None:
      raise ValueError(f"{self.kind} results in {self.workdir} have nothing to plot")
    return report.overview_figure(self.accuracy_matrix, self.metrics("eval"))
