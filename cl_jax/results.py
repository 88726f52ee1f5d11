"""`Results`: what every run returns (classic, lm, merge) and what `Results.load(workdir)` reads back.

A run's `results.json` is `Results.as_dict()`: `kind`, the accuracy matrix and its summaries where the run has
one (classic: R[j, i] = accuracy on task i after training task j, row 0 before any training; see
`cl_jax.eval.metrics` for ACC / BWT / FWT / forgetting), and the kind's own record under the remaining keys
(`extra`: timing, strategy settings, an LM run's monitor history and test metrics, ...), and `provenance`: what
produced the numbers (`provenance(config)`: commit, package versions, devices, processes, config hash), so a
results file can be traced back to the code and machine that wrote it.

This module is infrastructure: it imports no run kind (an LM run's monitor figure lives in `cl_jax.report`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess

import numpy as np

SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting")
# The distributions whose versions decide a run's numbers; provenance records each (None when not installed).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "cl-jax")


def config_sha256(config) -> str | None:
  """sha256 of the config's canonical JSON (keys sorted, no whitespace); None for no config.

  The full config, as the run's config.json holds it (a ConfigDict or that dict loaded back hash the same), not
  `cl_jax.config.comparable`: the hash then says exactly which config produced the numbers and can be checked
  against config.json with no cl_jax code, while `comparable` (which drops sections no strategy of the run reads)
  belongs to the config layer above this one and decides only whether a workdir may be resumed. Two runs with
  the same hash ran the same config; two hashes may still be the same run by `comparable`.
  """
  if config is None:
    return None
  if hasattr(config, "to_json_best_effort"):  # an ml_collections ConfigDict
    d = json.loads(config.to_json_best_effort(sort_keys=True))
  else:
    d = json.loads(json.dumps(dict(config), default=str))
  text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def git_commit(path: str | None = None) -> dict | None:
  """{'rev': HEAD's sha, 'dirty': whether tracked files differ from it} of the git checkout cl_jax runs from.

  None when cl_jax is not in a git checkout of its own (an installed wheel, no git on the machine, a
  checkout git refuses to read): provenance never fails a run. `path` is the checkout's root (default: the
  folder above the cl_jax package); a repository that merely contains it (a virtual environment inside some
  other project) does not count. Untracked files do not make it dirty (runs/ and scratch files would).
  """
  root = os.path.abspath(path or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def git(*args) -> str:
    out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()

  try:
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
      return None
    rev = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return None
  return {"rev": rev, "dirty": dirty}


def package_versions() -> dict:
  """{distribution: version} of `PACKAGES`, plus the Python version (None for one not installed)."""
  from importlib import metadata
  versions = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def provenance(config=None) -> dict:
  """What produced a run's results: results.json holds it under `provenance`, for every kind.

  commit (`git_commit`), packages (`package_versions`), backend, device kind, device counts (all processes, this
  one), process count and config_sha256 (`config_sha256` of the config the run was given, the one in its
  config.json). Called at the end of a run, on the process that writes results.json; JAX is initialized by then.
  """
  import jax
  devices = jax.devices()
  return {"commit": git_commit(), "packages": package_versions(), "backend": jax.default_backend(),
          "device_kind": devices[0].device_kind if devices else None, "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
          "config_sha256": config_sha256(config)}


@dataclasses.dataclass
class Results:
  kind: str                                  # classic | lm | merge
  workdir: str
  accuracy_matrix: np.ndarray | None = None  # [T + 1, T] (classic), [1, T] (merge), None (lm)
  acc: float | None = None
  bwt: float | None = None
  fwt: float | None = None
  forgetting: float | None = None
  extra: dict = dataclasses.field(default_factory=dict)
  provenance: dict | None = None             # `provenance(config)`; None for results built by hand

  def as_dict(self) -> dict:
    """results.json: kind, the matrix and its summaries (those the run has), `extra`, then `provenance`."""
    d = {"kind": self.kind}
    if self.accuracy_matrix is not None:
      d["accuracy_matrix"] = np.asarray(self.accuracy_matrix).tolist()
    d.update({k: getattr(self, k) for k in SUMMARY_KEYS if getattr(self, k) is not None})
    d.update(self.extra)
    if self.provenance is not None:
      d["provenance"] = self.provenance
    return d

  @classmethod
  def from_dict(cls, d: dict, workdir: str, kind: str | None = None) -> "Results":
    d = dict(d)
    kind = d.pop("kind", None) or kind or "classic"
    matrix = d.pop("accuracy_matrix", None)
    summaries = {k: d.pop(k, None) for k in SUMMARY_KEYS}
    prov = d.pop("provenance", None)
    return cls(kind, workdir, None if matrix is None else np.asarray(matrix, np.float64), **summaries, extra=d,
               provenance=prov)

  @classmethod
  def load(cls, workdir: str) -> "Results":
    """Reads `<workdir>/results.json` of a finished run (any kind)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file (the run has not finished)")
    with open(path) as f:
      d = json.load(f)
    kind = None
    config_path = os.path.join(workdir, "config.json")
    if "kind" not in d and os.path.isfile(config_path):
      with open(config_path) as f:
        kind = json.load(f).get("kind")
    return cls.from_dict(d, workdir, kind)

  def metrics(self, type: str | None = None) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` (optionally only those of one `type`: train | eval)."""
    from cl_jax.workdir import read_metrics
    return [r for r in read_metrics(self.workdir) if type is None or r.get("type") == type]

  def summary(self) -> str:
    """A Markdown summary: the accuracy matrix and ACC / BWT / FWT / forgetting, or the run's summary.md."""
    from cl_jax import report
    e = self.extra
    title = e.get("title") or (f"{e['strategy']} — {e['scenario']} ({e.get('data', '')})" if "scenario" in e
                               else f"{self.kind} run in {self.workdir}")
    if self.accuracy_matrix is not None and np.asarray(self.accuracy_matrix).shape[0] > 1:
      return report.summary_text(self.as_dict(), title)
    path = os.path.join(self.workdir, "summary.md")
    if os.path.isfile(path):
      with open(path) as f:
        return f.read()
    scalars = {k: v for k, v in self.as_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return f"# {title}\n\n| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.6g} |" for k, v in scalars.items())

  def _repr_markdown_(self) -> str:
    return self.summary()

  def plot(self):
    """A matplotlib Figure (no display needed): the matrix heat map and accuracy curves, or the LM monitor."""
    from cl_jax import report
    if self.kind == "lm" and "history" in self.extra:
      e = self.extra
      return report.monitor_figure(e["history"], e["baseline"], e["threshold"], best_step=e.get("best_step"),
                            stopped_step=(e.get("stopped") or {}).get("step"), benchmarks=e.get("benchmarks"))
    if self.accuracy_matrix is None:
      raise ValueError(f"{self.kind} results in {self.workdir} have nothing to plot")
    return report.overview_figure(self.accuracy_matrix, self.metrics("eval"))
