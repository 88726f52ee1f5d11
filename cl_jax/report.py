"""Markdown tables and plots from a run's results and metrics.

The plot functions build a `matplotlib.figure.Figure` without pyplot (no display or backend needed: they work
in a notebook, on a headless node, in a test), return it, and also write a PNG when given a path.
"""
from __future__ import annotations

import json
import os

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
