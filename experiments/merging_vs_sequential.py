"""Merging task specialists vs training them in sequence, on Split MNIST (5 two-class tasks).

  python experiments/merging_vs_sequential.py                 # MNIST from ../shared/data/mnist.npz (~10 min, 2 cores)
  python experiments/merging_vs_sequential.py --quick         # digits, tiny budgets: a smoke run
  python experiments/merging_vs_sequential.py --mnist PATH --out results/merging.md

Protocol. One base model is trained on task 1 (digits 0/1). From that base, one specialist per remaining
task is fine-tuned on that task alone, twice: all weights (full fine-tune), and a LoRA adapter (Hu et al.
2021) with the base frozen. Then, evaluated on every task's test split:

  sequential       base -> task 2 -> ... -> task 5, all weights (naive fine-tuning, the lower bound)
  sequential+EWC   the same with EWC (Kirkpatrick et al. 2017), lambda chosen on validation
  joint            base trained on the union of all five tasks for the same total number of steps
  linear           the mean of the four full fine-tuned specialists
  task arithmetic  base + lam sum_i tau_i (Ilharco et al. 2023)
  TIES             trim to `density`, elect signs, disjoint mean, times lam (Yadav et al. 2023)
  DARE-TIES        random drop with rescaling instead of the trim (Yu et al. 2024)
  SLERP            the specialists of tasks 2 and 3 only, interpolated with t (two models only)
  LoRA sum         all four adapters folded into the base (task arithmetic on adapters)
  LoRA + routing   the adapter chosen per input by a task router (cl_jax.routing), no task label
  O-LoRA           adapters trained in sequence with the orthogonality penalty (Wang et al. 2023), summed
  progressive      one column per task with lateral connections (Rusu et al. 2016); the column is picked
                   by the task label (task-IL) or by the pixel-space router (class-IL)

Everything uses one shared 10-way head. Task-IL accuracy masks the logits to the evaluated task's two
classes (the task label is given); class-IL accuracy takes the argmax over all ten classes (no label).
Hyperparameters (EWC lambda, merge lam / density / t, router) are chosen on a validation split held out
of each task's training data (`--val` examples per task), by average task-IL validation accuracy (the
router by validation class-IL accuracy); the test split is touched only for the reported numbers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cl_jax import merging, routing  # noqa: E402
from cl_jax.config import base_config  # noqa: E402
from cl_jax.data import make_scenario  # noqa: E402
from cl_jax.data.sources import load_digits, load_mnist_npz  # noqa: E402
from cl_jax.losses import MASK_VALUE  # noqa: E402
from cl_jax.models import build_model, lora, param_count  # noqa: E402
from cl_jax.models import progressive as prog  # noqa: E402
from cl_jax.strategies import olora as olora_lib  # noqa: E402
from cl_jax.strategies import Learner, LossContext, TaskData, TaskInfo, naive  # noqa: E402
from cl_jax.strategies.ewc import ewc  # noqa: E402
from cl_jax.train.optim import build_optimizer  # noqa: E402
from cl_jax.train.step import task_loss  # noqa: E402

DEFAULT_MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                             "mnist.npz")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="digits and tiny budgets (smoke run)")
  p.add_argument("--mnist", default=DEFAULT_MNIST)
  p.add_argument("--out", default="results/merging.md")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
  p.add_argument("--base_steps", type=int, default=500)
  p.add_argument("--steps", type=int, default=300, help="steps per specialist / per sequential task")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--lora_lr", type=float, default=3e-3)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--val", type=int, default=1000, help="validation examples held out per task")
  p.add_argument("--report_only", action="store_true", help="rewrite the .md and .png from the saved .json")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- data

def load_tasks(args):
  """Split MNIST (task-IL labels in one 10-way head) with a per-task validation split."""
  if args.quick:
    data = load_digits(args.seed)
  else:
    if not os.path.isfile(args.mnist):
      raise SystemExit(f"--mnist {args.mnist}: no such file (use --quick for the bundled digits)")
    data = load_mnist_npz(args.mnist)
  sc = ml_collections.ConfigDict(dict(name="split", kind="task", num_tasks=5, class_order=[],
                                      shuffle_classes=False, seed=0))
  scenario = make_scenario(data, sc, multi_head=False)
  rng = np.random.default_rng(args.seed)
  tasks = []
  for t in scenario.tasks:
    perm = rng.permutation(t.num_train)
    n_val = min(args.val, t.num_train // 5)
    va, tr = perm[:n_val], perm[n_val:]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)
    tasks.append(dict(
        index=t.index, classes=t.classes,
        train=(flat(t.x_train[tr]), t.y_train[tr], np.full(len(tr), t.index, np.int32)),
        val=(flat(t.x_train[va]), t.y_train[va], np.full(len(va), t.index, np.int32)),
        test=(flat(t.x_test), t.y_test, np.full(len(t.y_test), t.index, np.int32))))
  return scenario, tasks


# --------------------------------------------------------------------------------------------- training

def optim_config(lr):
  c = base_config().optim
  c.unlock()
  c.name, c.lr = "adam", lr
  return c


def train(params, learner, tasks, task_ids, steps, args, lr, *, strategy=None, sstate=(), trainable=None,
          task_index=0, seed=0):
  """Adam on the union of `task_ids`' training data; the lead's masked task loss, optional strategy."""
  loss_fn = task_loss(learner)
  if strategy is not None:
    loss_fn = strategy.loss(loss_fn)
  opt = build_optimizer(optim_config(lr), optax.constant_schedule(lr), trainable)
  x = np.concatenate([tasks[i]["train"][0] for i in task_ids])
  y = np.concatenate([tasks[i]["train"][1] for i in task_ids])
  tk = np.concatenate([tasks[i]["train"][2] for i in task_ids])

  @jax.jit
  def step(params, opt_state, batch, key):
    ctx = LossContext(sstate, key, jnp.int32(task_index))
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, ctx)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  opt_state = opt.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for i in range(steps):
    idx = rng.integers(0, len(y), args.batch)
    params, opt_state, loss = step(params, opt_state, {"x": x[idx], "y": y[idx], "task": tk[idx]},
                                   jax.random.fold_in(key, i))
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"non-finite loss {float(loss)} while training tasks {task_ids}")
  return params


# ------------------------------------------------------------------------------------------- evaluation

def make_eval(apply_fn, masks):
  @jax.jit
  def logits(params, x):
    return apply_fn(params, x)

  def evaluate(params, tasks, split):
    """(task-IL accuracy per task, class-IL accuracy per task) on `split`."""
    til, cil = [], []
    for t in tasks:
      x, y, _ = t[split]
      out = logits(params, x)
      til.append(float(jnp.mean(jnp.argmax(jnp.where(masks[t["index"]], out, MASK_VALUE), -1) == y)))
      cil.append(float(jnp.mean(jnp.argmax(out, -1) == y)))
    return til, cil

  return evaluate


def grid_search(name, make, grid, evaluate, tasks):
  """Best setting by mean task-IL validation accuracy: (setting, model, [(setting, val acc)])."""
  best, trace = None, []
  for setting in grid:
    model = make(**setting)
    acc = float(np.mean(evaluate(model, tasks, "val")[0]))
    trace.append((setting, acc))
    if best is None or acc > best[1]:
      best = (setting, acc, model)
  print(f"  {name}: chose {best[0]} (val task-IL {100 * best[1]:.1f})")
  return best[0], best[2], trace


# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
  args = parse_args(argv)
  if args.report_only:
    with open(os.path.splitext(args.out)[0] + ".json") as f:
      return write_report(json.load(f), args.out)
  if args.quick:
    args.hidden, args.base_steps, args.steps, args.val = [64, 64], 150, 100, 60
  t0 = time.time()
  scenario, tasks = load_tasks(args)
  T = len(tasks)
  masks = jnp.asarray(scenario.mask_table)  # [T, 10]: the classes of each task
  mcfg = ml_collections.ConfigDict(dict(name="mlp", hidden=list(args.hidden)))
  model, init = build_model(mcfg, scenario.input_shape, scenario.num_outputs, 1, args.seed)
  learner = Learner(model.apply, scenario.logit_mask)
  evaluate = make_eval(lambda p, x: model.apply(p, x), masks)
  print(f"Split {'digits' if args.quick else 'MNIST'}: {T} tasks, {param_count(init):,} params; "
        f"train/val/test per task ~{len(tasks[1]['train'][1])}/{len(tasks[1]['val'][1])}/{len(tasks[1]['test'][1])}")

  # Base on task 1, full fine-tuned specialists on tasks 2..5.
  base = train(init, learner, tasks, [0], args.base_steps, args, args.lr, seed=args.seed)
  specialists = [train(base, learner, tasks, [k], args.steps, args, args.lr, task_index=k, seed=args.seed + k)
                 for k in range(1, T)]
  print(f"base + {T - 1} specialists trained ({time.time() - t0:.0f}s)")

  results, chosen = {}, {}
  results["base (task 1 only)"] = evaluate(base, tasks, "test")
  for k, s in enumerate(specialists, start=1):
    results[f"specialist {k + 1} (full FT)"] = evaluate(s, tasks, "test")

  # Sequential fine-tuning, with and without EWC.
  def sequential(strategy=None, cfg=None):
    params, sstate = base, ()
    if strategy is not None:
      sstate = strategy.init(params, TaskInfo(T, scenario.num_outputs, scenario.input_shape))
      x, y, tk = tasks[0]["train"]
      sstate = strategy.after_task(sstate, params, TaskData(x, y, tk, 0), jax.random.key(0))
    for k in range(1, T):
      params = train(params, learner, tasks, [k], args.steps, args, args.lr, strategy=strategy, sstate=sstate,
                     task_index=k, seed=args.seed + k)
      if strategy is not None:
        x, y, tk = tasks[k]["train"]
        sstate = strategy.after_task(sstate, params, TaskData(x, y, tk, k), jax.random.key(k))
    return params

  results["sequential"] = evaluate(sequential(naive()), tasks, "test")

  def make_ewc(lam):
    cfg = base_config()
    cfg.ewc.lam = float(lam)
    cfg.fisher.kind = "exact"
    cfg.fisher.num_samples = 500 if args.quick else 2000
    return sequential(ewc(cfg, learner))

  ewc_grid = [dict(lam=l) for l in ((1e2, 1e3, 1e4) if not args.quick else (1e2, 1e3))]
  grids = {"sequential+EWC": ewc_grid}
  chosen["sequential+EWC"], ewc_model, _ = grid_search("sequential+EWC", make_ewc, ewc_grid, evaluate, tasks)
  results["sequential+EWC"] = evaluate(ewc_model, tasks, "test")
  results["joint"] = evaluate(train(base, learner, tasks, list(range(T)), (T - 1) * args.steps, args, args.lr,
                                    task_index=T - 1, seed=args.seed + 99), tasks, "test")
  print(f"sequential / EWC / joint done ({time.time() - t0:.0f}s)")

  # Merges of the full fine-tuned specialists.
  results["linear"] = evaluate(merging.merge("linear", None, specialists), tasks, "test")
  lams = (0.3, 0.5, 0.7, 1.0) if args.quick else (0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)
  for name, method, grid in [
      ("task arithmetic", "task_arithmetic", [dict(lam=l) for l in lams]),
      ("TIES", "ties", [dict(density=d, lam=l) for d, l in itertools.product((0.1, 0.2, 0.5, 0.7), (0.5, 1.0, 1.5, 2.0))]),
      ("DARE-TIES", "dare_ties", [dict(density=d, lam=l, seed=args.seed)
                                  for d, l in itertools.product((0.1, 0.3, 0.5, 0.7), (0.5, 1.0, 1.5, 2.0))]),
  ]:
    grids[name] = grid
    chosen[name], m, _ = grid_search(name, lambda method=method, **kw: merging.merge(method, base, specialists, **kw),
                                     grid, evaluate, tasks)
    results[name] = evaluate(m, tasks, "test")
  grids["SLERP (tasks 2, 3)"] = [dict(t=t) for t in (0.3, 0.5, 0.7)]
  chosen["SLERP (tasks 2, 3)"], m, _ = grid_search(
      "SLERP (tasks 2, 3)", lambda t: merging.merge("slerp", None, specialists[:2], t=t),
      grids["SLERP (tasks 2, 3)"], lambda p, ts, s: evaluate(p, ts[:3], s), tasks)
  results["SLERP (tasks 2, 3)"] = evaluate(m, tasks, "test")
  print(f"merges done ({time.time() - t0:.0f}s)")

  # LoRA specialists from the same base; the head gets an adapter too (it is shared by all tasks).
  spec = lora.LoraSpec(targets=("dense_*", "head"), rank=args.rank, alpha=2.0 * args.rank)
  lm = lora.LoraModel(model, spec)
  lp = lora.lora_params(base)
  names = [f"task_{k + 1}" for k in range(1, T)]
  for k, name in zip(range(1, T), names):
    lp = lora.add_adapter(lp, name, jax.random.key(100 + k), spec)
    lp = train(lp, Learner(lm.bind(name), scenario.logit_mask), tasks, [k], args.steps, args, args.lora_lr,
               trainable=lora.trainable_mask(lp, name), task_index=k, seed=args.seed + k)
  assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(lp["base"]), jax.tree.leaves(base)))
  n_adapter = lora.num_adapter_params(lp["adapters"][names[0]])
  summed = lp
  for name in names:
    summed = lora.merge_adapter(summed, name, spec)
  results["LoRA sum (adapters merged)"] = evaluate(summed["base"], tasks, "test")

  # Routing over {base for task 1, adapter k for task k}: K forward passes, pick one per input.
  @jax.jit
  def all_logits(lp, x):
    outs = [lm.apply(lp, x)] + [lm.apply(lp, x, adapter=n) for n in names]
    return jnp.stack(outs)

  @jax.jit
  def all_features(lp, x):
    return [lm.apply(lp, x, method="features")] + [lm.apply(lp, x, adapter=n, method="features") for n in names]

  def fit_router(kind, shrinkage):
    feats, labels = [], []
    for k, t in enumerate(tasks):
      x, y, _ = t["train"]
      x, y = x[:3000], y[:3000]
      f = all_features(lp, x)
      feats.append(x if kind == "input" else np.asarray(f[0] if kind == "base" else f[k]))
      labels.append(y)
    return routing.fit_prototypes(feats, labels, shrinkage=shrinkage, per_task=(kind == "per-task"))

  def routed(router, kind, split):
    """Per task: (routing accuracy, class-IL accuracy, task-IL accuracy with the true route)."""
    out = []
    for t in tasks:
      x, y, tk = t[split]
      logits = all_logits(lp, x)
      if kind == "entropy":
        route = routing.route_entropy(logits, masks)
      else:
        f = all_features(lp, x)
        route = routing.route_prototypes(router, x if kind == "input" else f[0] if kind == "base" else f)
      out.append(routing.evaluate_routing(logits, route, tk, y, masks))
    return out

  router_grid = [("entropy", None)] + [(k, s) for k in ("input", "base", "per-task") for s in (0.001, 0.01, 0.1, 0.5)]
  best = None
  router_trace = []
  for kind, s in router_grid:
    router = None if kind == "entropy" else fit_router(kind, s)
    val = routed(router, kind, "val")
    acc = float(np.mean([r.class_il_accuracy for r in val]))
    router_trace.append(dict(router=kind, shrinkage=s, val_routing=float(np.mean([r.routing_accuracy for r in val])),
                             val_class_il=acc))
    if best is None or acc > best[0]:
      best = (acc, kind, s, router)
  _, kind, s, router = best
  chosen["LoRA + routing"] = dict(router=kind, shrinkage=s)
  print(f"  router: chose {kind} (shrinkage {s}), val class-IL {100 * best[0]:.1f}")
  test_routed = routed(router, kind, "test")
  results["LoRA + routing"] = ([r.task_il_accuracy for r in test_routed], [r.class_il_accuracy for r in test_routed])
  routing_acc = [r.routing_accuracy for r in test_routed]
  # The routers not chosen, on test, for the record.
  router_test = {}
  def best_shrinkage(kd):
    return max((r for r in router_trace if r["router"] == kd), key=lambda r: r["val_class_il"])["shrinkage"]

  for kd, sh in [("entropy", None)] + [(k, best_shrinkage(k)) for k in ("input", "base", "per-task")]:
    rt = routed(None if kd == "entropy" else fit_router(kd, sh), kd, "test")
    router_test[kd] = dict(shrinkage=sh, routing=float(np.mean([r.routing_accuracy for r in rt])),
                           class_il=float(np.mean([r.class_il_accuracy for r in rt])))
  print(f"LoRA + routing done ({time.time() - t0:.0f}s)")

  # O-LoRA: adapters trained in sequence, each orthogonal to the earlier ones, summed at inference (no
  # task label). Slot k serves task k; slot 0 stays the identity (the base learnt task 1).
  def make_olora(lambda1):
    cfg = ml_collections.ConfigDict({"olora": olora_lib.default_config(), "lora": lora.default_config()})
    cfg.olora.lambda1 = float(lambda1)
    cfg.lora.update(targets="dense_*,head", rank=args.rank, alpha=float(spec.alpha))  # the adapters' own spec
    strategy = olora_lib.olora(cfg)
    params = olora_lib.init_olora_params(base, T, jax.random.key(7), spec)
    sstate = strategy.init(params, TaskInfo(T, scenario.num_outputs, scenario.input_shape))
    olearner = Learner(lm.bind(olora_lib.slot_names(T)), scenario.logit_mask)
    for k in range(1, T):
      params = train(params, olearner, tasks, [k], args.steps, args, args.lora_lr, strategy=strategy,
                     sstate=sstate, trainable=lora.trainable_mask(params, olora_lib.slot_name(k)), task_index=k,
                     seed=args.seed + k)
      x, y, tk = tasks[k]["train"]
      sstate = strategy.after_task(sstate, params, TaskData(x, y, tk, k), jax.random.key(k))
    merged = params
    for name in olora_lib.slot_names(T):
      merged = lora.merge_adapter(merged, name, spec)
    return merged["base"]

  grids["O-LoRA (adapters summed)"] = [dict(lambda1=l) for l in (0.0, 0.1, 0.5, 2.0)]
  chosen["O-LoRA (adapters summed)"], m, olora_trace = grid_search(
      "O-LoRA", make_olora, grids["O-LoRA (adapters summed)"], evaluate, tasks)
  results["O-LoRA (adapters summed)"] = evaluate(m, tasks, "test")
  if chosen["O-LoRA (adapters summed)"]["lambda1"] != 0.0:
    results["sequential LoRA, no orthogonality (lambda1=0)"] = evaluate(make_olora(0.0), tasks, "test")

  # Progressive networks: one column per task, laterals from earlier columns; the task label picks the
  # column (task-IL), the pixel-space router picks it without one (class-IL).
  pspec = prog.ProgressiveSpec(int(np.prod(scenario.input_shape)), tuple(args.hidden), scenario.num_outputs)
  pmodel, pparams = prog.build_progressive(pspec, seed=args.seed)
  for k in range(T):
    if k:
      pmodel, pparams = prog.add_column(pspec, pparams, seed=args.seed + k)
    pparams = train(pparams, Learner(pmodel.apply, scenario.logit_mask), tasks, [k],
                    args.base_steps if k == 0 else args.steps, args, args.lr,
                    trainable=prog.trainable_mask(pparams, k), task_index=k, seed=args.seed + k)
  col_logits = jax.jit(lambda p, x: pmodel.apply(p, x, method="column_logits"))
  prouter = fit_router("input", best_shrinkage("input"))
  prog_til, prog_cil = [], []
  for t in tasks:
    x, y, tk = t["test"]
    logits = col_logits(pparams, x)
    rep = routing.evaluate_routing(logits, routing.route_prototypes(prouter, x), tk, y, masks)
    prog_til.append(rep.task_il_accuracy)
    prog_cil.append(rep.class_il_accuracy)
  results["progressive nets (+ pixel router)"] = (prog_til, prog_cil)
  prog_counts = prog.column_param_counts(pparams)
  print(f"O-LoRA and progressive nets done ({time.time() - t0:.0f}s)")

  record = dict(
      setup=dict(data="digits" if args.quick else "mnist", hidden=args.hidden, base_steps=args.base_steps,
                 steps=args.steps, batch=args.batch, lr=args.lr, lora_lr=args.lora_lr, rank=args.rank,
                 val_per_task=args.val, seed=args.seed, params=param_count(base), lora_params_per_task=n_adapter),
      results={k: dict(task_il=v[0], class_il=v[1]) for k, v in results.items()},
      chosen=chosen, grids={k: [dict(v) for v in g] for k, g in grids.items()},
      fisher_samples=500 if args.quick else 2000, progressive_params=prog_counts,
      olora_val=[dict(setting=a, val_task_il=b) for a, b in olora_trace], routing_accuracy=routing_acc, routers_test=router_test, routers_val=router_trace,
      seconds=time.time() - t0)
  write_report(record, args.out)
  return record


# ----------------------------------------------------------------------------------------------- report

MAIN_ROWS = ["sequential", "sequential+EWC", "joint", "linear", "task arithmetic", "TIES", "DARE-TIES",
             "SLERP (tasks 2, 3)", "LoRA sum (adapters merged)", "O-LoRA (adapters summed)",
             "sequential LoRA, no orthogonality (lambda1=0)", "LoRA + routing",
             "progressive nets (+ pixel router)"]


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
      lines.append(f"| {name} | " + " | ".join(pct(a) for a in r["class_il"]) + f" | **{pct(np.mean(r['class_il']))}** |")
  ra = record["routing_accuracy"]
  lines += [
      "",
      "## Routing (LoRA adapters as a class-IL system)",
      "",
      f"Router chosen on validation class-IL accuracy: `{record['chosen']['LoRA + routing']}`. Routing accuracy "
      "(the right specialist picked) on test, per task: " + ", ".join(pct(a) for a in ra) +
      f" (mean {pct(np.mean(ra))}). End-to-end class-IL accuracy {pct(np.mean(res['LoRA + routing']['class_il']))} "
      f"vs {pct(np.mean(res['LoRA + routing']['task_il']))} with the true task (the oracle router).",
      "",
      "| router (test) | routing acc | class-IL acc |",
      "|---|---:|---:|",
  ]
  labels = {"entropy": "lowest predictive entropy", "input": "Mahalanobis on the input pixels (tied covariance)",
            "base": "Mahalanobis on base features (tied covariance)",
            "per-task": "Mahalanobis on each specialist's own features"}
  for k, v in record["routers_test"].items():
    sh = "" if v["shrinkage"] is None else f", shrinkage {v['shrinkage']}"
    lines.append(f"| {labels[k]}{sh} | {pct(v['routing'])} | {pct(v['class_il'])} |")
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
      f". EWC uses the exact Fisher on {record['fisher_samples']:,} examples per task; TIES and DARE-TIES take "
      "the disjoint mean (`normalize=True`); SLERP's t is chosen on tasks 1-3 (the two models it merges and the "
      "base's task). Router: {lowest entropy, Mahalanobis on input pixels / base features / per-specialist "
      "features} x shrinkage {0.001, 0.01, 0.1, 0.5}, chosen by validation class-IL accuracy; the table above "
      "gives each kind at its best validation shrinkage.",
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
    json.dump(record, f, indent=1)
  plot(record, os.path.splitext(out_path)[0] + ".png")
  print("\n".join(lines))
  print(f"\nwrote {out_path}")


def observations(record) -> list[str]:
  res = record["results"]
  avg = lambda name, kind="task_il": 100 * float(np.mean(res[name][kind]))
  merges = ["linear", "task arithmetic", "TIES", "DARE-TIES"]
  best = max(merges, key=avg)
  out = [
      f"- Best merge of the four full fine-tuned specialists: {best}, {avg(best):.1f}% task-IL, against "
      f"{avg('sequential'):.1f}% for sequential fine-tuning, {avg('sequential+EWC'):.1f}% with EWC and "
      f"{avg('joint'):.1f}% for joint training (the upper bound with access to all data at once).",
      f"- LoRA adapters leave the base bit-for-bit unchanged (asserted in the script), so the task-1 accuracy "
      f"with routing is the base's own up to routing errors; with the true task label the adapter library "
      f"reaches {avg('LoRA + routing'):.1f}% task-IL at {record['setup']['lora_params_per_task']:,} parameters "
      "per task. Folding all adapters into the base at once (LoRA sum) interferes like an unweighted task "
      f"arithmetic: {avg('LoRA sum (adapters merged)'):.1f}%.",
      f"- Class-IL (no task label): every single model here is trained with its task's logits masked, so none "
      f"learns to tell tasks apart: {avg('sequential', 'class_il'):.1f}% sequential, "
      f"{avg('joint', 'class_il'):.1f}% joint, {avg(best, 'class_il'):.1f}% {best}. Routing over the LoRA "
      f"specialists reaches {avg('LoRA + routing', 'class_il'):.1f}% with "
      f"{100 * float(np.mean(record['routing_accuracy'])):.1f}% routing accuracy; lowest predictive entropy is "
      f"a poor router ({100 * record['routers_test']['entropy']['routing']:.1f}%): specialists trained on two "
      "classes are confident on inputs from other tasks too.",
      "- SLERP merges only the task-2 and task-3 specialists, so tasks 4 and 5 stay near chance (50%).",
  ]
  if "O-LoRA (adapters summed)" in res:
    lam = record["chosen"]["O-LoRA (adapters summed)"]["lambda1"]
    free = "sequential LoRA, no orthogonality (lambda1=0)"
    ref = f", {avg(free):.1f}% without the penalty (lambda1=0)" if free in res else ""
    out.append(f"- O-LoRA (lambda1={lam}; adapters trained in sequence, each on top of the frozen earlier ones, "
               f"summed at inference): {avg('O-LoRA (adapters summed)'):.1f}% task-IL{ref}, vs "
               f"{avg('LoRA sum (adapters merged)'):.1f}% when independently trained adapters are summed.")
  if "progressive_params" in record:
    pc = record["progressive_params"]
    out.append(f"- Progressive networks keep every earlier column frozen (zero forgetting by construction): "
               f"{avg('progressive nets (+ pixel router)'):.1f}% task-IL, "
               f"{avg('progressive nets (+ pixel router)', 'class_il'):.1f}% class-IL with the pixel router. "
               "Parameters added per task (own layers + laterals from every earlier column): " +
               ", ".join(f"{n:,}" for n in pc) + f"; {sum(pc):,} in all after {len(pc)} tasks, "
               f"{sum(pc) / record['setup']['params']:.1f}x one MLP (LoRA library: "
               f"{record['setup']['params'] + (len(pc) - 1) * record['setup']['lora_params_per_task']:,}).")
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
           "progressive nets (+ pixel router)": "progressive nets", "LoRA sum (adapters merged)": "LoRA sum",
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
