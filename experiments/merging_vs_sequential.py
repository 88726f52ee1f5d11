"""Merging task specialists vs training them in sequence, on Split MNIST (5 two-class tasks).

  python experiments/merging_vs_sequential.py                 # MNIST from ../shared/data/mnist.npz
  python experiments/merging_vs_sequential.py --quick         # digits, tiny budgets: a smoke run
  python experiments/merging_vs_sequential.py --mnist PATH --out results/merging.md --workdir runs/merging

Every model is trained by `cl_jax.run` on a config from configs/merging_specialists.py (this script has no training
loop of its own); each run's workdir is kept under --workdir. Protocol. One base model is trained on task 1
(digits 0/1). From that base (`model.init_from = BASE:task=1`), one specialist per remaining task is fine-tuned on
that task alone (`train.tasks = [k]`), twice: all weights (full fine-tune), and a LoRA adapter (Hu et al. 2021,
strategy `lora`) with the base frozen. Then, evaluated on every task's test split:

  sequential       base -> task 2 -> ... -> task 5, all weights (naive fine-tuning, the lower bound)
  sequential+EWC   the same with EWC (Kirkpatrick et al. 2017, strategy `ewc`), lambda chosen on validation
  joint            base trained on the union of all five tasks for the same total number of steps (strategy
                   `joint`, trained on the last task only: its data is every task's)
  linear           the mean of the four full fine-tuned specialists
  task arithmetic  base + lam sum_i tau_i (Ilharco et al. 2023)
  TIES             trim to `density`, elect signs, disjoint mean, times lam (Yadav et al. 2023)
  DARE-TIES        random drop with rescaling instead of the trim (Yu et al. 2024)
  SLERP            the specialists of tasks 2 and 3 only, interpolated with t (two models only)
  LoRA sum         all four adapters folded into the base (task arithmetic on adapters, lam = 1)
  O-LoRA           adapters trained in sequence with the orthogonality penalty (Wang et al. 2023, strategy
                   `olora`), summed
  progressive      one column per task with lateral connections (Rusu et al. 2016, strategy `progressive`); the
                   column is picked by the task label (task-IL) or by the prototype router (class-IL)

Not in this version: "LoRA + routing" (an adapter chosen per input by a router over separately trained LoRA
specialists). The runner has no strategy that routes between the adapters of several runs, and the experiment must
not keep a training loop of its own; `progressive.router` is the routed row that remains.

Everything uses one shared 10-way head (`model.multi_head = False`). Task-IL accuracy masks the logits to the
evaluated task's two classes (the task label is given); class-IL accuracy takes the argmax over all ten classes (no
label). Both are the shared evaluator's rows (cl_jax/eval/evaluator.py) after the last task, on the task-IL and the
class-IL scenario of the same data. Hyperparameters (EWC lambda, O-LoRA lambda1, merge lam / density / t) are chosen
on a validation split held out of each class's training data (`data.validation_fraction`; runs report
`eval.split='validation'`), by average task-IL validation accuracy; the test split is touched only for the
reported numbers. Merges are `cl_jax.merging.merge` on the runs' task-boundary params
(`cl_jax.checkpoint.boundary_params`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import numpy as np

import cl_jax
from cl_jax import checkpoint, merging, sharding
from cl_jax.models import lora as lora_lib
from cl_jax.strategies import olora as olora_lib
from configs import merging_specialists
from experiments.protocol import portable

DEFAULT_MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                             "mnist.npz")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="digits and tiny budgets (smoke run)")
  p.add_argument("--mnist", default=DEFAULT_MNIST)
  p.add_argument("--out", default="results/merging.md")
  p.add_argument("--workdir", default="runs/merging", help="one cl_jax run directory per trained model under it")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--hidden", type=int, nargs="+", help="default 256 256 (--quick: 64 64)")
  p.add_argument("--base_steps", type=int, help="default 500 (--quick: 150)")
  p.add_argument("--steps", type=int, help="steps per specialist / per sequential task; default 300 (--quick: 100)")
  p.add_argument("--batch", type=int, help="default 128 (--quick: 64)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--lora_lr", type=float, default=3e-3)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--val", type=float, default=0.1, help="data.validation_fraction: share of each class held out")
  p.add_argument("--rows", default="all", help="comma-separated row groups to run: " + ",".join(
      ("specialists", "sequential", "ewc", "joint", "merges", "lora", "olora", "progressive")))
  p.add_argument("--report_only", action="store_true", help="rewrite the .md and .png from the saved .json")
  return p.parse_args(argv)


GROUPS = ("specialists", "sequential", "ewc", "joint", "merges", "lora", "olora", "progressive")


def settings(args) -> dict:
  """The arg string for configs/merging_specialists.py shared by every run."""
  if args.quick:
    data = dict(data="digits")
  else:
    if not os.path.isfile(args.mnist):
      raise SystemExit(f"--mnist {args.mnist}: no such file (use --quick for the bundled digits)")
    data = dict(data="mnist", path=os.path.abspath(args.mnist))
  return dict(data, hidden="-".join(str(h) for h in args.hidden), steps=args.steps, batch=args.batch, lr=args.lr,
              rank=args.rank, val=args.val, seed=args.seed)


class Evaluator:
  """Task-IL and class-IL rows of plain params on the validation or test split (the shared evaluator)."""

  def __init__(self, config):
    from cl_jax.data import make_scenario
    from cl_jax.data.sources import load_source
    from cl_jax.eval.evaluator import accuracy_evaluator
    from cl_jax.models import build_model
    from cl_jax.strategies import Learner
    data = load_source(config.data)
    self.mesh = sharding.make_mesh(-1, 1)
    self.scenarios, self.fns = {}, {}
    for kind, split in itertools.product(("task", "class"), ("validation", "test")):
      sc = config.scenario.copy_and_resolve_references()
      sc.kind = kind
      scenario = make_scenario(data, sc, multi_head=False, validation_fraction=config.data.validation_fraction,
                               eval_split=split)
      model, _ = build_model(config.model, scenario.input_shape, scenario.num_outputs, scenario.num_heads,
                             config.seed)
      self.scenarios[kind, split] = scenario
      self.fns[kind, split] = accuracy_evaluator(Learner(model.apply, scenario.logit_mask), self.mesh,
                                                 config.eval.batch_size)

  def __call__(self, params, split="test", kinds=("task", "class")):
    """(task-IL row, class-IL row) of the model after the last task (`kinds` picks which)."""
    params = jax.device_put(params, sharding.replicated(self.mesh))
    rows = []
    for kind in kinds:
      scenario = self.scenarios[kind, split]
      rows.append([float(a) for a in self.fns[kind, split].row(params, scenario, scenario.num_tasks - 1)])
    return tuple(rows)


def main(argv=None):
  args = parse_args(argv)
  if args.report_only:
    with open(os.path.splitext(args.out)[0] + ".json") as f:
      return write_report(json.load(f), args.out)
  defaults = dict(hidden=[64, 64], base_steps=150, steps=100, batch=64) if args.quick else dict(
      hidden=[256, 256], base_steps=500, steps=300, batch=128)
  for key, value in defaults.items():  # what the command line leaves unset
    if getattr(args, key) is None:
      setattr(args, key, value)
  groups = GROUPS if args.rows == "all" else tuple(g.strip() for g in args.rows.split(","))
  unknown = [g for g in groups if g not in GROUPS]
  if unknown:
    raise SystemExit(f"--rows {args.rows}: unknown {unknown}; expected some of {','.join(GROUPS)}")
  t0 = time.time()
  common = settings(args)
  root = os.path.abspath(args.workdir)

  def config(**kw):
    return merging_specialists.get_config(",".join(f"{k}={v}" for k, v in {**common, **kw}.items()))

  def run(name, c):
    print(f"--- {name}", flush=True)
    return cl_jax.run(c, os.path.join(root, name), overwrite=True, progress=False)

  base_config = config(tasks="1", steps=args.base_steps)
  T = base_config.scenario.num_tasks
  later = "-".join(str(k) for k in range(2, T + 1))
  evaluate = Evaluator(base_config)
  run("base", base_config)
  base_ref = os.path.join(root, "base") + ":task=1"
  base = checkpoint.boundary_params(os.path.join(root, "base"), 1)
  results, chosen, grids, validation = {}, {}, {}, {}
  results["base (task 1 only)"] = evaluate(base)

  def pick(name, grid, score):
    """The grid setting with the best mean task-IL validation accuracy (`score(setting)` -> that row)."""
    grids[name] = grid
    validation[name] = [dict(setting=s, val_task_il=float(np.mean(score(s)))) for s in grid]
    best = max(validation[name], key=lambda v: v["val_task_il"])
    chosen[name] = best["setting"]
    print(f"  {name}: chose {best['setting']} (validation task-IL {100 * best['val_task_il']:.1f})")
    return best["setting"]

  specialists = []
  if {"specialists", "merges"} & set(groups):
    for k in range(2, T + 1):
      run(f"specialist_{k}", config(tasks=str(k), init_from=base_ref))
      specialists.append(checkpoint.boundary_params(os.path.join(root, f"specialist_{k}"), k))
      results[f"specialist {k} (full FT)"] = evaluate(specialists[-1])

  if "sequential" in groups:
    run("sequential", config(tasks=later, init_from=base_ref))
    results["sequential"] = evaluate(checkpoint.boundary_params(os.path.join(root, "sequential")))

  if "ewc" in groups:
    def ewc_run(s):
      r = run(f"ewc_lam{s['lam']:g}", config(strategy="ewc", tasks=later, init_from=base_ref, ewc_lam=s["lam"]))
      return np.asarray(r.accuracy_matrix)[-1]
    lam = pick("sequential+EWC", [dict(lam=l) for l in ((1e2, 1e3) if args.quick else (1e2, 1e3, 1e4))], ewc_run)
    results["sequential+EWC"] = evaluate(checkpoint.boundary_params(os.path.join(root, f"ewc_lam{lam['lam']:g}")))

  if "joint" in groups:  # the union of all tasks, (T - 1) x steps, from the base
    run("joint", config(strategy="joint", tasks=str(T), steps=(T - 1) * args.steps, init_from=base_ref))
    results["joint"] = evaluate(checkpoint.boundary_params(os.path.join(root, "joint")))

  if "merges" in groups:
    results["linear"] = evaluate(merging.merge("linear", None, specialists))
    lams = (0.3, 0.5, 0.7, 1.0) if args.quick else (0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)
    for name, method, grid in [
        ("task arithmetic", "task_arithmetic", [dict(lam=l) for l in lams]),
        ("TIES", "ties", [dict(density=d, lam=l) for d, l in itertools.product((0.1, 0.2, 0.5, 0.7),
                                                                               (0.5, 1.0, 1.5, 2.0))]),
        ("DARE-TIES", "dare_ties", [dict(density=d, lam=l, seed=args.seed)
                                    for d, l in itertools.product((0.1, 0.3, 0.5, 0.7), (0.5, 1.0, 1.5, 2.0))])]:
      s = pick(name, grid, lambda s, method=method: evaluate(merging.merge(method, base, specialists, **s),
                                                             "validation", ("task",))[0])
      results[name] = evaluate(merging.merge(method, base, specialists, **s))
    slerp = lambda s: merging.merge("slerp", None, specialists[:2], **s)
    # t chosen on the base's task and the two tasks of the models it merges
    s = pick("SLERP (tasks 2, 3)", [dict(t=t) for t in (0.3, 0.5, 0.7)],
             lambda s: evaluate(slerp(s), "validation", ("task",))[0][:3])
    results["SLERP (tasks 2, 3)"] = evaluate(slerp(s))

  n_adapter = 0
  if "lora" in groups:
    adapted = []
    for k in range(2, T + 1):
      c = config(strategy="lora", tasks=str(k), init_from=base_ref, lr=args.lora_lr)
      run(f"lora_{k}", c)
      p = checkpoint.boundary_params(os.path.join(root, f"lora_{k}"), k)
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p["base"]), jax.tree.leaves(base))), \
          "LoRA changed the base"
      n_adapter = sum(int(np.size(x)) for x in jax.tree.leaves(p["adapters"]))
      adapted.append(lora_lib.merge_adapter(p, "adapter", lora_lib.spec_from_config(c.lora))["base"])
    results["LoRA sum (adapters merged)"] = evaluate(merging.merge("task_arithmetic", base, adapted, lam=1.0))

  if "olora" in groups:
    def olora_params(lambda1):
      c = config(strategy="olora", tasks=later, init_from=base_ref, lr=args.lora_lr, olora_lambda1=lambda1)
      p = checkpoint.boundary_params(os.path.join(root, f"olora_l{lambda1:g}"))
      spec = lora_lib.spec_from_config(c.lora)
      for name in olora_lib.slot_names(T):
        p = lora_lib.merge_adapter(p, name, spec)
      return p["base"]

    def olora_run(s):
      c = config(strategy="olora", tasks=later, init_from=base_ref, lr=args.lora_lr, olora_lambda1=s["lambda1"])
      return np.asarray(run(f"olora_l{s['lambda1']:g}", c).accuracy_matrix)[-1]
    s = pick("O-LoRA (adapters summed)", [dict(lambda1=l) for l in (0.0, 0.1, 0.5, 2.0)], olora_run)
    results["O-LoRA (adapters summed)"] = evaluate(olora_params(s["lambda1"]))
    if s["lambda1"] != 0.0:
      results["sequential LoRA, no orthogonality (lambda1=0)"] = evaluate(olora_params(0.0))

  if "progressive" in groups:  # from scratch, every task; the router only changes evaluation
    rows = [np.asarray(run(f"progressive_{router}", config(strategy="progressive", router=router, split="test"))
                       .accuracy_matrix)[-1].tolist() for router in ("none", "prototypes")]
    results["progressive nets (+ prototype router)"] = tuple(rows)

  record = dict(
      setup=dict(data=common["data"], hidden=args.hidden, base_steps=args.base_steps, steps=args.steps,
                 batch=args.batch, lr=args.lr, lora_lr=args.lora_lr, rank=args.rank, val_fraction=args.val,
                 seed=args.seed, params=sum(int(np.size(x)) for x in jax.tree.leaves(base)),
                 lora_params_per_task=n_adapter, workdir=root),
      results={k: dict(task_il=v[0], class_il=v[1]) for k, v in results.items()},
      chosen=chosen, grids=grids, validation=validation, seconds=time.time() - t0)
  write_report(record, args.out)
  return record


# ----------------------------------------------------------------------------------------------- report

MAIN_ROWS = ["sequential", "sequential+EWC", "joint", "linear", "task arithmetic", "TIES", "DARE-TIES",
             "SLERP (tasks 2, 3)", "LoRA sum (adapters merged)", "O-LoRA (adapters summed)",
             "sequential LoRA, no orthogonality (lambda1=0)",
             "progressive nets (+ prototype router)"]


def write_report(record, out_path):
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  res, su = record["results"], record["setup"]
  T = len(next(iter(res.values()))["task_il"])
  pct = lambda v: f"{100 * v:.1f}"
  lines = [
      "# Merging task specialists vs sequential training (Split MNIST)" if su["data"] == "mnist"
      else "# Merging task specialists vs sequential training (Split digits, --quick smoke run)",
      "",
      "Measured by `python experiments/merging_vs_sequential.py" + (" --quick" if su["data"] != "mnist" else "") +
      f"` (seed {su['seed']}, {record['seconds'] / 60:.1f} min on the shared CPU). Protocol in the script's docstring: "
      "one base trained on task 1 (digits 0/1); one specialist per remaining task fine-tuned from that base "
      "(all weights, or a LoRA adapter); every method evaluated on every task's test split. "
      f"MLP {'-'.join(str(h) for h in [784 if su['data'] == 'mnist' else 64, *su['hidden'], 10])} "
      f"({su['params']:,} params) with one shared 10-way head; Adam, lr {su['lr']} (LoRA {su['lora_lr']}), batch "
      f"{su['batch']}; {su['base_steps']} steps for the base, {su['steps']} per specialist and per sequential task; "
      f"joint runs {(T - 1) * su['steps']} steps on all tasks from the base. LoRA: rank {su['rank']}, alpha "
      f"{2 * su['rank']}, on both hidden layers and the head ({su['lora_params_per_task']:,} params per task, "
      f"{100 * su['lora_params_per_task'] / su['params']:.1f}% of the model).",
      "",
      "**Task-IL** accuracy (%): the task label is given and the logits are masked to its two classes.",
      "",
      "| method | " + " | ".join(f"task {i + 1}" for i in range(T)) + " | **average** | class-IL avg |",
      "|---|" + "---:|" * (T + 2),
  ]
  for name in MAIN_ROWS + [k for k in res if k not in MAIN_ROWS]:
    if name not in res:
      continue
    r = res[name]
    lines.append(f"| {name} | " + " | ".join(pct(a) for a in r["task_il"]) +
                 f" | **{pct(np.mean(r['task_il']))}** | {pct(np.mean(r['class_il']))} |")
  lines += [
      "",
      "**Class-IL** accuracy (%, argmax over all ten classes, no task label) per task:",
      "",
      "| method | " + " | ".join(f"task {i + 1}" for i in range(T)) + " | **average** |",
      "|---|" + "---:|" * (T + 1),
  ]
  for name in MAIN_ROWS:
    if name in res:
      r = res[name]
      lines.append(f"| {name} | " + " | ".join(pct(a) for a in r["class_il"]) +
                   f" | **{pct(np.mean(r['class_il']))}** |")
  lines += [
      "",
      "## Hyperparameters chosen on the validation split",
      "",
      "| method | chosen |",
      "|---|---|",
  ]
  for k, v in record["chosen"].items():
    lines.append(f"| {k} | " + ", ".join(f"{a}={b}" for a, b in v.items()) + " |")
  lines += [
      "",
      "Grids searched (mean task-IL validation accuracy): " +
      "; ".join(f"{k}: {_grid_text(gs)}" for k, gs in record["grids"].items()) +
      ". EWC uses the exact Fisher; TIES and DARE-TIES take the disjoint mean (`normalize=True`); SLERP's t is "
      "chosen on tasks 1-3 (the two models it merges and the base's task). Every trained model is a `cl_jax.run` "
      f"workdir under `{su.get('workdir', 'runs/merging')}`.",
      "",
      "![task-IL and class-IL accuracy per method](merging.png)",
      "",
      "## Observations (computed from the numbers above)",
      "",
      *observations(record),
      "",
  ]
  with open(out_path, "w") as f:
    f.write("\n".join(lines))
  with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
    json.dump(portable(record), f, indent=1)
  plot(record, os.path.splitext(out_path)[0] + ".png")
  print("\n".join(lines))
  print(f"\nwrote {out_path}")


def observations(record) -> list[str]:
  res = record["results"]
  avg = lambda name, kind="task_il": 100 * float(np.mean(res[name][kind]))
  merges = [m for m in ("linear", "task arithmetic", "TIES", "DARE-TIES") if m in res]
  have = lambda *names: all(n in res for n in names)  # --rows runs a subset
  best = max(merges, key=avg) if merges else None
  out = []
  if best and have("sequential", "sequential+EWC", "joint"):
    out += [f"- Best merge of the four full fine-tuned specialists: {best}, {avg(best):.1f}% task-IL, against "
            f"{avg('sequential'):.1f}% for sequential fine-tuning, {avg('sequential+EWC'):.1f}% with EWC and "
            f"{avg('joint'):.1f}% for joint training (the upper bound with access to all data at once).",
            f"- Class-IL (no task label): every single model here is trained with its task's logits masked, so none "
            f"learns to tell tasks apart: {avg('sequential', 'class_il'):.1f}% sequential, "
            f"{avg('joint', 'class_il'):.1f}% joint, {avg(best, 'class_il'):.1f}% {best}."]
  if have("LoRA sum (adapters merged)"):
    out.append(f"- LoRA adapters leave the base bit-for-bit unchanged (asserted in the script). Folding all adapters "
               f"into the base at once (LoRA sum, {record['setup']['lora_params_per_task']:,} adapter parameters per "
               f"task) interferes like an unweighted task arithmetic: {avg('LoRA sum (adapters merged)'):.1f}%.")
  if have("SLERP (tasks 2, 3)"):
    out.append("- SLERP merges only the task-2 and task-3 specialists, so tasks 4 and 5 stay near chance (50%).")
  if "O-LoRA (adapters summed)" in res:
    lam = record["chosen"]["O-LoRA (adapters summed)"]["lambda1"]
    free = "sequential LoRA, no orthogonality (lambda1=0)"
    ref = f", {avg(free):.1f}% without the penalty (lambda1=0)" if free in res else ""
    out.append(f"- O-LoRA (lambda1={lam}; adapters trained in sequence, each on top of the frozen earlier ones, "
               f"summed at inference): {avg('O-LoRA (adapters summed)'):.1f}% task-IL{ref}, vs "
               + (f"{avg('LoRA sum (adapters merged)'):.1f}% when independently trained adapters are summed."
                  if have("LoRA sum (adapters merged)") else "no independent-adapter sum in this run."))
  prog = "progressive nets (+ prototype router)"
  if prog in res:
    out.append(f"- Progressive networks keep every earlier column frozen (zero forgetting by construction): "
               f"{avg(prog):.1f}% task-IL, {avg(prog, 'class_il'):.1f}% class-IL with the prototype router "
               "picking the column.")
  out.append(f"- One seed ({record['setup']['seed']}): differences of a point or so between methods are within "
             "what a different seed could change; seed variance was not measured.")
  edge = []
  for k, grid in record["grids"].items():
    for key in grid[0]:
      values = sorted(dict.fromkeys(g[key] for g in grid))
      if len(values) > 1 and record["chosen"][k][key] in (values[0], values[-1]):
        edge.append(f"{k} {key}={record['chosen'][k][key]}")
  if edge:
    out.append("- Chosen at the edge of its grid (a wider grid might do better): " + ", ".join(edge) + ".")
  return out


def _grid_text(grid) -> str:
  keys = [k for k in grid[0] if k != "seed"]
  return " x ".join(f"{k} {{{', '.join(str(v) for v in dict.fromkeys(g[k] for g in grid))}}}" for k in keys)


def plot(record, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  res = record["results"]
  names = [n for n in MAIN_ROWS if n in res]
  til = [100 * np.mean(res[n]["task_il"]) for n in names]
  cil = [100 * np.mean(res[n]["class_il"]) for n in names]
  short = {"sequential LoRA, no orthogonality (lambda1=0)": "O-LoRA, lambda1=0",
           "progressive nets (+ prototype router)": "progressive nets", "LoRA sum (adapters merged)": "LoRA sum",
           "O-LoRA (adapters summed)": "O-LoRA"}
  fig, ax = plt.subplots(figsize=(10, 4.6))
  x = np.arange(len(names))
  ax.bar(x - 0.2, til, 0.4, label="task-IL (task label given)", color="#4477aa")
  ax.bar(x + 0.2, cil, 0.4, label="class-IL (no task label)", color="#ee7733")
  for i, n in enumerate(names):
    ax.scatter(np.full(len(res[n]["task_il"]), i - 0.2), 100 * np.asarray(res[n]["task_il"]), s=8, color="k", zorder=3)
  ax.set_xticks(x, [short.get(n, n) for n in names], rotation=30, ha="right")
  ax.set_ylabel("test accuracy (%), mean of 5 tasks")
  ax.set_ylim(0, 115)
  ax.set_yticks(range(0, 101, 20))
  ax.legend(loc="upper center", ncol=2, frameon=False)
  data = "Split MNIST" if record["setup"]["data"] == "mnist" else "Split digits (--quick)"
  ax.set_title(f"{data}: merging specialists vs sequential training (dots: task-IL per task)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
