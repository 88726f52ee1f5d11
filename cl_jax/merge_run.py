"""The merge kind's parts (`cl_jax.kinds.merge`; `run.py --config configs/merge.py`): merge checkpoints named in
the config and evaluate on every task.

A checkpoint reference (`merge.base`, each of `merge.models`) is one of
  RUN_DIR:task=N   the task-boundary checkpoint after task N (1-based) of a cl_jax run in RUN_DIR;
  RUN_DIR          that run's last task-boundary checkpoint;
  PARAMS_DIR       a params pytree alone (`cl_jax.checkpoint.save_params`; what this runner saves as
                   `<workdir>/merged`).
Checkpoints are read through `cl_jax.checkpoint` (`boundary_steps`, `boundary_params`, `load_params`). Data,
scenario and model come from the first referenced run's `config.json` (every run referenced must agree on them),
or, when only params directories are named, from the merge config's own sections.

Everything is checked before the workdir is touched: the method and its settings, that every checkpoint exists
(`check_config`, called by `cl_jax.kinds.validate`), and that all trees match (the first mismatching path is
named). Evaluation is the task loop's (`cl_jax.eval.evaluator.accuracy_row`): each model is one accuracy-matrix
row with the logit mask of having trained every task (`task_index = T - 1`), so an input checkpoint of a run
evaluates to that run's row exactly. The run returns `Results(kind='merge')` whose accuracy matrix is the merged
model's row [1, T]; results.json also holds every input's row (`inputs`), and summary.md the table.
"""
from __future__ import annotations


import jax
import ml_collections
import numpy as np

from cl_jax import merging
from cl_jax.checkpoint import REF_RE, Reference, resolve  # noqa: F401  (the references this run reads)



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


def check_settings(c) -> None:
  """ValueError naming the `merge.*` key for a bad setting; runs before anything is loaded. What a method needs (a
  base, a number of models) and which settings it reads come from its `merging.METHODS` entry."""
  m = merging.METHODS.get(c.method)
  if m is None:
    raise ValueError(f"merge.method={c.method!r}: expected one of {tuple(merging.METHODS)}")
  models = list(c.models)
  if not models:
    raise ValueError("merge.models: name at least one checkpoint to merge")
  if m.num_models is not None and len(models) != m.num_models:
    raise ValueError(f"merge.models: {c.method} merges exactly {m.num_models} models, got {len(models)}")
  if m.task_vectors and not c.base:
    raise ValueError(f"merge.base: method {c.method!r} merges task vectors and needs a base checkpoint")
  if list(c.weights) and len(c.weights) != len(models):
    raise ValueError(f"merge.weights: {len(c.weights)} weights for {len(models)} models")
  for name in m.settings:
    _check_key(name, c[name], f"merge.{name}")
  if "t" in m.settings and list(c.t_layers):  # the depth schedule of t (see merge_kwargs)
    _check_key("t", [float(a) for a in c.t_layers], "merge.t_layers")


def _check_key(name: str, value, key: str) -> None:
  """`merging.check_setting`, its message in the config's convention: the full key and its value first."""
  try:
    merging.check_setting(name, value, key)
  except ValueError as e:
    shown = list(value) if isinstance(value, (list, tuple)) else value
    raise ValueError(f"{key}={shown!r}: {str(e).removeprefix(key).lstrip(' :')}") from None


def references(c) -> list[Reference]:
  """[base (when the method uses one)] + models, resolved and checked."""
  base = [resolve(c.base, "merge.base")] if c.base and merging.METHODS[c.method].task_vectors else []
  return base + [resolve(r, f"merge.models[{i}]") for i, r in enumerate(c.models)]


def check_config(config) -> None:
  """For kind 'merge': the settings and that every referenced checkpoint exists."""
  check_settings(config.merge)
  _eval_sections(config, references(config.merge))


def _eval_sections(config, refs):
  """data/scenario/model/seed for evaluation: from the runs (which must agree), else from `config`."""
  runs = [r for r in refs if r.run_config is not None]
  if not runs:
    return config.data, config.scenario, config.model, config.seed
  first = runs[0].run_config
  for r in runs[1:]:
    for section in ("data", "scenario", "model"):
      if r.run_config.get(section) != first.get(section):
        a, b = first.get(section) or {}, r.run_config.get(section) or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"{r.what}={r.ref!r}: its run's {section} section differs from {runs[0].ref!r}'s "
                         f"(keys {diff}); merged models must share data, scenario and model")
  if first.get("kind", "classic") != "classic":
    raise ValueError(f"{runs[0].what}={runs[0].ref!r}: a {first.get('kind')!r} run; merging evaluates classic "
                     "task runs")
  cd = ml_collections.ConfigDict
  return cd(first["data"]), cd(first["scenario"]), cd(first["model"]), int(first["seed"])


def evaluate_rows(params_list, data_c, scenario_c, model_c, seed, batch_size=1000) -> list[list[float]]:
  """Each params pytree's accuracy on every task, as a task-loop row after the last task."""
  from cl_jax import sharding
  from cl_jax.data import make_scenario
  from cl_jax.data.sources import load_source
  from cl_jax.eval.evaluator import accuracy_evaluator
  from cl_jax.models import build_model
  from cl_jax.strategies import Learner
  data = load_source(data_c)
  scenario = make_scenario(data, scenario_c, multi_head=bool(model_c.get("multi_head", True)))
  model, _ = build_model(model_c, scenario.input_shape, scenario.num_outputs, scenario.num_heads, seed)
  mesh = sharding.make_mesh(-1, 1)
  evaluator = accuracy_evaluator(Learner(model.apply, scenario.logit_mask), mesh, batch_size)
  return [evaluator.row(jax.device_put(p, sharding.replicated(mesh)), scenario, scenario.num_tasks - 1)
          for p in params_list]


def merge_kwargs(c) -> dict:
  """`merging.merge`'s keyword arguments: weights and seed, then the settings the method's entry reads (in
  `merging.SETTINGS` order, which results.json's `settings` keeps)."""
  kwargs = dict(weights=list(c.weights) or None, seed=int(c.seed))
  for name in merging.METHODS[c.method].settings:
    if name == "t":
      # Numbered layers (a layer index in the path, see merging.layer_index) follow the depth schedule;
      # the rest (embeddings, head) take t.
      kwargs["t"] = merging.depth_schedule(c.t, c.t_layers)
    else:
      kwargs[name] = bool(c[name]) if name == "normalize" else float(c[name])
  return kwargs


def summary_table(method: str, merged_row, inputs: dict) -> str:
  rows = [(f"merged ({method})", merged_row)] + list(inputs.items())
  T = len(merged_row)
  table = ["| model | " + " | ".join(f"task {i + 1}" for i in range(T)) + " | average |",
           "|---|" + "---:|" * (T + 1)]
  table += [f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + f" | {100 * np.mean(acc):.1f} |"
            for name, acc in rows]
  return "\n".join(table)


__all__ = ["default_config", "check_config", "check_settings", "Reference", "resolve", "references",
           "evaluate_rows", "merge_kwargs", "summary_table"]
