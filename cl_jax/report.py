"""Markdown tables and plots from a run's results and metrics.

The plot functions build a `matplotlib.figure.Figure` without pyplot (no display or backend needed: they work
in a notebook, on a headless node, in a test), return it, and also write a PNG when given a path.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np


def matrix_table(r, names=None) -> str:
  """The accuracy matrix as a Markdown table (rows: before training, after task 1..T; columns: tasks)."""
  r = np.asarray(r)
  t = r.shape[1]
  names = names or [f"task {i + 1}" for i in range(t)]
  lines = ["| after \\ on | " + " | ".join(names) + " | mean |", "|---" * (t + 2) + "|"]
  for j, row in enumerate(r):
    label = "(before)" if j == 0 else f"task {j}"
    seen = row[:max(j, 1)]
    lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in row) + f" | {100 * seen.mean():.1f} |")
  return "\n".join(lines)


def metrics_table(results: dict) -> str:
  rows = [(k, results[k]) for k in ("acc", "bwt", "fwt", "forgetting") if results.get(k) is not None]
  return "| metric | value (%) |\n|---|---|\n" + "\n".join(f"| {k.upper() if k != 'forgetting' else k} | "
                                                           f"{100 * v:+.2f} |" for k, v in rows)


def summary_text(results: dict, title: str) -> str:
  """The Markdown summary of a run with an accuracy matrix (what summary.md holds)."""
  text = (f"# {title}\n\n"
          f"Accuracy (%) on each task (columns) after training each task (rows); the mean column averages the "
          f"tasks seen so far.\n\n{matrix_table(results['accuracy_matrix'])}\n\n{metrics_table(results)}\n")
  timing = results.get("timing", {})
  if timing.get("task_seconds"):
    text += "\nWall time per task (s): " + ", ".join(f"{s:.1f}" for s in timing["task_seconds"]) + "\n"
  return text


def write_summary(workdir: str, results: dict, title: str) -> str:
  path = os.path.join(workdir, "summary.md")
  with open(path, "w") as f:
    f.write(summary_text(results, title))
  return path


def read_evals(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:  # parse only lines that can be eval records (a run writes one train record per step)
    return [r for r in map(json.loads, (line for line in f if '"eval"' in line)) if r.get("type") == "eval"]


def new_figure(figsize):
  from matplotlib.figure import Figure
  return Figure(figsize=figsize)


def _save(fig, path: str | None):
  if path:
    fig.savefig(path, dpi=110)
  return fig


def draw_accuracy_matrix(ax, r, title: str = ""):
  r = np.asarray(r)
  t = r.shape[1]
  im = ax.imshow(100 * r, vmin=0, vmax=100, cmap="viridis")
  for j in range(r.shape[0]):
    for i in range(t):
      ax.text(i, j, f"{100 * r[j, i]:.0f}", ha="center", va="center",
              color="white" if r[j, i] < 0.6 else "black", fontsize=8)
  ax.set_xticks(range(t), [str(i + 1) for i in range(t)])
  ax.set_yticks(range(r.shape[0]), ["init"] + [str(j) for j in range(1, r.shape[0])])
  ax.set_xlabel("evaluated on task")
  ax.set_ylabel("after training task")
  ax.set_title(title or "accuracy (%)")
  return im


def draw_accuracy_curves(ax, evals: list[dict], title: str = ""):
  if evals:
    steps = np.asarray([e["step"] for e in evals])
    accs = np.asarray([e["accuracy"] for e in evals])
    for i in range(accs.shape[1]):
      ax.plot(steps, 100 * accs[:, i], marker=".", label=f"task {i + 1}")
    for b in sorted({e["step"] for e in evals if e.get("boundary")}):
      ax.axvline(b, color="grey", ls=":", lw=0.8)
    ax.legend(fontsize=8, ncol=2)
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title or "accuracy on each task during training")


def plot_accuracy_matrix(r, path: str | None = None, title: str = ""):
  """Heat map of the accuracy matrix; returns the Figure (and writes `path` when given)."""
  t = np.asarray(r).shape[1]
  fig = new_figure((1.0 + 0.7 * t, 1.0 + 0.7 * (t + 1)))
  ax = fig.add_subplot()
  im = draw_accuracy_matrix(ax, r, title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  return _save(fig, path)


def plot_accuracy_curves(evals: list[dict], path: str | None = None, steps_per_task=None, title: str = ""):
  """Each task's test accuracy over the whole run, task boundaries dotted; returns the Figure."""
  fig = new_figure((8, 4))
  draw_accuracy_curves(fig.add_subplot(), evals, title)
  fig.tight_layout()
  return _save(fig, path)


def overview_figure(r, evals: list[dict], title: str = ""):
  """The matrix heat map (left) beside the accuracy curves (right): what `Results.plot()` shows."""
  t = np.asarray(r).shape[1]
  fig = new_figure((4.0 + 0.7 * t + 8, max(4.0, 1.0 + 0.7 * (t + 1))))
  left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0 + 0.7 * t, 8]})
  im = draw_accuracy_matrix(left, r)
  fig.colorbar(im, ax=left, fraction=0.046)
  draw_accuracy_curves(right, evals)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def write_report(workdir: str, results: dict, title: str) -> None:
  write_summary(workdir, results, title)
  plot_accuracy_matrix(results["accuracy_matrix"], os.path.join(workdir, "accuracy_matrix.png"), title)
  plot_accuracy_curves(read_evals(workdir), os.path.join(workdir, "accuracy_curves.png"), title=title)


# An LM run's regression monitor (cl_jax.lm.monitor), drawn from its JSON history. Here rather than in the monitor
# so that `Results.plot` of a finished LM run needs no LM module.
LOWER_IS_BETTER = ("perplexity", "loss", "bits_per_byte")


def higher_is_better(name: str) -> bool:
  return not any(name.endswith(k) for k in LOWER_IS_BETTER)


def relative_regression(base: float, value: float, higher_better: bool) -> float:
  """How much worse `value` is than `base`, relative to `base` (> 0: worse; < 0: better)."""
  if base == 0:
    return 0.0 if value == base else math.inf
  return (base - value) / abs(base) if higher_better else (value - base) / abs(base)


def draw_benchmarks(ax, history: list[dict], benchmarks: list[dict]):
  """Each benchmark's guarded score (%) over the steps (general solid, domain dashed), its paired interval as a band
  and, for a general one, the score its threshold allows (dotted)."""
  steps = [h["step"] for h in history]
  for b in benchmarks:
    name, before = b["name"], b["before"]
    sign = 1.0 if higher_is_better(name) else -1.0
    # The monitor's r is a regression: before - sign r in points, before (1 - r) when relative.
    score = (lambda r: before * (1 - r)) if b["relative"] else (lambda r: before - sign * r)
    line, = ax.plot(steps, [100 * h["metrics"][name] for h in history], marker="o", ms=3,
                    ls="-" if b["role"] == "general" else "--", label=f"{b['benchmark']} {b['metric']}")
    if all(name in h.get("intervals", {}) and h["intervals"][name].get("se") is not None for h in history[1:]):
      ax.fill_between(steps[1:], [100 * score(h["intervals"][name]["hi"]) for h in history[1:]],
                      [100 * score(h["intervals"][name]["lo"]) for h in history[1:]], color=line.get_color(),
                      alpha=0.15)
    if b["role"] == "general":
      ax.axhline(100 * score(b["threshold"] / 100), color=line.get_color(), ls=":", lw=1)
  ax.set_xlabel("adaptation step")
  ax.set_ylabel("benchmark score (%)")
  ax.set_title("benchmarks (dotted: threshold; band: interval)")


def monitor_figure(history: list[dict], baseline: Mapping[str, float], threshold: float, *, title: str = "",
                   stopped_step: int | None = None, best_step: int | None = None, benchmarks: list | None = None):
  """A matplotlib Figure (built without pyplot, so nothing is displayed or kept alive): general metrics' relative
  regression with its interval (left, with the threshold drawn), domain metrics' improvement (middle) and, with
  `benchmarks` (an LM record's `benchmarks` rows), each benchmark's score (right)."""
  from matplotlib.figure import Figure
  steps = [h["step"] for h in history]
  general = sorted({m for h in history for m in h["regressions"] if "/bench/" not in m})
  domain = sorted(m for m in baseline if m.startswith("domain/") and "/bench/" not in m)
  fig = Figure(figsize=(16, 4) if benchmarks else (11, 4))
  axes = fig.subplots(1, 3 if benchmarks else 2)
  ax = axes[0]
  for m in general:
    line, = ax.plot(steps, [100 * h["regressions"][m] for h in history], marker="o", ms=3, label=m)
    if all("intervals" in h and m in h["intervals"] for h in history):
      ax.fill_between(steps, [100 * h["intervals"][m]["lo"] for h in history],
                      [100 * h["intervals"][m]["hi"] for h in history], color=line.get_color(), alpha=0.15)
  ax.axhline(100 * threshold, color="red", ls="--", label=f"threshold {100 * threshold:.0f}%")
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xlabel("adaptation step")
  ax.set_ylabel("general regression vs base (%)")
  ax.set_title("general (higher = worse; band: interval)")
  ax = axes[1]
  for m in domain:
    vals = [h["metrics"][m] for h in history]
    ax.plot(steps, [100 * relative_regression(baseline[m], v, higher_is_better(m)) * -1 for v in vals],
            marker="o", ms=3, label=m)
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xlabel("adaptation step")
  ax.set_ylabel("domain improvement vs base (%)")
  ax.set_title("domain (higher = better)")
  if benchmarks:
    draw_benchmarks(axes[2], history, benchmarks)
  for ax in axes:
    if stopped_step is not None:
      ax.axvline(stopped_step, color="red", lw=1, label="regression called")
    if best_step is not None:
      ax.axvline(best_step, color="green", lw=1, ls=":", label="best kept")
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_monitor(history: list[dict], baseline: Mapping[str, float], threshold: float, path: str,
                 title: str = "", stopped_step: int | None = None, best_step: int | None = None,
                 benchmarks: list | None = None) -> None:
  """`monitor_figure` saved as a PNG at `path`."""
  monitor_figure(history, baseline, threshold, title=title, stopped_step=stopped_step,
                 best_step=best_step, benchmarks=benchmarks).savefig(path, dpi=110)
