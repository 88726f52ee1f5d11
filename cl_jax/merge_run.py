"""`run.py --config configs/merge.py`: merge checkpoints named in the config and evaluate on every task.

A checkpoint reference (`merge.base`, each of `merge.models`) is one of
  RUN_DIR:task=N   the task-boundary checkpoint after task N (1-based) of a cl_jax run in RUN_DIR;
  RUN_DIR          that run's last task-boundary checkpoint;
  PARAMS_DIR       an orbax pytree of params alone (what this runner saves as `<workdir>/merged`).
Data, scenario and model come from the first referenced run's `config.json` (every run referenced must
agree on them), or, when only params directories are named, from the merge config's own sections.

Everything is checked before the workdir is touched: the method and its settings, that every checkpoint
exists, and that all trees match (the first mismatching path is named). The workdir then gets
`config.json`, `results.json` (accuracy of the merged model and of every input on every task) and
`summary.md`, plus the merged params under `merged/` when `merge.save`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax import merging

REF_RE = re.compile(r"^(?P<path>.+?)(?::task=(?P<task>\d+))?$")


def default_config() -> ml_collections.ConfigDict:
  """The `merge` section (see `merging.merge` for the parameters, named after their papers)."""
  return ml_collections.ConfigDict(dict(
      method="ties",     # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp
      base="",           # checkpoint ref of theta_base (all but linear and slerp)
      models=[],         # checkpoint refs of the fine-tuned models
      weights=[],        # one per model; empty = all 1
      lam=1.0,           # task arithmetic / TIES / DARE scale lambda
      density=0.5,       # TIES / DARE kept fraction, in (0, 1]
      normalize=True,    # linear / TIES / DARE-TIES: divide by the (agreeing) weights
      t=0.5,             # SLERP factor in [0, 1] (for every tensor, or those without a layer number)
      t_layers=[],       # SLERP anchors over depth for numbered layers, e.g. [0, 0.5, 1] (mergekit-style)
      seed=0,            # DARE drop masks
      save=True,         # write the merged params to <workdir>/merged
  ))


@dataclasses.dataclass
class MergeResults:
  accuracy: list          # merged model, per task
  average: float
  inputs: dict            # {ref: per-task accuracy} of base and models
  workdir: str
  method: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class Checkpoint:
  """A resolved reference: `params()` loads it; `run_config` is the producing run's config (or None)."""

  def __init__(self, ref: str, what: str):
    m = REF_RE.match(ref or "")
    if not ref or m is None:
      raise ValueError(f"{what}: empty checkpoint reference")
    self.ref, self.what = ref, what
    self.path = os.path.abspath(m.group("path"))
    self.task = int(m.group("task")) if m.group("task") else None
    self.run_config = None
    if not os.path.isdir(self.path):
      raise ValueError(f"{what}={ref!r}: no such checkpoint or run directory {self.path}")
    cfg_path = os.path.join(self.path, "config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        self.run_config = json.load(f)
      tasks_dir = os.path.join(self.path, "checkpoints", "tasks")
      steps = sorted(int(s) for s in os.listdir(tasks_dir) if s.isdigit()) if os.path.isdir(tasks_dir) else []
      if not steps:
        raise ValueError(f"{what}={ref!r}: run {self.path} has no task-boundary checkpoint")
      self.steps = steps
      if self.task is not None and not 1 <= self.task <= len(steps):
        raise ValueError(f"{what}={ref!r}: task={self.task}, but the run has boundary checkpoints for tasks "
                         f"1..{len(steps)}")
    else:
      if self.task is not None:
        raise ValueError(f"{what}={ref!r}: ':task=' needs a cl_jax run directory (with config.json)")

  def params(self):
    import orbax.checkpoint as ocp
    if self.run_config is None:
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(self.path)
    manager = ocp.CheckpointManager(os.path.join(self.path, "checkpoints", "tasks"))
    try:
      wanted = self.task if self.task is not None else len(self.steps)
      for step in self.steps:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("task") == wanted:
          state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
          return state["params"]
      raise ValueError(f"{self.what}={self.ref!r}: no boundary checkpoint of task {wanted} in {self.path}")
    finally:
      manager.close()


def check_settings(c) -> None:
  """ValueError naming the `merge.*` key for a bad setting; runs before anything is loaded."""
  if c.method not in merging.METHODS:
    raise ValueError(f"merge.method={c.method!r}: expected one of {merging.METHODS}")
  models = list(c.models)
  if not models:
    raise ValueError("merge.models: name at least one checkpoint to merge")
  if c.method == "slerp" and len(models) != 2:
    raise ValueError(f"merge.models: slerp interpolates exactly two models, got {len(models)}")
  if c.method not in ("linear", "slerp") and not c.base:
    raise ValueError(f"merge.base: method {c.method!r} merges task vectors and needs a base checkpoint")
  if list(c.weights) and len(c.weights) != len(models):
    raise ValueError(f"merge.weights: {len(c.weights)} weights for {len(models)} models")
  if c.method in ("ties", "dare", "dare_linear", "dare_ties") and not 0 < float(c.density) <= 1:
    raise ValueError(f"merge.density={c.density}: must be in (0, 1]")
  if c.method == "slerp":
    if not 0 <= float(c.t) <= 1:
      raise ValueError(f"merge.t={c.t}: must be in [0, 1]")
    if any(not 0 <= float(t) <= 1 for t in c.t_layers):
      raise ValueError(f"merge.t_layers={list(c.t_layers)}: every anchor must be in [0, 1]")


def _eval_sections(config, checkpoints):
  """data/scenario/model/seed for evaluation: from the runs (which must agree), else from `config`."""
  runs = [ck for ck in checkpoints if ck.run_config is not None]
  if not runs:
    return config.data, config.scenario, config.model, config.seed
  ref = runs[0].run_config
  for ck in runs[1:]:
    for section in ("data", "scenario", "model"):
      if ck.run_config[section] != ref[section]:
        diff = sorted(k for k in set(ref[section]) | set(ck.run_config[section])
                      if ref[section].get(k) != ck.run_config[section].get(k))
        raise ValueError(f"{ck.what}={ck.ref!r}: its run's {section} section differs from {runs[0].ref!r}'s "
                         f"(keys {diff}); merged models must share data, scenario and model")
  cd = ml_collections.ConfigDict
  return cd(ref["data"]), cd(ref["scenario"]), cd(ref["model"]), int(ref["seed"])


def evaluate_every_task(params_list, data_c, scenario_c, model_c, seed, batch_size=1000):
  """Per-task test accuracy of each params pytree, with all classes of the scenario unmasked as after
  the last task (the accuracy-matrix convention of the task loop)."""
  from cl_jax.data import make_scenario, test_batches
  from cl_jax.data.sources import load_source
  from cl_jax.models import build_model
  from cl_jax.strategies import Learner

  data = load_source(data_c)
  scenario = make_scenario(data, scenario_c, multi_head=bool(model_c.get("multi_head", True)))
  model, _ = build_model(model_c, scenario.input_shape, scenario.num_outputs, scenario.num_heads, seed)
  learner = Learner(model.apply, scenario.logit_mask)
  last = jnp.int32(scenario.num_tasks - 1)

  @jax.jit
  def hits(params, batch):
    logits = learner.logits(params, batch["x"], batch["task"], last)
    return jnp.sum((jnp.argmax(logits, -1) == batch["y"]) & batch["valid"]), jnp.sum(batch["valid"])

  out = []
  for params in params_list:
    accs = []
    for t in range(scenario.num_tasks):
      h = n = 0
      for batch in test_batches(scenario, t, batch_size):
        a, b = hits(params, batch)
        h, n = h + int(a), n + int(b)
      accs.append(h / max(n, 1))
    out.append(accs)
  return out


def run(config, workdir: str, overwrite: bool = False, progress: bool = True) -> MergeResults:
  del progress
  c = config.merge
  check_settings(c)
  base_ck = Checkpoint(c.base, "merge.base") if c.base and c.method not in ("linear", "slerp") else None
  model_cks = [Checkpoint(r, f"merge.models[{i}]") for i, r in enumerate(c.models)]
  checkpoints = ([base_ck] if base_ck else []) + model_cks
  data_c, scenario_c, model_c, seed = _eval_sections(config, checkpoints)
  base = base_ck.params() if base_ck else None
  models = [ck.params() for ck in model_cks]
  merging.check_compatible(([base] if base is not None else []) + models,
                           [ck.ref for ck in checkpoints])
  if os.path.exists(workdir) and os.listdir(workdir):
    if not overwrite:
      raise ValueError(f"workdir {workdir!r} is not empty; use another --workdir or --overwrite")
    shutil.rmtree(workdir)

  kwargs = dict(weights=list(c.weights) or None, seed=int(c.seed))
  if c.method in ("task_arithmetic", "ties", "dare", "dare_linear", "dare_ties"):
    kwargs["lam"] = float(c.lam)
  if c.method in ("ties", "dare", "dare_linear", "dare_ties"):
    kwargs["density"] = float(c.density)
  if c.method in ("linear", "ties", "dare_ties"):
    kwargs["normalize"] = bool(c.normalize)
  if c.method == "slerp":
    # Numbered layers (a layer index in the path, see merging.layer_index) follow the depth schedule;
    # the rest (embeddings, head) take t.
    kwargs["t"] = ({merging._LAYER_RE.pattern: [float(a) for a in c.t_layers], "default": float(c.t)}
                   if list(c.t_layers) else float(c.t))
  merged = merging.merge(c.method, base, models, **kwargs)

  accs = evaluate_every_task([merged] + ([base] if base is not None else []) + models,
                             data_c, scenario_c, model_c, seed)
  inputs = {ck.ref: a for ck, a in zip(checkpoints, accs[1:])}
  results = MergeResults(accs[0], float(np.mean(accs[0])), inputs, workdir, c.method)

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort(sort_keys=True)), f, indent=2, sort_keys=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results.as_dict(), f, indent=2)
  if c.save:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(os.path.abspath(workdir), "merged"), merged)
  rows = [(f"merged ({c.method})", accs[0])] + list(inputs.items())
  T = len(accs[0])
  table = ["| model | " + " | ".join(f"task {i + 1}" for i in range(T)) + " | average |",
           "|---|" + "---:|" * (T + 1)]
  table += [f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + f" | {100 * np.mean(acc):.1f} |"
            for name, acc in rows]
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(f"# Merge: {c.method}\n\nSettings: " + json.dumps({k: kwargs[k] for k in kwargs}) + "\n\n" +
            "\n".join(table) + "\n")
  print("\n".join(table))
  print(f"\nOutputs in {workdir}/: results.json, summary.md" + (", merged/" if c.save else ""))
  return results


__all__ = ["default_config", "run", "MergeResults", "Checkpoint", "check_settings", "evaluate_every_task"]
