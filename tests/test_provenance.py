"""results.json says what produced it: `provenance` (commit, package versions, devices, processes, config hash) in
every kind's results; `cl_jax.results` stays infrastructure (it draws an LM run's figure without LM modules); and
pyproject.toml declares every package cl_jax imports."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config
from cl_jax.results import Results, config_sha256, git_commit, provenance

KEYS = {"commit", "packages", "backend", "device_kind", "device_count", "local_device_count", "process_count",
        "config_sha256"}
# A two-task quickstart of a few steps: the README's command, small enough to run in seconds.
TINY = ["--config.train.steps_per_task=5", "--config.scenario.num_tasks=2", "--config.model.hidden=[16]",
        "--config.eval.every_steps=0", "--config.checkpoint.every_steps=0", "--no_progress"]


def _git(*args, cwd):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_cli_from_another_directory_runs_the_installed_config_and_records_provenance(tmp_path):
  """`cl-jax --config configs/quickstart.py:...` from outside the checkout (README: 'from anywhere')."""
  workdir = tmp_path / "qs"
  proc = subprocess.run([sys.executable, "-c", "from cl_jax.cli import console_main; console_main()",
                         "--config", "configs/quickstart.py:scenario=task", *TINY, "--workdir", "qs"],
                        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  config = json.loads((workdir / "config.json").read_text())
  assert config["scenario"]["kind"] == "task" and config["train"]["steps_per_task"] == 5
  p = results["provenance"]
  assert set(p) == KEYS
  assert p["config_sha256"] == config_sha256(config)  # the hash of exactly the config.json next to it
  assert (p["backend"], p["device_count"], p["local_device_count"], p["process_count"]) == ("cpu", 1, 1, 1)
  assert p["packages"]["jax"] and p["packages"]["numpy"] and p["packages"]["python"]
  assert set(p["packages"]) == {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "cl-jax"}
  if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):  # a checkout (or a worktree of one)
    assert p["commit"]["rev"] == _git("rev-parse", "HEAD", cwd=ROOT)
    assert isinstance(p["commit"]["dirty"], bool)
  # Loaded back: the record is the Results' own field, and as_dict writes the same file again.
  loaded = Results.load(str(workdir))
  assert loaded.provenance == p and "provenance" not in loaded.extra
  assert loaded.as_dict() == results


def test_a_missing_config_is_refused_with_exit_2_from_any_directory(tmp_path):
  proc = subprocess.run([sys.executable, "-c", "from cl_jax.cli import console_main; console_main()",
                         "--config", "configs/no_such_config.py", "--workdir", "w"], cwd=tmp_path,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: --config 'configs/no_such_config.py': no such file (here or in the installed "
                                 "configs package)")
  assert not (tmp_path / "w").exists()


def test_a_local_configs_folder_wins_over_the_installed_one(tmp_path, monkeypatch):
  from cl_jax.cli import load_config
  local = tmp_path / "configs"
  local.mkdir()
  (local / "quickstart.py").write_text("from cl_jax.kinds import base_config\n\n\ndef get_config(arg=''):\n"
                                       "  c = base_config()\n  c.train.steps_per_task = 3\n  return c\n")
  monkeypatch.chdir(tmp_path)
  assert load_config("configs/quickstart.py").train.steps_per_task == 3
  (local / "quickstart.py").unlink()
  assert load_config("configs/quickstart.py").train.steps_per_task == 200  # the installed one


def test_config_hash_changes_with_the_config_and_nothing_else():
  a, b = tiny_config(), tiny_config()
  assert config_sha256(a) == config_sha256(b) == config_sha256(json.loads(a.to_json_best_effort()))
  shuffled = dict(reversed(list(json.loads(a.to_json_best_effort()).items())))  # key order does not count
  assert config_sha256(shuffled) == config_sha256(a)
  b.optim.lr = a.optim.lr * 2
  assert config_sha256(b) != config_sha256(a)
  c = tiny_config()
  c.model.hidden = [65]
  assert config_sha256(c) != config_sha256(a)
  assert config_sha256(None) is None


def test_seeds_run_records_provenance_of_its_config(tmp_path):
  import cl_jax
  c = tiny_config(steps=5)
  c.scenario.num_tasks = 2
  c.train.num_seeds = 2
  r = cl_jax.run(c, str(tmp_path / "seeds"), progress=False)
  saved = json.loads((tmp_path / "seeds" / "results.json").read_text())
  assert saved["num_runs"] == 2 and set(saved["provenance"]) == KEYS
  assert saved["provenance"]["config_sha256"] == config_sha256(c) == r.provenance["config_sha256"]


def test_git_commit_of_a_checkout_and_of_no_checkout(tmp_path):
  if shutil.which("git") is None:
    pytest.skip("no git on this machine")
  plain = tmp_path / "plain"
  plain.mkdir()
  assert git_commit(str(plain)) is None  # not a checkout: None, never an error
  repo = tmp_path / "repo"
  repo.mkdir()
  _git("init", "-q", cwd=repo)
  (repo / "a.py").write_text("x = 1\n")
  _git("add", "a.py", cwd=repo)
  _git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one", cwd=repo)
  rev = _git("rev-parse", "HEAD", cwd=repo)
  assert git_commit(str(repo)) == {"rev": rev, "dirty": False}
  (repo / "notes.txt").write_text("untracked\n")
  assert git_commit(str(repo)) == {"rev": rev, "dirty": False}  # untracked files (runs/, scratch) do not count
  (repo / "a.py").write_text("x = 2\n")
  assert git_commit(str(repo)) == {"rev": rev, "dirty": True}
  inner = repo / "pkg"
  inner.mkdir()
  assert git_commit(str(inner)) is None  # inside another repository, not the root of one: not our checkout


def test_provenance_without_a_config_and_results_built_by_hand():
  p = provenance()
  assert set(p) == KEYS and p["config_sha256"] is None
  assert "provenance" not in Results("merge", "w").as_dict()


def test_results_plot_an_lm_run_without_importing_lm():
  """results.py is infrastructure: plotting a finished LM run's monitor must not import cl_jax.lm."""
  code = ("import sys\nfrom cl_jax.results import Results\n"
          "h = [{'step': s, 'regressions': {'general/perplexity': 0.01 * s}, 'metrics': {'domain/perplexity': 10 - s}}"
          " for s in (0, 1, 2)]\n"
          "r = Results('lm', 'w', extra={'history': h, 'baseline': {'domain/perplexity': 10.0}, 'threshold': 0.02,"
          " 'best_step': 1})\n"
          "fig = r.plot()\nassert len(fig.axes) == 2, fig.axes\n"
          "assert not [m for m in sys.modules if m.startswith('cl_jax.lm')], sorted(sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_third_party_import_of_cl_jax_is_a_declared_dependency():
  """pyproject.toml names every distribution cl_jax imports (a dependency, or an extra for optional data sources)."""
  import ast
  import re
  import tomllib
  from importlib.metadata import packages_distributions
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
  normalize = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
  declared = {normalize(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in declared}
  imported = set()
  for folder, _, files in os.walk(os.path.join(ROOT, "cl_jax")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name)) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
  third_party = imported - set(sys.stdlib_module_names) - {"cl_jax", "configs"}
  owners = packages_distributions()
  missing = {m: owners.get(m, [m]) for m in third_party
             if not any(normalize(d) in declared for d in owners.get(m, [m]))}
  assert not missing, f"imported by cl_jax but not in pyproject.toml: {missing}"
