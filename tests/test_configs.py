"""Every `configs/*.py` loads and validates with each documented arg and with every launch line of its docstring
(nothing trains); `train.epochs_per_task` sets each task's steps from its data."""
import glob
import os
import re
import shlex

import numpy as np
import pytest

from cl_jax.cli import build_config
from cl_jax.kinds import KINDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))

# Each documented value of each `get_config(arg)` key (the docstrings' "arg:" lines). A new config needs a line.
ARGS = {
    "quickstart.py": ["", "scenario=class", "scenario=task", "scenario=domain", "strategy=joint",
                      "scenario=task,strategy=ewc+replay", "strategy=online_ewc+lwf", "strategy=olora"],
    "split_mnist.py": ["", "scenario=class", "scenario=task", "scenario=domain", "scenario=task,strategy=ewc+replay"],
    "permuted_mnist.py": ["", "scenario=domain", "scenario=task", "scenario=class,strategy=ewc", "num_tasks=3"],
    "rotated_mnist.py": ["", "scenario=domain", "scenario=task", "scenario=class,strategy=lwf", "num_tasks=3"],
    "split_mnist1d.py": ["", "scenario=class", "scenario=task", "scenario=domain", "model=cnn", "strategy=replay"],
    "cpt_lm.py": ["", "mixture=domain_only", "mixture=general_only", "mixture=70_30", "mixture=three_phase",
                  "mixture=two_phase", "mixture=cyclical", "mixture=difficulty", "schedule=wsd", "schedule=cosine",
                  "strategy=naive", "strategy=distill", "strategy=ewc", "strategy=generative_replay",
                  "strategy=lora", "mixture=domain_only,strategy=lora+distill", "size=tiny", "size=small",
                  "size=1b"],
    "cpt_hf.py": ["path=tests/fixtures/hf/llama,domain=my_corpus/", "path=tests/fixtures/hf/gpt2,domain=notes,"
                  "general=notes/general,mixture=two_phase,schedule=cosine,strategy=lora+distill,steps=10",
                  "path=tests/fixtures/hf/qwen2,domain=code,strategy=ewc", "path=tests/fixtures/hf/mistral,"
                  "domain=x/,strategy=generative_replay,mixture=difficulty"],
    "progressive.py": ["", "router=none", "router=prototypes", "router=entropy", "router=prototypes,data=mnist"],
    "cit.py": ["", "strategy=replay,replay=0.05", "strategy=replay+distill,replay=0.1", "strategy=lwf",
               "prompts=off", "prompts=system", "prompts=tag", "tasks=default", "tasks=two", "tasks=all",
               "steps=30", "size=small"],
    "merging_specialists.py": ["", "tasks=1", "strategy=ewc,tasks=2-3-4-5,ewc_lam=1000", "strategy=lora,rank=4",
                               "strategy=olora,olora_lambda1=0.1", "strategy=progressive,router=prototypes,split=test",
                               "data=mnist,hidden=256-256,steps=300,batch=128,lr=1e-3,val=0.1,seed=1"],
    "merge.py": [f"method={m},run=runs/seq" for m in ("linear", "task_arithmetic", "ties", "dare_linear",
                                                        "dare_ties", "slerp")] + ["run=runs/seq,base_task=2,tasks=4"],
}


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
  """A tiny Keras-format mnist.npz: validation reads only its file list."""
  path = str(tmp_path_factory.mktemp("data") / "mnist.npz")
  x, y = np.zeros((20, 28, 28), np.uint8), np.arange(20, dtype=np.uint8) % 10
  np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
  return path


@pytest.fixture(autouse=True)
def _in_root_with_mnist(monkeypatch, fake_mnist):
  """From the checkout's root; configs on MNIST find it through $CL_JAX_MNIST (launch lines' data.path dropped)."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("CL_JAX_MNIST", fake_mnist)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 5-task task-IL run (2 steps a task): the checkpoints merge configs refer to."""
  import cl_jax
  from conftest import tiny_config
  workdir = str(tmp_path_factory.mktemp("runs") / "seq")
  cl_jax.run(tiny_config(kind="task", steps=2), workdir, progress=False)
  return workdir


def _with_runs(items, name, request):
  """Merge configs name run directories (runs/seq, runs/a, ...): point them at a finished run. The HF config names
  corpus directories of the user's (my_corpus/, notes/general, ...): point them at a directory with a text file,
  as validation lists a `dir:` corpus (a missing or empty one is refused)."""
  if name == "cpt_hf.py":
    corpus = request.getfixturevalue("tmp_path") / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "doc.txt").write_text("A document of the user's own corpus.\n")
    sub = lambda m: f"{m.group(1)}={corpus}" if ("/" in m.group(2) or m.group(2) == "notes") else m.group(0)
    return [re.sub(r"\b(domain|general)=([^,\s]+)", sub, item) for item in items]
  if name != "merge.py":
    return items
  run = request.getfixturevalue("finished_run")
  return [re.sub(r"runs/(seq|a|b|c)\b", run, item) for item in items]


def test_every_config_is_covered():
  assert sorted(ARGS) == CONFIGS, "add the new config's documented args to ARGS"


@pytest.mark.parametrize("name, arg", [(n, a) for n in sorted(ARGS) for a in ARGS[n]])
def test_config_loads_and_validates_with_each_documented_arg(name, arg, tmp_path, request):
  spec = _with_runs([f"configs/{name}:{arg}" if arg else f"configs/{name}"], name, request)[0]
  config, args = build_config(["--config", spec, "--workdir", str(tmp_path / "w")])
  assert config.kind in KINDS and args.workdir == str(tmp_path / "w")
  assert not (tmp_path / "w").exists()


def _launch_lines(name):
  """The `python run.py ...` commands in a config's docstring (continued lines joined, comments dropped)."""
  with open(os.path.join(ROOT, "configs", name)) as f:
    text = f.read()
  docstring = text.split('"""')[1] if text.lstrip().startswith('"""') else ""
  lines, current = [], ""
  for line in docstring.splitlines():
    line = line.strip()
    if current or line.startswith("python run.py"):
      current += " " + line.rstrip("\\").strip()
      if not line.endswith("\\"):
        lines.append(shlex.split(current, comments=True)[2:])
        current = ""
  return lines


LAUNCHES = [(n, i, line) for n in CONFIGS for i, line in enumerate(_launch_lines(n))]


def test_every_config_documents_a_launch_line():
  assert {n for n, _, _ in LAUNCHES} == set(CONFIGS)


@pytest.mark.parametrize("name, index, argv", LAUNCHES, ids=[f"{n}-{i}" for n, i, _ in LAUNCHES])
def test_docstring_launch_line_validates(name, index, argv, tmp_path, monkeypatch, request):
  argv = _with_runs([a for a in argv if not a.startswith("--config.data.path=")], name, request)
  if "--workdir" in argv:
    i = argv.index("--workdir")
    del argv[i:i + 2]
  if any(a.startswith("--config.mesh.") for a in argv):
    import jax
    monkeypatch.setattr(jax, "device_count", lambda *a: 64)   # a pod launch: validate as on its devices
  config, _ = build_config([*argv, "--workdir", str(tmp_path / "w")])
  assert config.kind in KINDS


@pytest.mark.parametrize("strategy", ["naive", "joint"])
def test_epochs_per_task_trains_each_task_for_that_many_passes(strategy, tmp_path):
  """steps of task t = epochs * (n_t // batch), n_t the examples task t trains on (all tasks so far for joint)."""
  import cl_jax
  from cl_jax.data.scenarios import make_scenario
  from cl_jax.data.sources import load_source
  from conftest import tiny_config
  epochs, batch = 2, 64
  c = tiny_config(strategy, steps=1, **{"scenario.num_tasks": 2, "train.epochs_per_task": epochs,
                                        "train.batch_size": batch})
  scenario = make_scenario(load_source(c.data), c.scenario, multi_head=c.model.multi_head)
  n = [t.num_train for t in scenario.tasks]
  seen = n if strategy == "naive" else [n[0], n[0] + n[1]]
  expected = [epochs * (k // batch) for k in seen]
  assert expected[0] > 1 and (strategy == "naive" or expected[1] > expected[0])
  results = cl_jax.run(c, str(tmp_path / "run"), progress=False)
  boundaries = [r["step"] for r in results.metrics() if r.get("type") == "eval" and r.get("boundary")]
  assert boundaries == [0, expected[0], expected[0] + expected[1]]
