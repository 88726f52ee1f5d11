"""Markdown tables and PNG plots from a run's results and metrics."""
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
  rows = [("ACC", results["acc"]), ("BWT", results["bwt"]), ("FWT", results["fwt"]),
          ("forgetting", results["forgetting"])]
  return "| metric | value (%) |\n|---|---|\n" + "\n".join(f"| {k} | {100 * v:+.2f} |" for k, v in rows)


def write_summary(workdir: str, results: dict, title: str) -> str:
  text = (f"# {title}\n\n"
          f"Accuracy (%) on each task (columns) after training each task (rows); the mean column averages the "
          f"tasks seen so far.\n\n{matrix_table(results['accuracy_matrix'])}\n\n{metrics_table(results)}\n")
  timing = results.get("timing", {})
  if timing.get("task_seconds"):
    text += "\nWall time per task (s): " + ", ".join(f"{s:.1f}" for s in timing["task_seconds"]) + "\n"
  path = os.path.join(workdir, "summary.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def read_evals(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get("type") == "eval"]


def plot_accuracy_matrix(r, path: str, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  r = np.asarray(r)
  t = r.shape[1]
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * t, 1.0 + 0.7 * (t + 1)))
  im = ax.imshow(100 * r, vmin=0, vmax=100, cmap="viridis")
  for j in range(t + 1):
    for i in range(t):
      ax.text(i, j, f"{100 * r[j, i]:.0f}", ha="center", va="center",
              color="white" if r[j, i] < 0.6 else "black", fontsize=8)
  ax.set_xticks(range(t), [str(i + 1) for i in range(t)])
  ax.set_yticks(range(t + 1), ["init"] + [str(j) for j in range(1, t + 1)])
  ax.set_xlabel("evaluated on task")
  ax.set_ylabel("after training task")
  ax.set_title(title or "accuracy (%)")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_accuracy_curves(evals: list[dict], path: str, steps_per_task=None, title: str = "") -> None:
  """Each task's test accuracy over the whole run; task boundaries as dotted lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  if evals:
    steps = np.asarray([e["step"] for e in evals])
    accs = np.asarray([e["accuracy"] for e in evals])
    for i in range(accs.shape[1]):
      ax.plot(steps, 100 * accs[:, i], marker=".", label=f"task {i + 1}")
    for b in sorted({e["step"] for e in evals if e.get("boundary")}):
      ax.axvline(b, color="grey", ls=":", lw=0.8)
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title or "accuracy on each task during training")
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, results: dict, title: str) -> None:
  write_summary(workdir, results, title)
  plot_accuracy_matrix(results["accuracy_matrix"], os.path.join(workdir, "accuracy_matrix.png"), title)
  plot_accuracy_curves(read_evals(workdir), os.path.join(workdir, "accuracy_curves.png"), title=title)
