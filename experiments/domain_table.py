"""One domain-incremental table (Permuted or Rotated MNIST): each method a many-seed program, tuned on validation.

The scripts `permuted_mnist.py` and `rotated_mnist.py` describe their protocol (config, methods, grids) and call
`main`; this module runs the rows in order (a row is written to the report as soon as it finishes, so a table
that runs out of time still reports what it measured) and writes the Markdown table, a JSON of every seed and a
plot of the mean accuracy over the tasks seen so far.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Callable

import numpy as np

from cl_jax.config import set_overrides
from experiments.protocol import (MNIST, ROOT, NotCached, by_score, diverged_note, fmt_ci, fmt_scores, fmt_setting,
                                  only_cached, refine_on_validation, run_reported, runs_of, select_on_validation,
                                  stats, write_json, write_markdown)

BUDGET = 1000  # memory examples for every method that keeps any
# name: (strategy spec, fixed overrides, validation grid or None)
METHODS = {
    "none": ("naive", {}, None),
    "ewc": ("ewc", {}, {"ewc.lam": [1e0, 1e1, 1e2, 1e3, 1e4]}),
    "online_ewc": ("online_ewc", {"ewc.gamma": 1.0}, {"ewc.lam": [1e0, 1e1, 1e2, 1e3, 1e4]}),
    "si": ("si", {}, {"si.c": [0.1, 1.0, 10.0, 100.0]}),
    "lwf": ("lwf", {"distill.alpha": 1.0, "distill.temperature": 2.0}, None),
    "er": ("replay", {"replay.capacity": BUDGET, "replay.policy": "class_balanced", "replay.batch_size": 128,
                      "replay.weight": 1.0}, None),
    "agem": ("agem", {"agem.capacity": BUDGET, "agem.policy": "class_balanced", "agem.batch_size": 256}, None),
    "derpp": ("derpp", {"der.capacity": BUDGET, "der.batch_size": 32, "der.alpha": 0.5, "der.beta": 1.0}, None),
    "joint": ("joint", {}, None),
}


def make_config(get_config: Callable, method: str, seed: int, iters: int, num_seeds: int, overrides: dict, hidden):
  strategy, fixed, _ = METHODS[method]
  c = get_config(f"scenario=domain,strategy={strategy}")
  set_overrides(c, {"data.path": MNIST, "seed": seed, "train.num_seeds": num_seeds, "train.steps_per_task": iters,
                    "model.hidden": list(hidden), "train.log_every_steps": 500, "eval.every_steps": 0,
                    "checkpoint.every_steps": 0, **fixed, **overrides})
  return c


def main(argv, *, name: str, title: str, get_config: Callable, defaults: dict, describe: str, methods: str):
  p = argparse.ArgumentParser(description=title)
  p.add_argument("--iters", type=int, default=defaults["iters"], help="iterations per task")
  p.add_argument("--tune_iters", type=int, default=defaults["tune_iters"],
                 help="iterations per task of the validation grid runs")
  p.add_argument("--hidden", default=defaults["hidden"], help="MLP widths")
  p.add_argument("--seeds", type=int, default=defaults["seeds"], help="reported seeds 0..N-1, one program per row")
  p.add_argument("--tuning_seed", type=int, default=100)
  p.add_argument("--no_refine", dest="refine", action="store_false",
                 help="when --tune_iters < --iters, do not re-check the grid choice at --iters (see below)")
  p.add_argument("--methods", default=methods)
  p.add_argument("--workroot", default=os.path.join(ROOT, "..", "runs", name))
  p.add_argument("--out", default=os.path.join(ROOT, "results", f"{name}.md"))
  p.add_argument("--only_cached", action="store_true",
                 help="train nothing: write the report from the finished runs (unfinished rows are left out; a "
                      "re-check at --iters not finished yet is reported as such, the row at the short grid's choice)")
  a = p.parse_args(argv)
  hidden = tuple(int(h) for h in a.hidden.split(","))
  log = lambda s: print(s, flush=True)
  table, chosen = {}, {}
  for method in a.methods.split(","):
    try:
      with only_cached() if a.only_cached else contextlib.nullcontext():
        record = _row(a, method, get_config, hidden, chosen, log)
    except NotCached as e:
      log(f"{method}: left out of the report, not finished ({e})")
      continue
    table[method] = runs_of(record)
    log(f"{method:10s} ACC {fmt_ci(stats([r['acc'] for r in table[method]]))}")
    write_report(a, name, title, describe, table, chosen)


def _row(a, method, get_config, hidden, chosen, log) -> dict:
  """Chooses `method`'s hyperparameters on validation (recorded in `chosen`) and runs its reported seeds."""
  grid = METHODS[method][2]
  overrides = {}
  if grid:
    log(f"choosing {', '.join(grid)} for {method} on validation")
    make = lambda seed, n, ov: make_config(get_config, method, seed, a.tune_iters, n, ov, hidden)
    overrides, scores = select_on_validation(make, grid, a.tuning_seed, 1, a.workroot, log)
    refined = None
    if a.refine and a.tune_iters < a.iters:
      # The short grid's choice need not hold at the full schedule (Permuted MNIST's EWC: λ=10 at 1000
      # iterations, λ=100 better at 5000), so climb from it through the grid at the reported schedule.
      log(f"re-checking {overrides} for {method} on validation at {a.iters} iterations per task")
      full = lambda seed, n, ov: make_config(get_config, method, seed, a.iters, n, ov, hidden)
      try:
        overrides, refined = refine_on_validation(full, grid, overrides, a.tuning_seed, 1, a.workroot, log,
                                                  extend=2)
      except NotCached:
        if not a.only_cached:
          raise
        refined = PENDING
    chosen[method] = (overrides, scores, refined)
  # If the chosen setting diverges on a reported seed: the next by the full-schedule scores, then by the grid's.
  candidates = [overrides] + (by_score(refined if isinstance(refined, list) else []) + by_score(scores) if grid
                              else [])
  make = lambda setting: make_config(get_config, method, 0, a.iters, a.seeds, setting, hidden)
  record, setting, diverged = run_reported(make, candidates, a.workroot, log)
  if diverged:  # the row runs at the next best validated setting; the report says why
    notes = [diverged_note(o) for o in diverged]
    chosen[method] = ((setting, scores, refined + notes) if isinstance(refined, list)
                      else (setting, scores + notes, refined))
  return record


PENDING = "not finished yet (the row uses the short grid's choice)"


def write_report(a, name, title, describe, table, chosen):
  n_seeds = sorted({len(v) for v in table.values()})
  lines = [f"# {title}", "", "Command:", "",
           f"    python experiments/{name}.py --iters {a.iters} --tune_iters {a.tune_iters} --seeds {a.seeds} "
           f"--hidden {a.hidden}", "",
           describe.format(iters=a.iters, hidden=a.hidden.replace(",", "-"), seeds="/".join(map(str, n_seeds))),
           "",
           "| method | ACC (%) | BWT (%) | forgetting (%) | task 1 at the end (%) |", "|---|---|---|---|---|"]
  for method, runs in table.items():
    cells = [stats([r[k] for r in runs]) for k in ("acc", "bwt", "forgetting")]
    first = stats([r["accuracy_matrix"][-1][0] for r in runs])
    lines.append(f"| {method} | " + " | ".join(fmt_ci(c) for c in [*cells, first]) + " |")
  lines += ["", "Cells: mean ± half-width of the 95% Student-t interval over seeds.", ""]
  if chosen:
    refining = any(refined for _, _, refined in chosen.values())
    lines += ["## Hyperparameters chosen on validation", "",
              f"Grid on a validation split (10% of the training data, never the test set), tuning seed "
              f"{a.tuning_seed} (not a reported seed), **{a.tune_iters} iterations per task** (the reported runs: "
              f"{a.iters})" + (
                  f". The grid's choice is then re-checked at the reported {a.iters} iterations: its grid "
                  f"neighbours are scored too, and the search climbs to a neighbour while it is better (up to two "
                  f"steps past the grid's ends), so the chosen value is a local optimum at the reported schedule"
                  if refining else "") +
              "; the chosen setting is then run on the reported seeds.", "",
              f"| method | validation ACC per setting ({a.tune_iters} it.) |"
              + (f" at {a.iters} it. |" if refining else "") + " chosen |",
              "|---|---|" + ("---|" if refining else "") + "---|"]
    for method, (best, scores, refined) in chosen.items():
      cells = [fmt_scores(scores)] + ([fmt_scores(refined) if isinstance(refined, list) else refined or "—"]
                                   if refining else [])
      lines.append(f"| {method} | " + " | ".join(cells) + f" | {fmt_setting(best)} |")
    lines.append("")
  lines += _findings(table)
  write_markdown(a.out, lines)
  base = os.path.splitext(a.out)[0]
  write_json(base + ".json", {"protocol": vars(a), "runs": table,
                              "chosen": {m: {"best": b, "scores": s, "scores_at_iters": r}
                                         for m, (b, s, r) in chosen.items()}})
  plot(table, title, base + ".png")


def _findings(table) -> list:
  if "none" not in table:
    return []
  base = stats([r["acc"] for r in table["none"]])
  out = ["## Findings (computed from the table)", ""]
  for method, runs in table.items():
    if method == "none":
      continue
    s = stats([r["acc"] for r in runs])
    lo, hi = s["mean"] - (s["ci95"] or 0), s["mean"] + (s["ci95"] or 0)
    blo, bhi = base["mean"] - (base["ci95"] or 0), base["mean"] + (base["ci95"] or 0)
    verdict = "above" if lo > bhi else "below" if hi < blo else "not separated from"
    out.append(f"- {method}: ACC {s['mean']:.1f}, {s['mean'] - base['mean']:+.1f} points against fine-tuning "
               f"({base['mean']:.1f}); the 95% intervals put it {verdict} fine-tuning.")
  return out + [""]


def plot(table, title, path):
  """Mean accuracy over the tasks seen so far, after each task, per method (mean and 95% band over seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for method, runs in table.items():
    curves = []
    for r in runs:
      mat = np.asarray(r["accuracy_matrix"])
      curves.append([100 * mat[j, :j].mean() for j in range(1, mat.shape[0])])
    curves = np.asarray(curves)
    x = np.arange(1, curves.shape[1] + 1)
    cols = [stats(curves[:, j] / 100) for j in range(curves.shape[1])]
    mean = np.array([c["mean"] for c in cols])
    half = np.array([c["ci95"] or 0.0 for c in cols])
    ax.plot(x, mean, marker="o", ms=3, label=method)
    ax.fill_between(x, mean - half, mean + half, alpha=0.2)
  ax.set_xlabel("tasks trained")
  ax.set_ylabel("mean accuracy on tasks so far (%)")
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
