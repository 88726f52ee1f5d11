"""cl_jax side by side with Avalanche 0.6 on the same Split MNIST protocol: accuracy, wall and CPU time in one run.

  python benchmarks/vs_avalanche.py --data_path ../shared/data/mnist.npz --repeats 2     # writes results/vs_avalanche.md
  python benchmarks/vs_avalanche.py --data_path ../shared/data/mnist.npz --iters 50 --out /tmp/smoke.md   # smoke run

Needs `avalanche-lib==0.6.0` (and PyTorch) installed next to cl_jax; neither is a cl_jax dependency and the test
suite never imports this file. Each library's run is a fresh subprocess of this script (`--worker`), so neither
library's imports, thread pools or caches leak into the other's timing.

The protocol (van de Ven & Tolias 2019 Split MNIST, class-incremental), identical on both sides:
  - 5 tasks of 2 classes (0/1, 2/3, 4/5, 6/7, 8/9), one 10-way head, no task labels at test time;
  - MLP 784-400-400-10, ReLU; Adam lr 1e-3 (betas 0.9/0.999, eps 1e-8); batch 128; exactly `--iters` (2000)
    iterations per task; pixels scaled to [0, 1]; the real MNIST from `--data_path` (a Keras-format mnist.npz);
  - evaluation on all five tasks' test sets (eval batch 1000) before training, every `--eval_every` (500)
    iterations and at the end of each task: 21 evaluations of 10,000 images per run, as configs/split_mnist.py does;
  - strategies: naive; EWC (λ = `--lam` on both sides, one penalty per past task); LwF (α = 1, T = 2); experience
    replay (a 1000-example buffer filled at task ends, 128 replayed examples added to each 128-example batch).

cl_jax runs through `cl_jax.run(config, workdir)` with configs/split_mnist.py at its defaults (logging every 50
steps, metrics.jsonl every step, TensorBoard, checkpoints every 1000 steps, the report PNGs), twice: with an empty
persistent compilation cache ("cold": XLA compilation included) and again on the cache the first run filled
("warm"). Avalanche runs with `torch.set_num_threads(1)` and with 2 threads. Avalanche's strategies train for a
number of epochs; to get exactly `--iters` iterations a plugin counts iterations and calls `stop_training()` after
the last one (train_epochs is set high enough never to bind), and the same plugin runs the evaluations at the
cl_jax schedule (Avalanche's own periodic evaluation is off). Avalanche's evaluator records top-1 accuracy per
experience and has no loggers (no progress bars), its fastest set-up.

Timed region, both sides: from reading mnist.npz to the last evaluation (cl_jax: the `cl_jax.run` call, which
also builds the model, compiles, writes checkpoints and reports; Avalanche: building the benchmark from tensors,
the model, the strategy, training and evaluation). Python/library imports are outside it and reported separately
(the subprocess's whole CPU time, from `resource.getrusage(RUSAGE_CHILDREN)`, includes them). CPU time is the
process's (all threads) `time.process_time()`. On a shared machine CPU time is steadier than wall time; the
verdict uses the CPU-time ratio cl_jax (cold, compilation included) / Avalanche (the lower of its 1- and 2-thread
CPU times), goal <= 0.25.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("naive", "ewc", "lwf", "replay")
GOAL = 0.25
REPLAY_CAPACITY = 1000
LWF_ALPHA, LWF_T = 1.0, 2.0


def schedule(iters: int, eval_every: int) -> tuple[int, int]:
  """(evaluation interval, checkpoint interval): the config's 500 / 1000 at 2000 iterations, scaled for smoke runs."""
  if iters >= 2000:
    return eval_every, 1000
  return max(1, iters // 4), max(1, iters // 2)


# ------------------------------------------------------------------------------------------- the compute floor

FWD_MACS = 784 * 400 + 400 * 400 + 400 * 10  # multiply-adds of one example's forward pass through the MLP


def train_flops(strategy: str, iters: int, evals: int) -> float:
  """FLOPs of the run's arithmetic, the same on both sides: a train step is ~3 forward passes per example (forward,
  and the backward's weight and input gradients), 2 FLOPs a multiply-add; replay trains on 128 + 128 examples from
  the second task on, LwF adds the teacher's forward there; every evaluation is a forward pass over 10,000 test
  images. EWC's Fisher (computed once per task) is left out, so for EWC this is an underestimate."""
  step = 3 * 2 * FWD_MACS
  later = 4 * iters  # iterations of tasks 2..5
  flops = 5 * iters * 128 * step + evals * 10_000 * 2 * FWD_MACS
  if strategy == "replay":
    flops += later * 128 * step
  if strategy == "lwf":
    flops += later * 128 * 2 * FWD_MACS
  return flops


def worker_peak(a) -> dict:
  """FLOPs per CPU-second of a jitted 1024 x 784 x 400 float32 matmul, the MLP's largest layer at a large batch:
  the best rate one core reaches on this workload's shapes (process CPU time, so load from others barely matters)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.PRNGKey(0), (1024, 784), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(1), (784, 400), jnp.float32)
  f = jax.jit(lambda x, w: x @ w)
  f(x, w).block_until_ready()
  rates = []
  for _ in range(5):
    c = time.process_time()
    for _ in range(200):
      f(x, w).block_until_ready()
    rates.append(200 * 2 * 1024 * 784 * 400 / (time.process_time() - c))
  return {"flops_per_cpu_s": statistics.median(rates)}


# ----------------------------------------------------------------------------------------------- cl_jax worker

def worker_cl_jax(a) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["CL_JAX_COMPILATION_CACHE"] = a.cache_dir
  t_imp, c_imp = time.perf_counter(), time.process_time()
  import cl_jax
  from configs.split_mnist import get_config
  imports = (time.perf_counter() - t_imp, time.process_time() - c_imp)
  c = get_config(f"scenario=class,strategy={a.strategy}")
  c.data.path = os.path.abspath(a.data_path)
  c.train.steps_per_task = a.iters
  c.eval.every_steps, c.checkpoint.every_steps = schedule(a.iters, a.eval_every)
  c.ewc.lam = a.lam
  c.distill.alpha, c.distill.temperature = LWF_ALPHA, LWF_T
  c.replay.capacity, c.replay.batch_size = REPLAY_CAPACITY, 128
  workdir = tempfile.mkdtemp(prefix="vs_avalanche_cl_jax_")
  try:
    t, cpu = time.perf_counter(), time.process_time()
    res = cl_jax.run(c, workdir)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    with open(os.path.join(workdir, "results.json")) as f:
      timing = json.load(f).get("timing", {})
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  rows = [list(map(float, r)) for r in res.accuracy_matrix]
  return {"acc": float(res.acc), "matrix": rows, "wall": wall, "cpu": cpu, "import_wall": imports[0],
          "import_cpu": imports[1], "task_seconds": timing.get("task_seconds"),
          "settings": {"ewc.lam": c.ewc.lam, "fisher.kind": c.fisher.kind, "ewc.online": c.ewc.online,
                       "replay": dict(c.replay), "distill": dict(c.distill), "eval.every_steps": c.eval.every_steps,
                       "checkpoint.every_steps": c.checkpoint.every_steps}}


# -------------------------------------------------------------------------------------------- Avalanche worker

def _import_torchvision():
  """Imports torchvision; a CUDA torchvision wheel next to a CPU-only torch cannot load its C++ ops library, and
  torchvision then fails registering fake kernels for two ops it never defined: define their schemas first.
  Avalanche only needs torchvision's pure-Python parts here (no detection ops run)."""
  import torch
  try:
    import torchvision  # noqa: F401
    return "native"
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  lib = torch.library.Library("torchvision", "DEF")
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _import_torchvision.lib = lib  # keep the registration alive
  import torchvision  # noqa: F401,F811
  return "shim (C++ ops unavailable)"


def worker_avalanche(a) -> dict:
  t_imp, c_imp = time.perf_counter(), time.process_time()
  import warnings
  warnings.filterwarnings("ignore")
  import torch
  torch.set_num_threads(a.threads)
  tv = _import_torchvision()
  import numpy as np
  import avalanche
  from torch import nn
  from torch.utils.data import TensorDataset
  from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
  from avalanche.evaluation.metrics import accuracy_metrics
  from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin
  from avalanche.training.supervised import EWC, LwF, Naive
  imports = (time.perf_counter() - t_imp, time.process_time() - c_imp)
  torch.manual_seed(a.seed)
  eval_every, _ = schedule(a.iters, a.eval_every)

  t, cpu = time.perf_counter(), time.process_time()
  with np.load(a.data_path) as f:
    scale = lambda x: torch.from_numpy(np.divide(x, np.float32(255.0), dtype=np.float32).reshape(len(x), -1))
    train = TensorDataset(scale(f["x_train"]), torch.from_numpy(f["y_train"].astype(np.int64)))
    test = TensorDataset(scale(f["x_test"]), torch.from_numpy(f["y_test"].astype(np.int64)))
  bench = nc_benchmark(train, test, n_experiences=5, task_labels=False, fixed_class_order=list(range(10)))
  model = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
  clock = {"eval_wall": 0.0, "eval_cpu": 0.0, "iterations": []}
  rows = []

  def evaluate(strategy):
    t0, c0 = time.perf_counter(), time.process_time()
    m = strategy.eval(bench.test_stream)
    clock["eval_wall"] += time.perf_counter() - t0
    clock["eval_cpu"] += time.process_time() - c0
    return [float(m[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]) for j in range(5)]

  class Schedule(SupervisedPlugin):
    """Exactly `iters` iterations per experience; evaluations every `eval_every` of them (the last one is the
    end-of-task evaluation, run after `train` returns)."""

    def __init__(self):
      super().__init__()
      self.count = 0

    def before_training_exp(self, strategy, **kw):
      self.count = 0

    def after_training_iteration(self, strategy, **kw):
      self.count += 1
      if self.count >= a.iters:
        strategy.stop_training()
      elif self.count % eval_every == 0:
        evaluate(strategy)

  plugins = [Schedule()]
  common = dict(train_mb_size=128, train_epochs=10 ** 6, eval_mb_size=1000, device="cpu", evaluator=evaluator,
                eval_every=-1)
  crit = nn.CrossEntropyLoss()
  if a.strategy == "naive":
    strategy = Naive(model=model, optimizer=optimizer, criterion=crit, plugins=plugins, **common)
  elif a.strategy == "ewc":
    strategy = EWC(model=model, optimizer=optimizer, criterion=crit, ewc_lambda=a.lam, mode="separate",
                   plugins=plugins, **common)
  elif a.strategy == "lwf":
    strategy = LwF(model=model, optimizer=optimizer, criterion=crit, alpha=LWF_ALPHA, temperature=LWF_T,
                   plugins=plugins, **common)
  elif a.strategy == "replay":
    plugins.append(ReplayPlugin(mem_size=REPLAY_CAPACITY, batch_size=128, batch_size_mem=128))
    strategy = Naive(model=model, optimizer=optimizer, criterion=crit, plugins=plugins, **common)
  else:
    raise SystemExit(f"--strategy={a.strategy!r}: expected one of {', '.join(STRATEGIES)}")
  rows.append(evaluate(strategy))
  for exp in bench.train_stream:
    strategy.train(exp, eval_streams=[])
    clock["iterations"].append(plugins[0].count)
    rows.append(evaluate(strategy))
    with open(a.result_file + ".progress", "a") as f:  # what a run cut short at the deadline still reports
      f.write(json.dumps({"tasks": len(rows) - 1, "wall": time.perf_counter() - t, "cpu": time.process_time() - cpu,
                          "eval_wall": clock["eval_wall"], "eval_cpu": clock["eval_cpu"], "matrix": rows,
                          "iterations": clock["iterations"]}) + "\n")
  wall, cpu = time.perf_counter() - t, time.process_time() - cpu
  return {"acc": sum(rows[-1]) / 5, "matrix": rows, "wall": wall, "cpu": cpu, "import_wall": imports[0],
          "import_cpu": imports[1], "eval_wall": clock["eval_wall"], "eval_cpu": clock["eval_cpu"],
          "iterations": clock["iterations"], "threads": torch.get_num_threads(), "torch": torch.__version__,
          "avalanche": avalanche.__version__, "torchvision": tv, "tasks": 5}


# ------------------------------------------------------------------------------------------------------- driver

def run_worker(a, kind: str, strategy: str, timeout=None, **extra) -> dict | None:
  """One library run in a fresh subprocess; adds the subprocess's own wall/CPU time (imports included) and load.

  An Avalanche run still going at `timeout` seconds is killed and reported from its last finished task (`partial`:
  its wall and CPU time up to there are lower bounds on the whole run's); None if it finished no task."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--strategy", strategy,
         "--data_path", a.data_path, "--iters", str(a.iters), "--eval_every", str(a.eval_every),
         "--lam", repr(a.lam), "--seed", str(a.seed), "--result_file", out]
  for k, v in extra.items():
    cmd += [f"--{k}", str(v)]
  load = os.getloadavg()[0]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  partial = None
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped the worker
    partial, proc = True, None
  wall = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if partial:
    lines = open(out + ".progress").read().splitlines() if os.path.exists(out + ".progress") else []
    for path in (out, out + ".progress"):
      if os.path.exists(path):
        os.unlink(path)
    print(f"  {kind:9s} {strategy:6s} {json.dumps(extra):22s} cut at the deadline after {len(lines)} task(s)",
          flush=True)
    if not lines:
      return None
    r = json.loads(lines[-1])
    first = runs_meta.get("avalanche", {})
    r.update(acc=None, partial=True, import_wall=None, import_cpu=None, threads=extra.get("threads"),
             avalanche=first.get("avalanche"), torch=first.get("torch"), torchvision=first.get("torchvision"))
    r.update(process_wall=wall, process_cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
             load_before=load, load_after=os.getloadavg()[0])
    return r
  if os.path.exists(out + ".progress"):
    os.unlink(out + ".progress")
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
    raise SystemExit(f"{kind} {strategy} {extra}: worker failed with exit code {proc.returncode}")
  with open(out) as f:
    r = json.load(f)
  os.unlink(out)
  if kind == "avalanche":
    runs_meta["avalanche"] = r
  r.update(process_wall=wall, process_cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
           load_before=load, load_after=os.getloadavg()[0])
  print(f"  {kind:9s} {strategy:6s} {json.dumps(extra):22s} ACC {r['acc']:.4f}  wall {r['wall']:7.1f} s  "
        f"cpu {r['cpu']:7.1f} s  (load {load:.1f})", flush=True)
  return r


def measure_peak():
  """worker_peak in a fresh subprocess (this process imports neither library)."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "peak", "--result_file", out], cwd=ROOT,
                 check=True, capture_output=True)
  with open(out) as f:
    r = json.load(f)
  os.unlink(out)
  return r["flops_per_cpu_s"]


runs_meta = {}  # versions reported by the first finished Avalanche run (for a cut-short one)


def med(runs, key):
  """Median of `key` over the runs, None when there are none (a run skipped for time)."""
  vals = [r[key] for r in runs if r.get(key) is not None]
  return statistics.median(vals) if vals else None


def div(x, y):
  return None if x is None or y is None else x / y


def f1(x, unit=" s"):
  return "—" if x is None else f"{x:.1f}{unit}"


def f3(x):
  return "—" if x is None else f"{x:.3f}"


def pct(x):
  return "—" if x is None else f"{100 * x:.2f}"


def cut(runs):
  """Tasks finished by the shortest Avalanche run cut at the deadline, None when every run finished."""
  ks = [r["tasks"] for r in runs if r.get("partial")]
  return min(ks) if ks else None


def fa(x, runs, unit=" s"):
  """An Avalanche time; a run cut short gives a lower bound (its time up to its last finished task)."""
  k = cut(runs)
  return f1(x, unit) if k is None or x is None else f"≥ {f1(x, unit)} ({k}/5 tasks)"


def write_md(a, runs: dict, path: str, started: str, wall_total: float) -> None:
  import platform
  all_runs = [x for s in a.strategies for k in runs[s] for x in runs[s][k]]
  any_av = next((x for x in all_runs if "avalanche" in x), {})
  cj = next((x for x in all_runs if "settings" in x), {})
  n_rep = max(len(runs[s]["cold"]) for s in a.strategies)
  L = []
  L.append("# cl_jax vs Avalanche: Split MNIST, class-incremental (issue 12 item 6)\n")
  argv = [x for i, x in enumerate(sys.argv[1:]) if x != "--note" and (i == 0 or sys.argv[i] != "--note")]
  L.append("    " + " ".join(["python benchmarks/vs_avalanche.py"] + argv) + "\n")
  L.append(f"Written by `benchmarks/vs_avalanche.py` (started {started} UTC, {wall_total / 60:.0f} min so far for the "
           f"whole benchmark). Avalanche {any_av.get('avalanche')}, PyTorch {any_av.get('torch')} (CPU); Python "
           f"{platform.python_version()}; {os.cpu_count()} CPU cores, shared. {n_rep} repeat(s), medians where "
           "there are more; every run is a fresh subprocess; per strategy the runs go back to back (cl_jax cold, "
           "cl_jax warm, Avalanche 1 thread), then the Avalanche 2-thread runs.\n")
  ev, ck = schedule(a.iters, a.eval_every)
  n_eval = 1 + 5 * (a.iters // ev + (a.iters % ev != 0))
  L.append("**Protocol (both sides).** 5 tasks of 2 classes (0/1, 2/3, ...), one 10-way head, no task labels; "
           f"MLP 784-400-400-10 ReLU; Adam lr 1e-3; batch 128; exactly {a.iters} iterations per task; evaluation of "
           f"all 5 test sets (10,000 images, batch 1000) before training, every {ev} iterations and at each task's "
           f"end ({n_eval} evaluations). EWC λ = {a.lam:g} (one penalty per past task on both "
           f"sides); LwF α = {LWF_ALPHA:g}, T = {LWF_T:g}; replay: {REPLAY_CAPACITY} examples in the buffer (filled "
           "at task ends), 128 replayed examples added to every 128-example batch. cl_jax: "
           f"configs/split_mnist.py at its defaults otherwise (checkpoints every {ck} steps, metrics.jsonl every "
           "step, TensorBoard, report PNGs). Avalanche: accuracy metric only, no loggers.\n")
  L.append("**Timed region.** From reading mnist.npz to the last evaluation: cl_jax the `cl_jax.run` call (build, "
           "compile, train, evaluate, checkpoints, reports); Avalanche building the benchmark from tensors, model, "
           "strategy, training and evaluation. Imports are outside it (listed below). CPU = `time.process_time()` "
           "of the process, all threads. **cold** = empty persistent compilation cache (XLA compilation "
           "included); **warm** = a second run on the cache the first filled (the default for every rerun).\n")
  L.append("## Results\n")
  L.append("| strategy | ACC cl_jax | ACC Avalanche (1 / 2 thr) | cl_jax wall cold / warm | Avalanche wall 1 / 2 thr "
           "| cl_jax CPU cold / warm | Avalanche CPU 1 / 2 thr | CPU ratio cold / warm | wall ratio cold / warm "
           f"| verdict (CPU, cold ≤ {GOAL}) |")
  L.append("|---|---|---|---|---|---|---|---|---|---|")
  verdicts = {}
  for s in a.strategies:
    r = runs[s]
    cw, ww, cc, wc = med(r["cold"], "wall"), med(r["warm"], "wall"), med(r["cold"], "cpu"), med(r["warm"], "cpu")
    a1w, a2w, a1c, a2c = med(r["av1"], "wall"), med(r["av2"], "wall"), med(r["av1"], "cpu"), med(r["av2"], "cpu")
    av_cpu = min((x for x in (a1c, a2c) if x is not None), default=None)
    av_wall = min((x for x in (a1w, a2w) if x is not None), default=None)
    # A cut-short Avalanche run's time is a lower bound, so a ratio against it is an upper bound: "met" still
    # follows when the bound is within the goal; otherwise the verdict is open.
    bound = cut(r["av1"] + r["av2"]) is not None
    le = "≤ " if bound else ""
    r3 = lambda x: "—" if x is None else le + f3(x)
    rc = div(cc, av_cpu)
    verdicts[s] = None if rc is None else (rc <= GOAL if not bound else (True if rc <= GOAL else None))
    if rc is None:
      v = "—"
    elif bound:
      v = "met (bound)" if rc <= GOAL else "open (Avalanche cut short)"
    else:
      v = "met" if rc <= GOAL else "NOT met"
    L.append(f"| {s} | {pct(med(r['cold'], 'acc'))} | {pct(med(r['av1'], 'acc'))} / {pct(med(r['av2'], 'acc'))} | "
             f"{f1(cw)} / {f1(ww)} | {fa(a1w, r['av1'])} / {fa(a2w, r['av2'])} | {f1(cc)} / {f1(wc)} | "
             f"{fa(a1c, r['av1'])} / {fa(a2c, r['av2'])} | **{r3(rc)}** / {r3(div(wc, av_cpu))} | "
             f"{r3(div(cw, av_wall))} / {r3(div(ww, av_wall))} | {v} |")
  L.append("")
  L.append("Ratios are cl_jax / Avalanche's better (lower) of its two thread settings: the CPU ratio against the "
           "lower Avalanche CPU time, the wall ratio against the lower Avalanche wall time (— : not run). Against "
           "Avalanche with one thread only (the issue's earlier reference), and where the time goes:\n")
  L.append("| strategy | CPU ratio cold / warm vs 1 thread | wall ratio cold / warm vs 1 thread | Avalanche "
           "evaluation share of its wall (1 thr) | cl_jax wall inside the tasks (cold / warm) | cl_jax wall "
           "outside the tasks: build, compile, row 0, reports (cold / warm) |")
  L.append("|---|---|---|---|---|---|")
  for s in a.strategies:
    r = runs[s]
    a1c, a1w = med(r["av1"], "cpu"), med(r["av1"], "wall")
    for x in r["cold"] + r["warm"]:
      x["in_tasks"] = sum(x["task_seconds"]) if x.get("task_seconds") else None
      x["out_tasks"] = None if x["in_tasks"] is None else x["wall"] - x["in_tasks"]
    le = "≤ " if cut(r["av1"]) is not None else ""
    r3 = lambda x: "—" if x is None else le + f3(x)
    L.append(f"| {s} | {r3(div(med(r['cold'], 'cpu'), a1c))} / {r3(div(med(r['warm'], 'cpu'), a1c))} | "
             f"{r3(div(med(r['cold'], 'wall'), a1w))} / {r3(div(med(r['warm'], 'wall'), a1w))} | "
             f"{f1(div(med(r['av1'], 'eval_wall'), a1w and a1w / 100), '%')} | "
             f"{f1(med(r['cold'], 'in_tasks'))} / {f1(med(r['warm'], 'in_tasks'))} | "
             f"{f1(med(r['cold'], 'out_tasks'))} / {f1(med(r['warm'], 'out_tasks'))} |")
  L.append("")
  ev_n = 1 + 5 * (a.iters // ev + (a.iters % ev != 0))
  L.append("**The compute floor.** The FLOPs both libraries must do (the same model, batches and evaluations; "
           "`train_flops`: a train step ~ 3 forward passes, replay's doubled batch, LwF's teacher forward, "
           "EWC's Fisher left out) divided by the best FLOP rate one core reaches on the MLP's largest layer "
           f"(a jitted 1024x784x400 matmul through XLA, measured now: {a.peak / 1e9:.0f} GFLOP per CPU-second). "
           "At that rate no implementation can use less CPU time than the floor (only a faster matmul kernel "
           "would lower it), so floor / Avalanche is about the lowest CPU ratio any library could reach against "
           "Avalanche on this protocol:\n")
  L.append("| strategy | FLOPs | floor (CPU s) | cl_jax CPU / floor, cold / warm | floor / Avalanche CPU "
           "(lower of 1 / 2 thr) |")
  L.append("|---|---|---|---|---|")
  beyond_floor = []  # strategies whose goal asks for less CPU time than their FLOPs take at the measured peak
  for s in a.strategies:
    r = runs[s]
    fl = train_flops(s, a.iters, ev_n)
    floor = fl / a.peak
    av_cpu = min((x for x in (med(r["av1"], "cpu"), med(r["av2"], "cpu")) if x is not None), default=None)
    le = "≤ " if cut(r["av1"] + r["av2"]) is not None else ""
    if av_cpu is not None and not le and floor / av_cpu > GOAL:
      beyond_floor.append(f"{s} ({f3(floor / av_cpu)})")
    L.append(f"| {s} | {fl / 1e12:.2f} T{' (+ Fisher)' if s == 'ewc' else ''} | {floor:.1f} | "
             f"{f3(div(med(r['cold'], 'cpu'), floor))} / {f3(div(med(r['warm'], 'cpu'), floor))} | "
             f"{'—' if av_cpu is None else le + f3(floor / av_cpu)} |")
  L.append("")
  met = [s for s in a.strategies if verdicts[s] is True]
  missed = [s for s in a.strategies if verdicts[s] is False]
  rest = [s for s in a.strategies if verdicts[s] is None]
  if len(met) == len(a.strategies):
    verdict = "**met for every strategy**."
  else:
    verdict = "; ".join(x for x in (f"met for {', '.join(met)}" if met else "",
                                    f"**not met** for {', '.join(missed)}" if missed else "",
                                    f"open (not measured, or Avalanche cut short above the bound) for "
                                    f"{', '.join(rest)}" if rest else "") if x) + "."
  L.append(f"**Verdict** (goal: cl_jax train time ≤ {GOAL}× Avalanche's for every strategy; measured as CPU time, "
           f"cl_jax cold with compilation included, against Avalanche's lower CPU time): {verdict}\n")
  if beyond_floor:
    # Reported so that a missed goal is read for what it is: on these strategies Avalanche already runs at more
    # than GOAL of the peak matmul rate, so the CPU-time goal would need a faster kernel, not a leaner library.
    L.append(f"For {', '.join(beyond_floor)} the CPU-time goal lies below the compute floor (floor / Avalanche "
             f"above {GOAL}, in brackets): meeting it would take less CPU time than the FLOPs need at this CPU's best "
             "measured matmul rate, so no implementation could meet it here.\n")
  L.append("## Every run\n")
  L.append("| repeat | strategy | run | ACC | wall | CPU | imports wall / CPU | subprocess wall / CPU | load (1-min) "
           "before → after |")
  L.append("|---|---|---|---|---|---|---|---|---|")
  names = {"cold": "cl_jax cold", "warm": "cl_jax warm", "av1": "Avalanche 1 thr", "av2": "Avalanche 2 thr"}
  for s in a.strategies:
    for k in ("cold", "warm", "av1", "av2"):
      for i, x in enumerate(runs[s][k]):
        name = names[k] + (f" (cut after {x['tasks']}/5 tasks)" if x.get("partial") else "")
        L.append(f"| {i} | {s} | {name} | {pct(x['acc'])} | {f1(x['wall'])} | {f1(x['cpu'])} | "
                 f"{f1(x['import_wall'])} / {f1(x['import_cpu'])} | {f1(x['process_wall'])} / "
                 f"{f1(x['process_cpu'])} | {x['load_before']:.1f} → {x['load_after']:.1f} |")
  L.append("")
  L.append("## Final accuracy-matrix rows (repeat 0; cl_jax cold / Avalanche 1 thread), per task, %\n")
  L.append("| strategy | cl_jax after task 5 | Avalanche after task 5 |")
  L.append("|---|---|---|")
  row = lambda xs: ((" ".join(f"{100 * v:.1f}" for v in xs[0]["matrix"][-1]) if xs else "—")
                    + (f" (after task {xs[0]['tasks']}: cut short)" if xs and xs[0].get("partial") else ""))
  for s in a.strategies:
    L.append(f"| {s} | {row(runs[s]['cold'])} | {row(runs[s]['av1'])} |")
  L.append("")
  L.append("## Notes\n")
  L.append(f"- cl_jax settings as run: `{json.dumps(cj.get('settings'))}`.")
  L.append("- Avalanche's iteration count: its strategies train in epochs; a plugin counts iterations and calls "
           f"`stop_training()` after the last one, so each task is exactly {a.iters} iterations (checked, per "
           f"task: {any_av.get('iterations')}); `train_epochs` is set too high to bind. Avalanche's last batch of "
           "each epoch is smaller (no drop_last); cl_jax draws full 128-example batches. The same plugin runs the "
           "mid-task evaluations (Avalanche's own periodic evaluation is off); the end-of-task one follows "
           "`train`.")
  L.append("- Differences that remain between the two implementations (same hyperparameters, different details): "
           "EWC's Fisher — cl_jax `fisher.kind=exact` (expected over the model's predictive distribution, per "
           "example, over the task's training set), Avalanche the squared gradient of each mini-batch's mean loss, "
           "averaged over mini-batches — so the same λ is not the same penalty strength; the replay buffer's "
           "selection (cl_jax: reservoir over the task's data at its end; Avalanche: experience-balanced random "
           "subsets); LwF's distillation target set (Avalanche distils only the units of classes seen before). "
           "Initialisations differ (Flax LeCun-normal vs PyTorch's default uniform). Accuracy is comparable in "
           "kind, not to the decimal.")
  L.append("- cl_jax does more work than Avalanche in the timed region: checkpoints, metrics.jsonl, TensorBoard "
           "events, summary.md and two PNG reports; Avalanche keeps only its accuracy metric.")
  L.append("- The machine is shared (other sessions' experiments and tests run in the background): the load "
           "average is listed with each run. CPU time counts only this process's threads and is the verdict's "
           "measure; wall time under load also counts waiting for a core.")
  L.append("- torchvision: " + ("imported normally." if any_av.get("torchvision") == "native" else
                                "the only torchvision wheel available for torch 2.13 here is a CUDA build whose "
                                "C++ ops library cannot load next to CPU-only torch; the worker defines the two op "
                                "schemas torchvision registers fake kernels for, so its Python parts import. No "
                                "torchvision op runs in this benchmark."))
  for note in a.notes + list(getattr(a, "note", [])):
    L.append(f"- {note}")
  with open(path, "w") as f:
    f.write("\n".join(L) + "\n")
  print(f"wrote {path}", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_path", default=os.environ.get("CL_JAX_MNIST", os.path.join(ROOT, "..", "shared", "data",
                                                                                   "mnist.npz")))
  p.add_argument("--iters", type=int, default=2000, help="iterations per task (the protocol: 2000)")
  p.add_argument("--eval_every", type=int, default=500, help="evaluation interval in iterations (the config's 500)")
  p.add_argument("--lam", type=float, default=1e4, help="EWC λ, the same on both sides")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--deadline", default="", help="UTC HH:MM: skip an Avalanche 2-thread run that would end after it "
                                                "(estimated as 1.5x the same strategy's 1-thread run)")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "vs_avalanche.md"))
  p.add_argument("--json", default="", help="also write every run's raw figures here")
  p.add_argument("--render", default="", help="comma-separated --json files of earlier runs (e.g. one per strategy, "
                                              "run side by side): merge them and write --out, running nothing")
  p.add_argument("--note", action="append", default=[], help="a line added to the notes of the written table")
  p.add_argument("--worker", choices=("cl_jax", "avalanche", "peak"), help=argparse.SUPPRESS)
  p.add_argument("--strategy", help=argparse.SUPPRESS)
  p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--cache_dir", help=argparse.SUPPRESS)
  p.add_argument("--result_file", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    r = {"cl_jax": worker_cl_jax, "avalanche": worker_avalanche, "peak": worker_peak}[a.worker](a)
    with open(a.result_file, "w") as f:
      json.dump(r, f)
    return
  a.notes = []
  a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
  if a.render:
    runs, meta, commands = {}, {}, []
    for path in a.render.split(","):
      with open(path) as f:
        d = json.load(f)
      for s, r in d["runs"].items():
        runs[s] = r
      meta = d.get("meta", meta)
      commands += meta.get("commands", [])
      a.notes += d.get("notes", [])
    meta["commands"] = commands
    a.strategies = [s for s in STRATEGIES if s in runs]
    a.peak = meta.get("peak") or measure_peak()  # the rate measured with the runs, when they stored it
    a.notes.append("Written by `--render` from the per-strategy runs' JSON: "
                   + "; ".join(f"`{c}`" for c in meta.get("commands", [])) + ".")
    write_md(a, runs, a.out, meta.get("started", "?"), meta.get("seconds", 0.0))
    return
  a.data_path = os.path.abspath(a.data_path)
  if not os.path.isfile(a.data_path):
    raise SystemExit(f"--data_path={a.data_path!r}: no such file; expected a Keras-format mnist.npz")
  bad = [s for s in a.strategies if s not in STRATEGIES]
  if bad:
    raise SystemExit(f"--strategies: unknown {bad}; allowed: {', '.join(STRATEGIES)}")
  import importlib.util
  if importlib.util.find_spec("avalanche") is None:
    raise SystemExit("avalanche-lib is not installed (pip install avalanche-lib==0.6.0); this benchmark needs it")
  deadline = None
  if a.deadline:
    hh, mm = map(int, a.deadline.split(":"))
    now = time.gmtime()
    deadline = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
  started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
  t0 = time.perf_counter()
  a.peak = measure_peak()
  runs = {s: {"cold": [], "warm": [], "av1": [], "av2": []} for s in a.strategies}

  def save():
    if a.json:
      meta = {"started": started, "seconds": time.perf_counter() - t0, "peak": a.peak,
              "commands": [" ".join(["python benchmarks/vs_avalanche.py"] + sys.argv[1:])]}
      with open(a.json, "w") as f:
        json.dump({"runs": runs, "meta": meta, "notes": a.notes}, f)
    write_md(a, runs, a.out, started, time.perf_counter() - t0)  # after every run: a cut-short benchmark keeps its table

  for i in range(a.repeats):
    print(f"repeat {i + 1}/{a.repeats}", flush=True)
    for s in a.strategies:
      cache = tempfile.mkdtemp(prefix="vs_avalanche_cache_")
      try:
        runs[s]["cold"].append(run_worker(a, "cl_jax", s, cache_dir=cache))
        runs[s]["warm"].append(run_worker(a, "cl_jax", s, cache_dir=cache))
      finally:
        shutil.rmtree(cache, ignore_errors=True)
      save()
      left = None if deadline is None else max(1.0, deadline - time.time())
      r = run_worker(a, "avalanche", s, timeout=left, threads=1)
      if r is not None:
        runs[s]["av1"].append(r)
      else:
        a.notes.append(f"Avalanche 1 thread, {s}, repeat {i}: cut at the deadline before finishing a task.")
      save()
    for s in a.strategies:
      if deadline is not None and time.time() > deadline - 60:
        a.notes.append(f"Avalanche 2 threads, {s}, repeat {i}: not run, the deadline {a.deadline} UTC had come.")
        save()
        continue
      left = None if deadline is None else deadline - time.time()
      r = run_worker(a, "avalanche", s, timeout=left, threads=2)
      if r is not None:
        runs[s]["av2"].append(r)
      else:
        a.notes.append(f"Avalanche 2 threads, {s}, repeat {i}: cut at the deadline before finishing a task.")
      save()


if __name__ == "__main__":
  main()
