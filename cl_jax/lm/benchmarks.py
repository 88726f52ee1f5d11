"""Benchmarks in the regression monitor (`regression.benchmarks`): their specs, and their scoring inside a run.

The practice an LM run follows measures general benchmarks (MMLU, HellaSwag, GSM8K) and domain ones before the
first adaptation step and every few hundred steps after it, and treats a drop of 2 points on any general benchmark
as a hard stop. `regression.benchmarks` names them:

    ['knowledge', 'completion']                             general, guarded at 2 points each
    {'knowledge': {'threshold': 2.0, 'role': 'general'}}    a mapping of builtin names to their settings
    [{'name': '/path/items.jsonl', 'role': 'domain'}, ...]  a list of settings with `name` (the form for a path:
                                                            a config key cannot hold a dot)

Each benchmark is a builtin set of `cl_jax.eval.benchmark_sets.BUILTIN` or a user's JSONL file in the same row
format; its settings:

    threshold       2.0     tau in points of the metric (percent with `relative`): the kept checkpoint never lies
                            beyond it, and the run stops where the benchmark's interval clears it
    stop_threshold  None    a separate stop tau_stop >= tau (None: tau, the practice's hard stop at 2 points)
    role            general 'general' (guarded) | 'domain' (recorded with its interval, never guarded)
    metric          None    the guarded metric (None: the set's primary one: acc, acc_norm, exact_match)
    limit           None    the first `limit` items only
    relative        False   True: tau is relative to the base score (the rule perplexity has)

Every metric of a benchmark is measured and logged as '<role>/bench/<name>/<metric>' (<name>: the builtin name or
the file's stem); the guarded one also reaches the monitor with its per-item scores, so its decision uses the
paired interval of the per-item differences (cl_jax.lm.monitor).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

KEY = "regression.benchmarks"
ROLES = ("general", "domain")
SETTINGS = {"threshold": 2.0, "stop_threshold": None, "role": "general", "metric": None, "limit": None,
            "relative": False}


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _entries(value) -> list[dict]:
  if hasattr(value, "to_dict"):  # a ConfigDict (the mapping form, set through the config)
    value = value.to_dict()
  if isinstance(value, str):
    value = [v.strip() for v in value.split(",") if v.strip()]
  if isinstance(value, Mapping):
    out = []
    for name, settings in value.items():
      if settings is not None and not isinstance(settings, Mapping):
        raise ValueError(f"{KEY}[{name!r}]={settings!r}: expected a mapping of settings {sorted(SETTINGS)}")
      out.append({"name": name, **(settings or {})})
    return out
  if isinstance(value, Sequence):
    out = []
    for e in value:
      if isinstance(e, str):
        out.append({"name": e})
      elif isinstance(e, Mapping) and isinstance(e.get("name"), str):
        out.append(dict(e))
      else:
        raise ValueError(f"{KEY}: entry {e!r}: expected a benchmark name or path, or a mapping with 'name' and "
                         f"settings {sorted(SETTINGS)}")
    return out
  raise ValueError(f"{KEY}={value!r}: expected a list of benchmark names / paths or a mapping name -> settings")


def specs(value) -> list[dict]:
  """`regression.benchmarks` as a list of complete settings, each with 'source' (the builtin name or the file's
  absolute path) and 'label' (the name in metric names); raises ValueError naming the key and what is allowed.
  Reads nothing but the file system's listing (`check` loads the sets)."""
  if value is None or (isinstance(value, (list, tuple, str)) and not value):
    return []
  from cl_jax.eval import benchmark_sets
  # A builtin set by its name or its lm-eval task name (cl_jax_knowledge, ...).
  builtin = {**{t: b for b, t in getattr(benchmark_sets, "TASK_NAMES", {}).items()},
             **{b: b for b in benchmark_sets.BUILTIN}}
  out, labels = [], set()
  for e in _entries(value):
    name = e.pop("name")
    where = f"{KEY}[{name!r}]"
    unknown = sorted(set(e) - set(SETTINGS))
    if unknown:
      raise ValueError(f"{where}: unknown setting(s) {unknown}; allowed: {sorted(SETTINGS)}")
    s = {**SETTINGS, **e}
    if name in builtin:
      source = label = builtin[name]
    elif name.endswith(".jsonl") or os.sep in name:
      source = os.path.abspath(os.path.expanduser(name))
      if not os.path.isfile(source):
        raise ValueError(f"{where}: no such file {source}")
      label = os.path.splitext(os.path.basename(source))[0]
    else:
      raise ValueError(f"{where}: not a builtin benchmark {list(benchmark_sets.BUILTIN)} nor a .jsonl file of "
                       "benchmark rows")
    if s["role"] not in ROLES:
      raise ValueError(f"{where}: role={s['role']!r}: expected one of {ROLES}")
    if not _number(s["threshold"]) or not 0 < s["threshold"] < 100:
      raise ValueError(f"{where}: threshold={s['threshold']!r}: expected points in (0, 100), e.g. 2.0")
    if s["stop_threshold"] is not None and (not _number(s["stop_threshold"])
                                            or not s["threshold"] <= s["stop_threshold"] < 100):
      raise ValueError(f"{where}: stop_threshold={s['stop_threshold']!r}: expected None or points in "
                       f"[threshold, 100)")
    if s["metric"] is not None and not isinstance(s["metric"], str):
      raise ValueError(f"{where}: metric={s['metric']!r}: expected None (the set's primary metric) or a name")
    if s["limit"] is not None and (not isinstance(s["limit"], int) or isinstance(s["limit"], bool)
                                   or s["limit"] < 2):
      raise ValueError(f"{where}: limit={s['limit']!r}: expected None or an integer >= 2 (a paired interval "
                       "needs two items)")
    if not isinstance(s["relative"], bool):
      raise ValueError(f"{where}: relative={s['relative']!r}: expected true or false")
    if label in labels:
      raise ValueError(f"{where}: a second benchmark named {label!r} (metric names would collide)")
    labels.add(label)
    out.append({**s, "name": name, "source": source, "label": label})
  return out


def load_all(value, max_len: int | None = None, tokenizer=None) -> list:
  """[(spec, Benchmark)] of `regression.benchmarks`, each loaded and its metric checked (ValueError naming it).
  With `max_len` (the run's `lm.seq_len`, the engine's context) a generating set must leave room for its answer,
  and with the run's `tokenizer` too every scored continuation must fit (as the engine encodes it)."""
  wanted = specs(value)
  if not wanted:  # no benchmarks: nothing imported or read
    return []
  from cl_jax.eval import benchmark_sets
  out = []
  for s in wanted:
    where = f"{KEY}[{s['name']!r}]"
    try:
      bench = benchmark_sets.load(s["source"], limit=s["limit"])
    except (ValueError, KeyError, OSError) as e:
      raise ValueError(f"{where}: {' '.join(str(e).split())}") from e
    metric = s["metric"] or bench.primary
    if metric not in bench.metrics:
      raise ValueError(f"{where}: metric={metric!r}: the set measures {list(bench.metrics)}")
    if len(bench.items) < 2:
      raise ValueError(f"{where}: {len(bench.items)} item(s); a paired interval needs at least 2")
    if max_len is not None and bench.kind == "generate_until":
      from cl_jax.eval.lm_engine import Engine
      (_, kw), = benchmark_sets.requests(bench._replace(items=bench.items[:1]))
      new = Engine.gen_settings(kw)["max_new_tokens"]
      if int(max_len) <= new:
        raise ValueError(f"{where}: generates up to {new} tokens per answer, so lm.seq_len={max_len} (the "
                         f"evaluation's context) must exceed {new}")
    elif max_len is not None and tokenizer is not None:
      from cl_jax.eval.lm_engine import Engine
      encoder = Engine(lambda p, x: None, None, tokenizer, max_len=int(max_len))  # its encoding only, no model
      longest = max(len(encoder.encode_pair(ctx, cont)[1]) for ctx, cont in benchmark_sets.requests(bench))
      if longest > int(max_len):
        raise ValueError(f"{where}: its longest answer is {longest} tokens, more than lm.seq_len={max_len} holds "
                         "(use a larger lm.seq_len, or a set with shorter answers)")
    out.append(({**s, "metric": metric}, bench))
  return out


def metric_name(spec: dict, metric: str | None = None) -> str:
  return f"{spec['role']}/bench/{spec['label']}/{metric or spec['metric']}"


def monitor_settings(loaded) -> dict:
  """The `benchmarks` argument of RegressionMonitor: each guarded metric's thresholds as fractions of its units."""
  return {metric_name(s): {"threshold": s["threshold"] / 100.0, "absolute": not s["relative"],
                           "stop_threshold": None if s["stop_threshold"] is None else s["stop_threshold"] / 100.0}
          for s, _ in loaded}


class Scorer:
  """Scores every benchmark of a run on the params it is handed: one `Engine`, built at the first call and reused
  with other params (`Engine.with_params`: the same compiled programs) at every evaluation. `plain`: maps the run's
  params to the plain model's (an adapter run: its adapters merged into the base), so that `model`'s KV-cache
  generation serves generate_until benchmarks in every run."""

  def __init__(self, loaded, apply, tokenizer, *, max_len: int, mesh=None, model=None, batch_size: int = 16,
               plain=None):
    self.loaded, self.plain = loaded, plain
    self.apply, self.tokenizer, self.model = apply, tokenizer, model
    self.max_len, self.mesh, self.batch_size = int(max_len), mesh, int(batch_size)
    self.engine = None

  def __bool__(self) -> bool:
    return bool(self.loaded)

  def __call__(self, params, per_item: dict | None = None) -> dict:
    """{'<role>/bench/<name>/<metric>': score} for every metric of every benchmark; per-item scores in `per_item`."""
    from cl_jax.eval import benchmark_sets
    from cl_jax.eval.lm_engine import Engine
    if self.plain is not None:
      params = self.plain(params)
    if self.engine is None:
      eos = getattr(self.tokenizer, "eos_id", None)
      self.engine = Engine(self.apply, params, self.tokenizer, max_len=self.max_len, batch_size=self.batch_size,
                           mesh=self.mesh, model=self.model, eos_ids=() if eos is None else (int(eos),))
    engine = self.engine.with_params(params)
    out = {}
    for spec, bench in self.loaded:
      metrics, items = benchmark_sets.score(bench, engine)
      for m in bench.metrics:
        name = metric_name(spec, m)
        out[name] = float(metrics[m])
        if per_item is not None:
          per_item[name] = np.asarray(items[m], np.float64)
    return out


__all__ = ["specs", "load_all", "metric_name", "monitor_settings", "Scorer", "ROLES", "SETTINGS", "KEY"]
