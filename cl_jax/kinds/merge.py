"""The merge kind: merge finished runs' checkpoints (`merge.method`, a table in `cl_jax.merging`) and evaluate the
merged model on every task; no training. Its parts live in `cl_jax.merge_run` (references, evaluation rows)."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cl_jax import merge_run
from cl_jax.config import COMMON_SCHEMA
from cl_jax.kinds import classic

PROVIDES = frozenset()  # nothing trains: no strategy runs in a merge


def default_config():
  """The classic sections (for evaluation when only params directories are named) plus `merge`."""
  c = classic.default_config()
  with c.unlocked():
    c.kind = "merge"
    c.merge = merge_run.default_config()
  return c


SCHEMA = {"seed": COMMON_SCHEMA["seed"]}
check_config = merge_run.check_config


class Built(NamedTuple):
  merged: Any       # the merged params
  rows: list        # accuracy rows: the merged model's, then each input's
  refs: list        # the resolved references, in the order of rows[1:]
  settings: dict    # the method's settings as merging.merge took them


def build(config) -> Built:
  """Loads every referenced checkpoint, merges and evaluates; reads only (a bad tree fails before any write)."""
  from cl_jax import merging
  c = config.merge
  refs = merge_run.references(c)
  data_c, scenario_c, model_c, seed = merge_run._eval_sections(config, refs)
  loaded = [r.params() for r in refs]
  merging.check_compatible(loaded, [r.ref for r in refs])
  has_base = bool(c.base) and merging.METHODS[c.method].task_vectors  # the entry says whether it reads a base
  base, models = (loaded[0], loaded[1:]) if has_base else (None, loaded)
  kwargs = merge_run.merge_kwargs(c)
  merged = merging.merge(c.method, base, models, **kwargs)
  rows = merge_run.evaluate_rows([merged] + loaded, data_c, scenario_c, model_c, seed)
  return Built(merged, rows, refs, {k: v for k, v in kwargs.items() if k != "weights" or v is not None})


def run(built: Built, ctx):
  """Saves the merged params (`<workdir>/merged`) and returns `Results(kind='merge')`: the merged row [1, T]."""
  import os

  from cl_jax import checkpoint
  from cl_jax.results import Results
  c = ctx.config.merge
  rows = built.rows
  inputs = {r.ref: row for r, row in zip(built.refs, rows[1:])}
  if c.save:
    checkpoint.save_params(os.path.join(ctx.workdir, "merged"), built.merged, overwrite=True)
  extra = {"method": c.method, "settings": built.settings, "accuracy": rows[0], "average": float(np.mean(rows[0])),
           "inputs": inputs}
  return Results("merge", ctx.workdir, np.asarray(rows[:1]), acc=float(np.mean(rows[0])), extra=extra)


def report(results, workdir: str, config) -> None:
  """summary.md: the merged and input rows as one table."""
  del config
  import json
  import os
  e = results.extra
  table = merge_run.summary_table(e["method"], e["accuracy"], e["inputs"])
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(f"# Merge: {e['method']}\n\nSettings: {json.dumps(e['settings'])}\n\n" + table + "\n")
