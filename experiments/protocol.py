"""Shared machinery of the reproduction scripts: many-seed programs, cached runs, selection on validation.

Every table row is one `cl_jax.run` of a config with `train.num_seeds = N`: the N seeds train as one jitted
program (`cl_jax/train/seeds.py`), and results.json holds each seed's accuracy matrix plus per-setting means,
standard deviations and 95% Student-t intervals.

Hyperparameters (EWC's λ, SI's c, DER++'s α/β, ...) are chosen on a *validation* split carved from the training
data (`data.validation_fraction`, evaluated with `eval.split=validation`), by the mean validation ACC of a few
tuning seeds that are not the reported seeds. The whole grid is one program (`train.sweep`). The reported runs then
train on the full training set and are evaluated on the test set.

Runs are cached under a work root keyed by their config: a rerun reuses every finished program whose settings agree
with the one asked for, so an interrupted table resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time

import numpy as np

from cl_jax.errors import DivergenceError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist.npz")
VALIDATION_FRACTION = 0.1


def config_key(config) -> str:
  return hashlib.sha1(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]


DIVERGED = "diverged.json"  # written in place of results.json by a run that stopped with DivergenceError


class NotCached(LookupError):
  """`run_cached` under `only_cached()` was asked for a run that has not finished."""


_only_cached = False


@contextlib.contextmanager
def only_cached():
  """Inside, `run_cached` trains nothing: a run that has not finished raises NotCached. For writing a table's
  report from what has finished while the runs still go on elsewhere."""
  global _only_cached
  before, _only_cached = _only_cached, True
  try:
    yield
  finally:
    _only_cached = before


def run_cached(config, workroot: str, log=print) -> dict:
  """Runs `config` under workroot/<config hash> unless an equivalent run already finished; returns results.json.

  Equivalent: every setting the two configs both have is equal, and every setting the finished run lacks (a key
  added to the codebase after it ran) is at its default in `config` -- so a new key left at its default does not
  force a rerun, and one set away from it does. An unfinished run's workdir is resumed from its last checkpoint.
  """
  import cl_jax
  from cl_jax.kinds import base_config
  from cl_jax.train.loop import config_dict
  path = _equivalent_run(config_dict(config), workroot, config_dict(base_config()))
  if path is None and _only_cached:
    raise NotCached(f"{config.strategy} seeds {config.seed}+{config.train.num_seeds} sweep {config.train.sweep!r} "
                    f"has not finished under {workroot}")
  if path is None:
    workdir = os.path.join(workroot, config_key(config))
    t0, c0 = time.time(), time.process_time()
    overwrite = not os.path.exists(os.path.join(workdir, "checkpoints"))
    try:
      cl_jax.run(config, workdir, overwrite=overwrite, progress=False)
    except DivergenceError as e:  # a finding, not a crash: kept, so the cache answers it next time too
      write_json(os.path.join(workdir, DIVERGED), {"error": str(e)})
      raise
    log(f"  ran {config.strategy} {config.scenario.name}/{config.scenario.kind} seeds {config.seed}.."
        f"{config.seed + config.train.num_seeds - 1} sweep {config.train.sweep!r}: {time.time() - t0:.0f} s wall, "
        f"{time.process_time() - c0:.0f} s CPU, load {os.getloadavg()[0]:.1f}")
    path = os.path.join(workdir, "results.json")
  with open(path) as f:
    record = json.load(f)
  if os.path.basename(path) == DIVERGED:
    raise DivergenceError(record["error"])
  return record


def _equivalent_run(want: dict, workroot: str, defaults: dict | None = None) -> str | None:
  if not os.path.isdir(workroot):
    return None
  found = []
  for name in os.listdir(workroot):
    results = os.path.join(workroot, name, "results.json")
    if not os.path.exists(results):
      results = os.path.join(workroot, name, DIVERGED)
      if not os.path.exists(results):
        continue
    with open(os.path.join(workroot, name, "config.json")) as f:
      if _agree(_real_data_path(json.load(f)), _real_data_path(want), defaults):
        found.append((os.path.getmtime(results), results))
  return min(found)[1] if found else None


def _real_data_path(config: dict) -> dict:
  """`config` with data.path resolved: the same file reached from another worktree (`/work/main/../shared/...`) is
  the same run."""
  data = config.get("data")
  if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
    return {**config, "data": {**data, "path": os.path.realpath(data["path"])}}
  return config


def _agree(have, want, defaults=None) -> bool:
  """Does a finished run's config `have` serve for `want`? Shared keys equal; a key only `want` has must equal its
  value in `defaults` (the codebase's default config; no default known -> not equivalent)."""
  if isinstance(have, dict) and isinstance(want, dict):
    d = defaults if isinstance(defaults, dict) else {}
    return (all(_agree(have[k], want[k], d.get(k)) for k in set(have) & set(want))
            and all(k in d and want[k] == d[k] for k in set(want) - set(have)))
  return have == want


def settings_of(record: dict, config) -> list:
  """A results.json's per-setting summaries; a program of one run (one seed, at most one setting) writes a plain
  single-run record, given here the same shape: [{'overrides', 'acc': {'mean'}, ...}]."""
  if "settings" in record:
    return record["settings"]
  from cl_jax.train.seeds import parse_sweep
  (overrides,) = parse_sweep(config)
  return [{"overrides": overrides, "seeds": [int(config.seed)],
           **{k: {"mean": record[k]} for k in ("acc", "bwt", "fwt", "forgetting") if k in record}}]


def settings_from_sweeps(config, workroot: str) -> list | None:
  """The per-setting results of `config`'s sweep taken from finished runs of *other* sweeps, or None.

  Each setting of a sweep is exactly the single run of its seeds with those values (`cl_jax/train/seeds.py`), so a
  setting measured inside any finished sweep serves, whatever else that sweep held: re-checking λ=100 reuses a
  finished `ewc.lam=10,100` program. Every other setting of the configs must agree (as in `run_cached`); None
  unless every requested setting is found.
  """
  import ml_collections
  from cl_jax.kinds import base_config
  from cl_jax.train.loop import config_dict
  from cl_jax.train.seeds import parse_sweep
  if not os.path.isdir(workroot):
    return None
  want = config_dict(config)
  defaults = config_dict(base_config())
  want_train = {k: v for k, v in want["train"].items() if k != "sweep"}
  found = {}
  for name in sorted(os.listdir(workroot)):
    results = os.path.join(workroot, name, "results.json")
    if not os.path.exists(results):
      continue
    with open(os.path.join(workroot, name, "config.json")) as f:
      have = json.load(f)
    have_train = {k: v for k, v in have.get("train", {}).items() if k != "sweep"}
    if not _agree({**have, "train": have_train}, {**want, "train": want_train}, defaults):
      continue
    with open(results) as f:
      record = json.load(f)
    for setting in settings_of(record, ml_collections.ConfigDict(have)):
      found.setdefault(json.dumps(setting["overrides"], sort_keys=True), setting)
  asked = [json.dumps(o, sort_keys=True) for o in parse_sweep(config)]
  return [found[k] for k in asked] if all(k in found for k in asked) else None


def sweep_text(grid: dict) -> str:
  """{'ewc.lam': [1, 10]} -> 'ewc.lam=1,10' (keys joined by ';', as `train.sweep` reads it)."""
  return ";".join(f"{k}={','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
                  for k, vs in grid.items())


def select_on_validation(make_config, grid: dict, tuning_seed: int, num_tuning_seeds: int, workroot: str,
                         log=print) -> tuple[dict, list]:
  """Runs the whole `grid` on the validation split and returns (best overrides, [(overrides, mean val ACC)]).

  `make_config(seed, num_seeds, overrides)` builds the run's config; here it gets the validation split, the
  tuning seeds and the sweep. The best setting is the one with the highest mean validation ACC over the tuning
  seeds (ties: the first in grid order).
  """
  from cl_jax.config import set_overrides
  c = make_config(tuning_seed, num_tuning_seeds, {})
  set_overrides(c, {"data.validation_fraction": VALIDATION_FRACTION, "eval.split": "validation",
                    "train.sweep": sweep_text(grid)})
  settings = settings_from_sweeps(c, workroot)
  if settings is None:
    settings = settings_of(run_cached(c, workroot, log), c)
  scores = [(s["overrides"], s["acc"]["mean"]) for s in settings]
  best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
  for overrides, acc in scores:
    log(f"    {overrides}: validation ACC {100 * acc:.2f}")
  return scores[best][0], scores


def hill_climb(num_values: int, start: int, score) -> tuple[int, dict]:
  """Local search over an ordered 1-D grid: from index `start`, score both neighbours of the best point found so
  far and move to the better, until the best point's neighbours are both scored (or off the grid).

  `score(i)` is called at most once per index. Returns (best index, {index: score}). It moves only to a strictly
  better point (a tie keeps the current one; between two better neighbours with equal scores, the lower index).
  """
  scores = {}
  best = start
  while True:
    for i in (best - 1, best, best + 1):
      if 0 <= i < num_values and i not in scores:
        scores[i] = score(i)
    new = max(sorted(scores), key=lambda i: (scores[i], i == best, -i))
    if new == best:
      return best, scores
    best = new


def extend_geometric(values: list, steps: int) -> list:
  """`values` (increasing, positive) with `steps` more values past each end at the end's own ratio."""
  if steps <= 0 or len(values) < 2:
    return list(values)
  lo, hi = values[1] / values[0], values[-1] / values[-2]
  below = [values[0] / lo ** k for k in range(steps, 0, -1)]
  above = [values[-1] * hi ** k for k in range(1, steps + 1)]
  return [float(f"{v:.6g}") for v in below] + list(values) + [float(f"{v:.6g}") for v in above]


def refine_on_validation(make_config, grid: dict, start: dict, tuning_seed: int, num_tuning_seeds: int,
                         workroot: str, log=print, extend: int = 0) -> tuple[dict, list]:
  """Re-chooses a one-key `grid` on validation at the reported schedule, starting from a cheaper run's choice.

  A grid run at a shorter schedule (fewer iterations per task) picks `start`; with longer training each task's
  solution is sharper, and the best penalty strength can move. This scores `start` and its grid neighbours with
  `make_config` (the reported schedule), climbing to a neighbour while it is better (`hill_climb`), so the choice
  is a local optimum at the schedule the rows are run at. Each setting is its own cached program, and a setting
  already measured inside any finished sweep is reused (`settings_from_sweeps`), so climbing from a full grid's
  own choice costs nothing until it steps past the grid.

  `extend` > 0 appends that many values past each end of the grid, continuing its geometric step (λ grid
  1e2..1e6 -> up to 1e6·10^extend): a choice at the grid's edge says only that the best value may lie beyond it.
  Returns (best overrides, [(overrides, mean validation ACC)] in value order, only the settings scored).
  """
  if len(grid) != 1:
    raise ValueError(f"refine_on_validation searches one key at a time, got {sorted(grid)}")
  (key, values), = grid.items()
  if start[key] not in values:
    raise ValueError(f"the starting value {key}={start[key]} is not in the grid {values}")
  values = extend_geometric(list(values), extend)

  def score(i):
    try:
      return select_on_validation(make_config, {key: [values[i]]}, tuning_seed, num_tuning_seeds, workroot,
                                  log)[1][0][1]
    except DivergenceError as e:  # too strong a penalty can blow the loss up: the worst possible score
      log(f"    {{{key!r}: {values[i]}}}: diverged ({str(e)[:80]})")
      return float("-inf")

  best, scores = hill_climb(len(values), values.index(start[key]), score)
  return {key: values[best]}, [({key: values[i]}, scores[i]) for i in sorted(scores)]


def by_score(scores: list) -> list:
  """The settings of [(overrides, validation ACC)] from best to worst, without the diverged (-inf) and notes (None)."""
  scored = [(o, v) for o, v in scores if isinstance(v, float) and v > float("-inf")]
  return [o for o, _ in sorted(scored, key=lambda ov: -ov[1])]


def run_reported(make_config, candidates: list, workroot: str, log=print) -> tuple[dict, dict, list]:
  """Runs the reported seeds at the first of `candidates` (settings, best first); if it diverges, at the next.

  A setting at the edge of stability can pass on the tuning seed and diverge on a reported one (Split MNIST's
  task-IL online EWC at λ=1e8). Dropping the row would hide the method, so the row takes the next validated
  setting (the chosen one, then e.g. `by_score(scores)`), and the caller reports why. `make_config(overrides)`
  builds the reported run. Returns (results record, the setting it ran at, [each setting that diverged on a
  reported seed]); when every candidate diverges, the last DivergenceError propagates.
  """
  ranked = [o for i, o in enumerate(candidates) if o not in candidates[:i]]
  diverged = []
  for setting in ranked[:-1]:
    try:
      return run_cached(make_config(setting), workroot, log), setting, diverged
    except DivergenceError:
      log(f"  {fmt_setting(setting)} diverged on a reported seed; trying the next validated setting")
      diverged.append(setting)
  return run_cached(make_config(ranked[-1]), workroot, log), ranked[-1], diverged


def diverged_note(setting: dict) -> tuple[str, None]:
  """The entry a report's score list gets for a setting that diverged on a reported seed (`fmt_scores` shows it)."""
  return f"{fmt_setting(setting)} diverged on a reported seed", None


def stats(values) -> dict:
  """Mean, sample std and 95% t-interval half-width, in percent."""
  from cl_jax.train.seeds import aggregate
  return aggregate([100 * float(v) for v in values])


def fmt_score(v: float) -> str:
  """A validation ACC in percent; a setting that diverged scores -inf."""
  return "diverged" if v == float("-inf") else f"{100 * v:.1f}"


def fmt_setting(overrides: dict) -> str:
  """{'ewc.lam': 100.0} -> 'lam=100' ('—' for no overrides)."""
  return ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in overrides.items()) or "—"


def fmt_scores(scores: list) -> str:
  """[(overrides, validation ACC)] -> 'lam=10: 84.3; lam=100: 87.0'; an entry scored None is a note, shown as is."""
  return "; ".join(o if v is None else f"{fmt_setting(o)}: {fmt_score(v)}" for o, v in scores)


def fmt_ci(s: dict) -> str:
  if s["mean"] is None:
    return "—"
  return f"{s['mean']:.1f} ± {s['ci95']:.1f}" if s["ci95"] is not None else f"{s['mean']:.1f}"


def runs_of(record: dict) -> list:
  """The reported runs of a many-seed record (the first and only setting), or the single run itself."""
  return record["runs"] if "runs" in record else [record]


def compare(ours: dict, published) -> str:
  """'' when the published number lies within 2 points of our mean (or there is none), else the gap."""
  if published is None or ours["mean"] is None:
    return ""
  gap = ours["mean"] - published
  return "" if abs(gap) <= 2 else f"{gap:+.1f}"


def write_markdown(path: str, lines: list) -> None:
  """Writes a results table, followed by the hand-written `<name>.notes.md` beside it when there is one."""
  notes_path = os.path.splitext(path)[0] + ".notes.md"
  if os.path.exists(notes_path):
    with open(notes_path) as f:
      lines = [*lines, f.read().strip(), ""]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def portable(obj):
  """`obj` with every absolute path inside the checkout's folder (or the folder beside it, where runs/ and
  shared/ may live) rewritten relative to the checkout: a results file names what a fresh clone has, not this
  machine's paths."""
  if isinstance(obj, dict):
    return {k: portable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(portable(v) for v in obj)
  if isinstance(obj, str) and os.path.isabs(obj) and obj.startswith(os.path.dirname(ROOT) + os.sep):
    return os.path.relpath(obj, ROOT)
  return obj


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(portable(obj), f, indent=1, sort_keys=True, default=float)


def t_interval_of_difference(a, b) -> tuple[float, float]:
  """Welch 95% interval of mean(a) − mean(b), in the units given."""
  from cl_jax.train.seeds import t_quantile_975
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
  half = t_quantile_975(max(1, int(math.floor(dof)))) * math.sqrt(va + vb)
  d = a.mean() - b.mean()
  return d - half, d + half
