"""The forgetting factors, measured: each factor swept with the others fixed, on a two-task Rotated MNIST.

  nohup python experiments/forgetting_factors.py > /tmp/forgetting_factors.log 2>&1 &
  python experiments/forgetting_factors.py --quick          # a smoke run (minutes; writes under /tmp)

Protocol. Task 1 is MNIST at 0°, task 2 MNIST rotated by θ (domain-incremental: one 10-way head), naive
fine-tuning of an MLP (Adam, batch 128, the same number of steps on each task). The base setting is θ = 45°,
width 2×256, lr 1e-3, task 2's whole training set, 500 steps per task; each factor moves one of these:

  similarity   θ (degrees) between the tasks                  (scenario.angles = [0, θ])
  data size    task 2's training examples, steps fixed        (scenario.train_sizes = [0, n]: fewer examples,
               more epochs: "small data trained hard")
  width        hidden units of both layers                     (model.hidden = [w, w])
  lr           Adam's learning rate (on both tasks: one optimizer)  (optim.lr, one program via train.sweep)
  steps        steps on task 2 so far                          (task-1 accuracy evaluated every 25 steps of
                                                                 task 2 in one run of 1000 steps per task)

Every setting runs the same seeds as one program (`train.num_seeds`). With two tasks, forgetting (Chaudhry et al.
2018) is R[1,1] − R[2,1] (task-1 accuracy after task 1 minus after task 2) and BWT (Lopez-Paz & Ranzato 2017) is
its negative; both are reported.

Verdict per factor. The claim is "more dissimilar / smaller data trained harder / smaller model / higher LR /
longer training = more forgetting", i.e. an expected sign of d(forgetting)/dx (+ for θ, lr, steps; − for data
size and width). For every seed the least-squares slope of its forgetting on x (x = θ in degrees, log10 of the
others) is one number; the seeds are paired across values (a seed's task-1 training is the same in every setting
of a factor except lr and width), so the mean slope over seeds with its 95% Student-t interval (n − 1 dof) is the
test: interval on the expected side of 0 -> "agrees", on the other side -> "disagrees", containing 0 ->
"inconclusive". Spearman's ρ over every seed-level point is printed beside it.

Domain distance on language models (`--lm`, run after the classic part; it merges into the same files): a byte-level
`tiny` transformer pre-trained on English prose (the project's `general` corpus: pydoc topics and docstrings), then
adapted (domain only, naive) to one target text of increasing distance, each from the same base per seed: the
general corpus itself (distance 0), other English prose from the standard library (IDLE's notes, the licence,
the email test messages), Python source (the `code` corpus) and the numeric test tables of `test/`. Distance is the
Jensen–Shannon divergence (bits) between the byte distributions of the target's and the general corpus's training
documents; forgetting is the general test perplexity's relative increase over the base (%), BWT its negative.

Writes results/forgetting_factors.md, .png and .json (every run's numbers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist.npz")

BASE = {"angle": 45.0, "size": 0, "width": 256, "lr": 1e-3, "steps": 500}

# name -> (what x is, expected sign of d forgetting / dx, x transform for the slope, axis label)
FACTORS = {
    "similarity": ("rotation angle θ of task 2 (degrees)", +1, "linear", "θ (degrees)"),
    "data_size": ("task-2 training examples (steps fixed)", -1, "log10", "task-2 examples"),
    "width": ("hidden units per layer (2 layers)", -1, "log10", "hidden units"),
    "lr": ("Adam learning rate (both tasks)", +1, "log10", "learning rate"),
    "steps": ("steps trained on task 2", +1, "log10", "steps on task 2"),
    "lm_distance": ("LM: distance of the adaptation text from the pre-training prose", +1, "linear",
                    "JS divergence from general prose (bits)"),
}
CLASSIC = ("similarity", "data_size", "width", "lr", "steps")
FULL_VALUES = {
    "similarity": [0.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0],
    "data_size": [128, 512, 2048, 8192, 60000],
    "width": [32, 64, 128, 256, 512, 1024],
    "lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    "steps": [5, 10, 25, 50, 100, 200, 500],
}
QUICK_VALUES = {
    "similarity": [0.0, 45.0, 90.0],
    "data_size": [128, 1024],
    "width": [16, 64],
    "lr": [1e-4, 1e-3],
    "steps": [10, 20, 40],
}
VERDICT_WORDS = ("agrees", "disagrees", "inconclusive (interval crosses 0)")


# ----------------------------------------------------------------------------- statistics

def t_interval(values) -> tuple:
  """(mean, half-width of the 95% Student-t interval of the mean) of `values`; half-width None for one value."""
  from cl_jax.train.seeds import aggregate
  a = aggregate(values)
  return a["mean"], a["ci95"]


def slope(x, y) -> float:
  """Least-squares slope of y on x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xc = x - x.mean()
  return float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))


def transform(x, kind: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.log10(x) if kind == "log10" else x


def verdict(x, forgetting, expected_sign: int, kind: str = "linear") -> dict:
  """Whether forgetting moves with x in the expected direction.

  x: [V] the factor's values; forgetting: [S, V] (seed s, value v); expected_sign: +1 when the claim says more x
  means more forgetting, −1 when less. Each seed's least-squares slope of forgetting on transform(x) is one sample;
  the verdict reads the 95% Student-t interval of their mean: wholly on the expected side of 0 -> 'agrees', wholly
  on the other -> 'disagrees', containing 0 (or fewer than 2 seeds) -> 'inconclusive (interval crosses 0)'.
  """
  f = np.asarray(forgetting, np.float64)
  if f.ndim != 2 or f.shape[1] != len(x) or len(x) < 2:
    raise ValueError(f"forgetting must be [seeds, {len(x)} values] with at least 2 values; got shape {f.shape}")
  tx = transform(x, kind)
  slopes = [slope(tx, row) for row in f]
  mean, ci = t_interval(slopes)
  lo, hi = (mean - ci, mean + ci) if ci is not None else (-math.inf, math.inf)
  if lo > 0 or hi < 0:
    word = VERDICT_WORDS[0] if np.sign(mean) == expected_sign else VERDICT_WORDS[1]
  else:
    word = VERDICT_WORDS[2]
  from scipy.stats import spearmanr
  rho, p = spearmanr(np.tile(tx, f.shape[0]), f.reshape(-1))
  return {"verdict": word, "slope_mean": mean, "slope_ci95": ci, "slope_interval": [lo, hi],
          "per_seed_slopes": slopes, "x_transform": kind, "expected_sign": expected_sign,
          "spearman_rho": float(rho), "spearman_p": float(p)}


# ----------------------------------------------------------------------------- runs

def base_config(seeds: int, steps: int, eval_every: int = 0):
  from cl_jax.config import set_overrides
  from configs.rotated_mnist import get_config
  c = get_config("scenario=domain,strategy=naive,num_tasks=2")
  chunk = math.gcd(steps, eval_every) if eval_every else min(steps, 100)
  set_overrides(c, {"data.path": MNIST, "seed": 0, "train.num_seeds": seeds, "train.steps_per_task": steps,
                    "scenario.angles": [0.0, BASE["angle"]], "model.hidden": [BASE["width"]] * 2,
                    "optim.lr": BASE["lr"], "train.log_every_steps": steps, "train.log_norms": False,
                    "train.steps_per_call": chunk, "eval.every_steps": eval_every, "checkpoint.every_steps": 0})
  return c


def run_config(config, workdir: str) -> tuple:
  """Runs `config` (every seed as one program); -> (results.json dict, the eval records of metrics.jsonl)."""
  import cl_jax
  t0 = time.time()
  cl_jax.run(config, workdir, overwrite=True, progress=False)
  print(f"  {workdir}: {time.time() - t0:.0f} s", flush=True)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r.get("type") == "eval"]
  return results, evals


def run_metrics(run: dict) -> dict:
  m = np.asarray(run["accuracy_matrix"])  # rows: before, after task 1, after task 2
  return {"seed": run["seed"], "forgetting": float(m[1, 0] - m[2, 0]), "bwt": float(m[2, 0] - m[1, 0]),
          "task1_after_task1": float(m[1, 0]), "task1_after_task2": float(m[2, 0]),
          "task2_after_task2": float(m[2, 1]), "overrides": run.get("overrides", {})}


def measure(values: dict, seeds: int, steps: int, workroot: str, factors=None) -> dict:
  """{factor: {'x': values, 'points': [[per-seed metrics for each value]]}} for `factors` (default: every one)."""
  factors = CLASSIC if factors is None else factors
  from cl_jax.config import set_overrides
  out = {}
  cache = {}

  def cached(name, overrides):
    key = json.dumps(overrides, sort_keys=True)
    if key not in cache:
      c = base_config(seeds, steps)
      set_overrides(c, overrides)
      cache[key] = run_config(c, os.path.join(workroot, name))[0]
    return cache[key]

  def per_value(results):
    return [run_metrics(r) for r in results["runs"]]

  def sweep_one(factor, key_of):
    points = []
    for v in values[factor]:
      overrides = key_of(v)
      label = "base" if not overrides else f"{factor}_{v:g}"
      points.append(per_value(cached(label, overrides)))
    out[factor] = {"x": values[factor], "points": points}

  base_or = lambda d, ref: {} if d == ref else d
  if "similarity" in factors:
    sweep_one("similarity", lambda v: base_or({"scenario.angles": [0.0, float(v)]},
                                            {"scenario.angles": [0.0, BASE["angle"]]}))
  if "data_size" in factors:
    sweep_one("data_size", lambda v: {} if v >= 60000 else {"scenario.train_sizes": [0, int(v)]})
  if "width" in factors:
    sweep_one("width", lambda v: {} if v == BASE["width"] else {"model.hidden": [int(v)] * 2})
  if "lr" in factors:
    measure_lr(values["lr"], seeds, steps, workroot, out)
  if "steps" in factors:
    measure_steps(values["steps"], seeds, workroot, out)
  return out


def measure_lr(values, seeds: int, steps: int, workroot: str, out: dict) -> None:
  """Every learning rate in one program (train.sweep); its runs are setting-major."""
  from cl_jax.config import set_overrides
  c = base_config(seeds, steps)
  set_overrides(c, {"train.sweep": "optim.lr=" + ",".join(f"{v:g}" for v in values)})
  results, _ = run_config(c, os.path.join(workroot, "lr"))
  runs = [run_metrics(r) for r in results["runs"]]
  out["lr"] = {"x": values, "points": [runs[g * seeds:(g + 1) * seeds] for g in range(len(values))]}


def measure_steps(values, seeds: int, workroot: str, out: dict) -> None:
  """Task-1 accuracy every gcd(values) steps of task 2, in one run of max(values) steps per task."""
  total = int(max(values))
  every = math.gcd(*[int(v) for v in values])
  results, evals = run_config(base_config(seeds, total, eval_every=every), os.path.join(workroot, "steps"))
  after1 = np.asarray([r["accuracy_matrix"][1][0] for r in results["runs"]])
  by_step = {int(e["step"]) - total: np.asarray(e["accuracy_runs"]) for e in evals if int(e["task"]) == 2}
  by_step[total] = np.asarray([r["accuracy_matrix"][2] for r in results["runs"]])  # the boundary record
  points = []
  for k in values:
    acc = by_step[int(k)]  # [runs, 2]: task 1, task 2 after k steps of task 2
    points.append([{"seed": r["seed"], "forgetting": float(after1[i] - acc[i, 0]),
                    "bwt": float(acc[i, 0] - after1[i]), "task1_after_task1": float(after1[i]),
                    "task1_after_task2": float(acc[i, 0]),
                    "task2_after_task2": float(acc[i, 1]), "overrides": {}}
                   for i, r in enumerate(results["runs"])])
  out["steps"] = {"x": values, "points": points}


# ----------------------------------------------------------------------------- LM: domain distance

# name -> the target text: a `text.domain` spec, or stdlib globs cut into chunk documents under the work root.
LM_DOMAINS = {
    "general": "general",
    "prose": ["idlelib/*.txt", "LICENSE.txt", "test/test_email/data/msg_*.txt"],
    "code": "code",
    "numeric": ["test/*_testcases.txt", "test/floating_points.txt", "test/ieee754.txt"],
}
CHUNK_CHARS = 2048  # one document per chunk: a few long files still split into train / validation / test


def domain_spec(name: str, workroot: str) -> str | None:
  """The `text.domain` spec of LM_DOMAINS[name] (None when the standard library lacks its files)."""
  import glob
  import sysconfig
  target = LM_DOMAINS[name]
  if isinstance(target, str):
    return target
  stdlib = sysconfig.get_paths()["stdlib"]
  paths = sorted(p for g in target for p in glob.glob(os.path.join(stdlib, g)) if os.path.isfile(p))
  if not paths:
    return None
  root = os.path.join(workroot, "domains", name)
  os.makedirs(root, exist_ok=True)
  for i, path in enumerate(paths):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    for j in range(0, len(text), CHUNK_CHARS):
      with open(os.path.join(root, f"{i:03d}_{j // CHUNK_CHARS:04d}.txt"), "w", encoding="utf-8") as f:
        f.write(text[j:j + CHUNK_CHARS])
  return f"dir:{root}"


def byte_distribution(spec: str) -> np.ndarray:
  from cl_jax.data.text import domain_documents
  counts = np.zeros(256, np.float64)
  for d in domain_documents(spec):
    counts += np.bincount(np.frombuffer(d.text.encode("utf-8"), np.uint8), minlength=256)
  return counts / counts.sum()


def js_divergence(p, q) -> float:
  """Jensen–Shannon divergence in bits: ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2; 0 for equal, 1 at most."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  m = (p + q) / 2
  kl = lambda a: float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))
  return 0.5 * kl(p) + 0.5 * kl(q)


def lm_config(seed: int, domain: str, base_dir: str, pretrain_steps: int, adapt_steps: int, quick: bool):
  from experiments.lm_protocol import small_lm_config
  return small_lm_config(seed, pretrain_steps=pretrain_steps, adapt_steps=adapt_steps, base_dir=base_dir,
                         mixture="domain_only", eval_every=adapt_steps // 2, domain=domain,
                         eval_sequences=32 if quick else 256, general_eval_sequences=128 if quick else 512,
                         cloze_items=60 if quick else 200)


def measure_lm(seeds, pretrain_steps: int, adapt_steps: int, workroot: str, quick: bool,
               collect: bool = False) -> dict:
  """{'domains', 'x' (JS divergence from general), 'points': [[per-seed metrics] per domain]}.

  collect=True trains nothing: it reads the finished runs' results.json under `workroot` (a seed missing any
  target is left out), e.g. to report a run that was stopped part-way."""
  import cl_jax
  specs = {n: domain_spec(n, workroot) for n in LM_DOMAINS}
  names = [n for n in LM_DOMAINS if specs[n] is not None]
  skipped = [n for n in LM_DOMAINS if specs[n] is None]
  if skipped:
    print(f"LM domains skipped (files not in this Python's standard library): {skipped}")
  general = byte_distribution("general")
  x = [js_divergence(byte_distribution(specs[n]), general) for n in names]
  points = [[] for _ in names]
  for seed in seeds:
    base_dir = ""
    workdirs = [os.path.join(workroot, "lm", f"seed{seed}", name) for name in names]
    if collect and not all(os.path.exists(os.path.join(w, "results.json")) for w in workdirs):
      print(f"LM seed {seed}: not every target finished; left out")
      continue
    for i, (name, workdir) in enumerate(zip(names, workdirs)):
      t0 = time.time()
      if collect:
        with open(os.path.join(workdir, "results.json")) as f:
          record = json.load(f)
      else:
        c = lm_config(seed, specs[name], base_dir, pretrain_steps, adapt_steps, quick)
        record = cl_jax.run(c, workdir, overwrite=True, progress=False).extra
      test = record["test"]
      base_dir = base_dir or workdir  # every target adapts the same base
      b, f = test["base"], test["final"]
      regression = (f["general/perplexity"] - b["general/perplexity"]) / b["general/perplexity"]
      points[i].append({"seed": seed, "forgetting": regression, "bwt": -regression,
                        "general_ppl_base": b["general/perplexity"], "general_ppl_final": f["general/perplexity"],
                        "domain_ppl_base": b["domain/perplexity"], "domain_ppl_final": f["domain/perplexity"],
                        "seconds": record["timing"]["total_seconds"]})
      print(f"  LM seed {seed} {name}: general ppl {b['general/perplexity']:.3f} -> {f['general/perplexity']:.3f} "
            f"({100 * regression:+.2f}%), domain ppl {b['domain/perplexity']:.3f} -> {f['domain/perplexity']:.3f} "
            f"({time.time() - t0:.0f} s)", flush=True)
  return {"domains": names, "specs": [specs[n] for n in names], "x": x, "points": points,
          "pretrain_steps": pretrain_steps, "adapt_steps": adapt_steps,
          "seeds": sorted({p["seed"] for pts in points for p in pts})}


# ----------------------------------------------------------------------------- report

ROW_KEYS = {"classic": ("forgetting", "bwt", "task1_after_task1", "task2_after_task2"),
            "lm": ("forgetting", "bwt", "general_ppl_base", "general_ppl_final", "domain_ppl_base", "domain_ppl_final")}


def summarize_factor(name: str, data: dict) -> dict:
  what, sign, kind, _ = FACTORS[name]
  x = data["x"]
  f = np.asarray([[p["forgetting"] for p in pts] for pts in data["points"]]).T  # [seeds, values]
  rows = []
  for v, pts in zip(x, data["points"]):
    row = {"x": v}
    for key in ROW_KEYS["lm" if name == "lm_distance" else "classic"]:
      vals = [p[key] for p in pts if key in p]
      row[key] = dict(zip(("mean", "ci95"), t_interval(vals))) if vals else None
    rows.append(row)
  return {"what": what, "rows": rows, **verdict(x, f, sign, kind)}


def pct(d, scale: float = 100.0, digits: int = 1) -> str:
  if d is None:
    return "—"
  ci = "" if d["ci95"] is None else f" ± {scale * d['ci95']:.{digits}f}"
  return f"{scale * d['mean']:.{digits}f}{ci}"


def fmt_x(name, v) -> str:
  return {"similarity": f"{v:g}°", "data_size": f"{int(v):,}", "width": f"{int(v)}", "lr": f"{v:g}",
          "steps": f"{int(v)}", "lm_distance": f"{v:.3f}"}[name]


def write_plot(summary: dict, raw: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(summary)
  cols = 3
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.5 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    s, x = summary[name], np.asarray(raw[name]["x"], np.float64)
    for v, pts in zip(x, raw[name]["points"]):
      ax.scatter([v] * len(pts), [100 * p["forgetting"] for p in pts], s=9, color="0.6", zorder=1)
    mean = np.asarray([100 * r["forgetting"]["mean"] for r in s["rows"]])
    ci = np.asarray([100 * (r["forgetting"]["ci95"] or 0.0) for r in s["rows"]])
    order = np.argsort(x, kind="stable")  # the LM targets are listed by name, drawn by distance
    ax.errorbar(x[order], mean[order], yerr=ci[order], marker="o", capsize=3,
                color="C1" if name == "lm_distance" else "C0", zorder=2)
    if name == "lm_distance":
      for v, m, d in zip(x, mean, raw[name]["domains"]):
        ax.annotate(d, (v, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
      ax.set_ylabel("general perplexity increase (%)")
    else:
      ax.set_ylabel("forgetting of task 1 (accuracy points)")
    if FACTORS[name][2] == "log10":
      ax.set_xscale("log")
      ax.set_xticks(x, [fmt_x(name, v) for v in x], fontsize=8)
      ax.minorticks_off()
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel(FACTORS[name][3])
    ax.set_title(f"{name}: {s['verdict'].split(' (')[0]}", fontsize=10)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle("Forgetting factors: two-task Rotated MNIST (blue) and LM adaptation (orange), naive fine-tuning; "
               "mean ± 95% t interval, dots: seeds", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


CLAIMS = {"similarity": "larger θ (more dissimilar)", "data_size": "fewer task-2 examples (steps fixed)",
          "width": "narrower model", "lr": "higher learning rate", "steps": "more steps on task 2",
          "lm_distance": "a more distant adaptation text"}


def write_markdown(summary: dict, meta: dict, path: str) -> None:
  b = meta["base"]
  lines = [
      "# The forgetting factors, measured",
      "",
      f"Written by `{meta['command']}`" + "".join(f", then `{c}`" for c in meta.get("reruns", []))
      + f" ({meta['minutes']:.0f} min on a shared, heavily loaded 2-core CPU machine)"
      + (f" and `{meta['lm']['command']}` ({meta['lm']['minutes']:.0f} min)" if "lm" in meta else "")
      + ". Raw numbers (every seed of every setting): `forgetting_factors.json`; plot: `forgetting_factors.png`.",
      "",
      "**Protocol (classic).** Two tasks: MNIST at 0°, then MNIST rotated by θ (domain-incremental, one 10-way "
      f"head); naive fine-tuning of an MLP with Adam, batch 128, {meta['steps']} steps per task; {meta['seeds']} "
      f"seeds per setting (seeds 0–{meta['seeds'] - 1}, every seed of a setting in one program). Base setting: "
      f"θ = {b['angle']:g}°, 2×{b['width']} hidden units, lr {b['lr']:g}, task 2's whole training set (60,000); "
      "each factor moves one of these and keeps the rest. Forgetting = task-1 accuracy after task 1 minus after "
      "task 2 (Chaudhry et al. 2018; with two tasks BWT = −forgetting, Lopez-Paz & Ranzato 2017), in accuracy "
      "points on the 10,000 MNIST test images; ± is the 95% Student-t interval over seeds.",
      "",
      "**Verdict rule.** For each seed, the least-squares slope of its forgetting on x (θ and the JS divergence "
      "as they are; log10 of the other factors); the mean slope over seeds with its 95% t interval (seeds are paired "
      "across the values of a factor). Interval on the side the claim predicts -> agrees; on the other side -> "
      "disagrees; containing 0 -> inconclusive. Spearman's ρ over all seed-level points is given beside it; "
      "*monotone* says whether the mean forgetting rises (or falls) at every step from one value to the next.",
      "",
      "| factor | claim: more forgetting with | mean per-seed slope of forgetting | 95% interval | Spearman ρ | "
      "most / least forgetting at | monotone | verdict |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, s in summary.items():
    unit = {"similarity": "points per degree", "lm_distance": "% per bit"}.get(name, "points per decade")
    lo, hi = s["slope_interval"]
    means = [r["forgetting"]["mean"] for r in s["rows"]]
    xs = meta["lm"]["domains"] if name == "lm_distance" else [fmt_x(name, r["x"]) for r in s["rows"]]
    steps = np.sign(np.diff(np.asarray(means)[np.argsort([r["x"] for r in s["rows"]], kind="stable")]))
    shape = "rising" if (steps > 0).all() else "falling" if (steps < 0).all() else "no"
    lines.append(f"| {name} | {CLAIMS[name]} | {100 * s['slope_mean']:+.3f} {unit} | [{100 * lo:+.3f}, "
                 f"{100 * hi:+.3f}] | {s['spearman_rho']:+.2f} | {xs[int(np.argmax(means))]} / "
                 f"{xs[int(np.argmin(means))]} | {shape} | **{s['verdict']}** |")
  lines += ["", "![forgetting factors](forgetting_factors.png)", ""]
  for name, s in summary.items():
    if name == "lm_distance":
      lm = meta["lm"]
      lines += [f"## lm_distance: {s['what']}", "", LM_PROTOCOL.format(**lm), "",
                "| target text | JS divergence (bits) | general ppl, base | general ppl, after | forgetting: general "
                "ppl increase (%) | BWT (%) | target ppl, base → after |", "|---|---|---|---|---|---|---|"]
      for d, r in zip(lm["domains"], s["rows"]):
        lines.append(f"| {d} | {r['x']:.3f} | {pct(r['general_ppl_base'], 1, 3)} | "
                     f"{pct(r['general_ppl_final'], 1, 3)} | {pct(r['forgetting'], 100, 2)} | "
                     f"{pct(r['bwt'], 100, 2)} | {r['domain_ppl_base']['mean']:.2f} → "
                     f"{r['domain_ppl_final']['mean']:.2f} |")
      lines.append("")
      continue
    lines += [f"## {name}: {s['what']}", "",
              "| x | forgetting (points) | BWT (points) | task 1 after task 1 (%) | task 2 after task 2 (%) |",
              "|---|---|---|---|---|"]
    for r in s["rows"]:
      lines.append(f"| {fmt_x(name, r['x'])} | {pct(r['forgetting'])} | {pct(r['bwt'])} | "
                   f"{pct(r['task1_after_task1'])} | {pct(r['task2_after_task2'])} |")
    if name in NOTES:
      steps_values = [int(v) for v in meta["values"]["steps"]]
      lines += ["", NOTES[name].format(total=max(steps_values), steps=meta["steps"], every=math.gcd(*steps_values))]
    lines.append("")
  caveats = [c for c in CAVEATS if not c.startswith("The LM-mixture" if "lm" in meta else "LM:")]
  lines += ["## Caveats", ""] + [f"- {c}" for c in caveats] + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


LM_PROTOCOL = (
    "A byte-level `tiny` transformer (128-byte context) pre-trained {pretrain_steps} steps on the `general` corpus "
    "(English prose: pydoc topics and docstrings), then adapted {adapt_steps} steps on one target text only "
    "(`adapt.mixture=domain_only`, naive, peak LR 0.1 × the pre-training LR, WSD), every target from the same "
    "base per seed; seeds {seeds}. Targets: the general corpus itself (distance 0), other English prose from the "
    "standard library (IDLE's text files, the licence, the email test messages), Python source (`code`) and the "
    "numeric test tables of `test/` (long files cut into 2,048-character documents). Distance: Jensen–Shannon "
    "divergence between the byte distributions of the target's and the general corpus's documents. Forgetting: "
    "relative increase of the general test perplexity over the base (BWT its negative); the verdict slope is in "
    "percent per bit of divergence.")
NOTES = {
    "data_size": "Task 2's examples are a seeded subset (`scenario.train_sizes = [0, n]`; smaller sets are subsets "
                 "of larger ones); the number of steps is fixed, so the smallest set is seen for hundreds of "
                 "epochs.",
    "lr": "One optimizer: the learning rate is that of both tasks, so task 1 is also learned at it (its accuracy "
          "after task 1 is in the table). All values ran as one program (`train.sweep`).",
    "steps": "The base setting ({total} steps on each task) with task-1 accuracy evaluated every {every} steps of "
             "task 2; the values are points along the same trajectories, so they are paired by seed and the per-seed "
             "slope is the right unit of replication.",
}
CAVEATS = [
    "Small scale: a two-layer MLP on MNIST, two tasks, a few seeds; the verdicts are about this setting.",
    "Similarity is a rotation angle: beyond 90° it is not a monotone measure of dissimilarity for digits (e.g. "
    "6/9 under 180°), so a linear slope over 0–180° summarises a curve that may bend; the table shows the shape.",
    "A linear slope is a test of direction, not of shape: a factor whose effect saturates or turns shows it in its "
    "table, not in the verdict.",
    "The LM-mixture half of the similarity factor (domain distance between text mixtures) is not measured here.",
    "LM: four targets, one of them far from the rest (the numeric tables), which weighs most in the linear slope; "
    "Spearman's ρ reads the ranks alone. Byte-level JS divergence is a crude distance (it sees characters, not "
    "meaning); the base's perplexity on each target (the table's last column) is a model-side view of the same.",
]


def render(data: dict, out: str) -> None:
  """results JSON dict -> the .json, .png and .md files (summaries and verdicts recomputed from the raw runs)."""
  data["summary"] = {name: summarize_factor(name, data["raw"][name]) for name in FACTORS if name in data["raw"]}
  for name, s in data["summary"].items():
    print(f"{name}: slope {s['slope_mean']:+.4g} [{s['slope_interval'][0]:+.4g}, {s['slope_interval'][1]:+.4g}] "
          f"rho {s['spearman_rho']:+.2f} -> {s['verdict']}")
  from experiments.protocol import portable
  with open(out + ".json", "w") as f:
    json.dump(portable(data), f, indent=1)
  write_plot(data["summary"], data["raw"], out + ".png")
  write_markdown(data["summary"], data["meta"], out + ".md")
  print(f"wrote {out}.md/.png/.json")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--steps", type=int, default=500, help="steps per task (the steps factor runs max(values))")
  p.add_argument("--lm", action="store_true", help="run the LM domain-distance part and merge it into the JSON "
                 "that the classic part wrote")
  p.add_argument("--lm_seeds", type=int, default=3)
  p.add_argument("--lm_collect", action="store_true", help="with --lm: train nothing, report the finished LM runs "
                 "under --workroot")
  p.add_argument("--pretrain_steps", type=int, default=400)
  p.add_argument("--adapt_steps", type=int, default=200)
  p.add_argument("--from_json", action="store_true", help="re-render the .md / .png from the saved JSON")
  p.add_argument("--factors", default="", help=f"comma-separated classic factors to measure (default: all of "
                 f"{','.join(CLASSIC)}); a subset replaces those factors in the saved JSON")
  p.add_argument("--quick", action="store_true", help="tiny smoke run; writes under /tmp, not results/")
  p.add_argument("--workroot", default="runs/forgetting_factors")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "forgetting_factors"))
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  out = "/tmp/forgetting_factors_quick" if args.quick else args.out
  if args.from_json or args.lm:
    if args.lm:  # measured first, merged after: the classic part may still be writing the JSON when this starts
      seeds = range(1 if args.quick else args.lm_seeds)
      steps = (60, 40) if args.quick else (args.pretrain_steps, args.adapt_steps)
      lm_raw = measure_lm(seeds, *steps, args.workroot, args.quick, collect=args.lm_collect)
      with open(os.path.join(args.workroot, "lm_raw.json"), "w") as f:
        json.dump(lm_raw, f)
    with open(out + ".json") as f:
      data = json.load(f)
    if args.lm:
      data["raw"]["lm_distance"] = lm_raw
      command = "python experiments/forgetting_factors.py --lm" + (" --quick" if args.quick else "") + (
          " --lm_collect" if args.lm_collect else "") + "".join(
          f" --{k} {getattr(args, k)}" for k, d in (("lm_seeds", 3), ("pretrain_steps", 400), ("adapt_steps", 200))
          if getattr(args, k) != d)
      seconds = sum(p["seconds"] for pts in lm_raw["points"] for p in pts)  # the runs' own clocks
      data["meta"]["lm"] = {"command": command, "minutes": seconds / 60, "domains": lm_raw["domains"],
                            "pretrain_steps": steps[0], "adapt_steps": steps[1],
                            "seeds": ", ".join(str(s) for s in lm_raw["seeds"])}
    render(data, out)
    return
  if not os.path.exists(MNIST):
    sys.exit(f"{MNIST}: MNIST (Keras mnist.npz) not found")
  values, seeds, steps = FULL_VALUES, args.seeds, args.steps
  if args.quick:
    values, seeds, steps = QUICK_VALUES, min(seeds, 2), 40
    BASE.update(width=32)
  factors = [f for f in args.factors.split(",") if f] or list(CLASSIC)
  unknown = sorted(set(factors) - set(CLASSIC))
  if unknown:
    p.error(f"--factors: unknown {unknown}; choose among {list(CLASSIC)}")
  t0 = time.time()
  raw = measure(values, seeds, steps, args.workroot, factors)
  command = "python experiments/forgetting_factors.py" + (" --quick" if args.quick else "") + (
      f" --seeds {args.seeds}" if args.seeds != 5 else "") + (f" --steps {args.steps}" if args.steps != 500 else "") + (
      f" --factors {','.join(factors)}" if set(factors) != set(CLASSIC) else "")
  minutes = (time.time() - t0) / 60
  if set(factors) != set(CLASSIC):  # a partial rerun replaces those factors in the saved results
    with open(out + ".json") as f:
      data = json.load(f)
    data["raw"].update(raw)
    data["meta"]["values"].update({f: values[f] for f in factors})
    data["meta"]["minutes"] += minutes
    data["meta"].setdefault("reruns", []).append(command)
    render(data, out)
    return
  meta = {"command": command, "minutes": minutes, "seeds": seeds, "steps": steps, "base": dict(BASE),
          "values": values}
  render({"meta": meta, "raw": raw}, out)


if __name__ == "__main__":
  main()
