"""The command line: typed overrides (`cli.parse_value`), config files, and bad input refused with exit 2, one line
naming the full key or path, no traceback, and the workdir untouched."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cl_jax.cli import load_config, main, parse_value
from cl_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("text, current, expected", [
    ("true", False, True), ("False", True, False), ("1", False, True), ("no", True, False),
    ("3", 0, 3), ("-2", 5, -2),
    ("3", 0.5, 3.0), ("1e-3", 0.5, 1e-3), ("-0.25", 0.5, -0.25),
    ("[64, 32]", [400], [64, 32]), ("(1, 2)", [], [1, 2]), ("[]", [3], []),
    ("ewc+replay", "naive", "ewc+replay"), ("123", "naive", "123"), ("[1]", "x", "[1]"),
    ("None", None, None), ("abc", None, "abc"),
])
def test_parse_value_types_the_text_like_the_field(text, current, expected):
  value = parse_value(text, current, "a.b")
  assert value == expected and type(value) is type(expected)


def test_parse_value_float_keys_take_inf_and_nan_for_validation_to_refuse():
  assert parse_value("1e999", 0.1, "optim.lr") == float("inf")
  assert np.isnan(parse_value("nan", 0.1, "optim.lr"))


@pytest.mark.parametrize("text, current, message", [
    ("maybe", True, "a.b='maybe': expected true or false"),
    ("2.5", 3, "a.b='2.5': expected an integer"),
    ("abc", 3, "a.b='abc': expected an integer"),
    ("True", 3, "a.b='True': expected an integer"),
    ("abc", 0.5, "a.b='abc': expected a number"),
    ("5", [1], "a.b='5': expected a list"),
])
def test_parse_value_refuses_a_value_of_another_type(text, current, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
    parse_value(text, current, "a.b")


def _refused(capsys, workdir, *args, config="configs/quickstart.py"):
  """Runs the CLI; asserts exit 2, an untouched workdir, and returns the one-line message."""
  rc = main(["--config", config, *args, "--workdir", str(workdir), "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2, err
  assert not workdir.exists()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
  return err


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=abc", "train.batch_size='abc': expected an integer"),
    ("train.batch_size=12.5", "train.batch_size='12.5': expected an integer"),
    ("optim.lr=fast", "optim.lr='fast': expected a number"),
    ("optim.lr=1e999", "optim.lr=inf: must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("model.multi_head=maybe", "model.multi_head='maybe': expected true or false"),
    ("model.hidden=64", "model.hidden='64': expected a list"),
    ("strategy=ewc+ewc", "strategy='ewc+ewc': ['ewc'] named more than once"),
    ("strategy=ewc++", "strategy='ewc++': empty strategy name"),
    ("strategy=+", "strategy='+': empty strategy name"),
    ("data.name=tfds:mnistt", "data.name='tfds:mnistt': tensorflow-datasets has no dataset 'mnistt'"),
    ("kind=sft", "kind='sft': expected one of"),
])
def test_bad_override_exits_2_naming_the_key(tmp_path, capsys, override, message):
  assert message in _refused(capsys, tmp_path / "run", f"--config.{override}")


def _config_file(tmp_path, body):
  path = tmp_path / "my_config.py"
  path.write_text("from cl_jax.kinds import base_config\n\n\ndef get_config(arg=''):\n  c = base_config()\n"
                  + "".join(f"  {line}\n" for line in body) + "  return c\n")
  return str(path)


@pytest.mark.parametrize("body, message", [
    (["c.train.batch_size = 12.5"], "error: train.batch_size: expected an integer, got a float"),
    (["c.train.steps_per_task = '10'"], "error: train.steps_per_task: expected an integer, got a str"),
    (["c.optim.lr = float('inf')"], "optim.lr=inf: must be a finite number"),
    (["c.optim.lr = float('nan')"], "optim.lr=nan: must be a finite number"),
    (["c.model.hidden = [64, 'wide']"], "model.hidden=[64, 'wide']: item 1 is 'wide'; expected an integer"),
    (["with c.unlocked():", "  c.train = dict(c.train.to_dict(), batch_size=3.0)"],
     "train.batch_size=3.0: expected an integer"),
    (["c.strategy = 'replay+ewc+replay'"], "strategy='replay+ewc+replay': ['replay'] named more than once"),
])
def test_bad_value_in_a_config_file_exits_2_naming_the_key(tmp_path, capsys, body, message):
  assert message in _refused(capsys, tmp_path / "run", config=_config_file(tmp_path, body))


def test_config_file_with_a_syntax_error(tmp_path, capsys):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(arg=''):\n  return base_config(\n")
  err = _refused(capsys, tmp_path / "run", config=str(path))
  assert f"--config {str(path)!r}: syntax error at line" in err


def _raw_config_file(tmp_path, text, name="my_config.py"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("text, message", [
    ("def get_config(arg=''):\n  x = 1\n  return x / 0\n",
     "get_config raised ZeroDivisionError: division by zero (line 3 of {path})"),
    ("def get_config(arg=''):\n  raise RuntimeError('no such experiment')\n",
     "get_config raised RuntimeError: no such experiment (line 2 of {path})"),
    ("def get_config(arg=''):\n  import cl_jax_no_such_module\n",
     "get_config raised ModuleNotFoundError: No module named 'cl_jax_no_such_module' (line 2 of {path})"),
    ("def get_config(arg=''):\n  return len(None)\n",
     "get_config raised TypeError: object of type 'NoneType' has no len() (line 2 of {path})"),
    ("import cl_jax_no_such_module\n\n\ndef get_config(arg=''):\n  return None\n",
     "cannot import: No module named 'cl_jax_no_such_module' (line 1 of {path})"),
    ("STEPS = 10 // 0\n\n\ndef get_config(arg=''):\n  return None\n",
     "importing it raised ZeroDivisionError: integer division or modulo by zero (line 1 of {path})"),
    ("get_config = 3\n", "defines no get_config(arg)"),
])
def test_config_file_that_fails_exits_2_naming_the_file_and_line(tmp_path, capsys, text, message):
  """Issue 23: a config file's own bug (at import or inside get_config) is one line naming the file, not a
  traceback through cli.py."""
  path = _raw_config_file(tmp_path, text)
  err = _refused(capsys, tmp_path / "run", config=path)
  assert err.startswith(f"error: --config {path!r}: ") and err.endswith(message.format(path=path)), err


@pytest.mark.parametrize("returned, shown", [("None", "None"), ("{'seed': 1}", "a dict ({'seed': 1})"),
                                             ("[1, 2]", "a list ([1, 2])")])
def test_get_config_must_return_a_config_dict(tmp_path, capsys, returned, shown):
  path = _raw_config_file(tmp_path, f"def get_config(arg=''):\n  return {returned}\n")
  err = _refused(capsys, tmp_path / "run", config=path)
  assert err == (f"error: --config {path!r}: get_config returned {shown}; it must return an ml_collections.ConfigDict,"
                 " e.g. cl_jax.kinds.base_config() or cl_jax.kinds.default_config(kind) with its values set")


def test_syntax_error_in_a_module_the_config_imports_names_that_module(tmp_path, capsys):
  pkg = tmp_path / "badpkg_h23"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "helpers.py").write_text("x = (\n")
  path = _raw_config_file(pkg, "from badpkg_h23.helpers import x\n\n\ndef get_config(arg=''):\n  return x\n")
  try:
    err = _refused(capsys, tmp_path / "run", config=path)
  finally:
    sys.modules.pop("badpkg_h23", None)
  assert err.startswith(f"error: --config {path!r}: syntax error at line 1 of {pkg / 'helpers.py'}: "), err


@pytest.mark.parametrize("override, message", [
    ("optim={'lr': 0.1}", "optim={'lr': 0.1}: is a section and cannot be set whole; set its keys one by one, e.g. "
                          "--config.optim.lr=0.1; its keys are: ["),
    ("optim=3", "optim=3: is a section and cannot be set whole; set its keys one by one, e.g. --config.optim."),
    ("train={}", "train={}: is a section and cannot be set whole"),
])
def test_a_whole_section_cannot_be_overridden(tmp_path, capsys, override, message):
  err = _refused(capsys, tmp_path / "run", f"--config.{override}")
  assert err.startswith(f"error: {message}"), err


@pytest.mark.parametrize("seed", [2**70, 2**32, -1])
def test_seed_must_fit_the_prng(tmp_path, capsys, seed):
  """jax.random.PRNGKey keeps 32 bits of a seed (2**32 would silently be seed 0) and overflows past 2**63."""
  err = _refused(capsys, tmp_path / "run", f"--config.seed={seed}")
  assert err == f"error: seed={seed}: must be an integer in [0, 4294967295]"
  err = _refused(capsys, tmp_path / "run", config=_config_file(tmp_path, [f"c.seed = {seed}"]))
  assert err == f"error: seed={seed}: must be an integer in [0, 4294967295]"


def test_largest_seed_is_accepted():
  from cl_jax.cli import build_config
  config, _ = build_config(["--config", "configs/quickstart.py", f"--config.seed={2**32 - 1}"])
  assert config.seed == 2**32 - 1


@pytest.mark.parametrize("spelling, where", [("ewc + replay", "override"), (" ewc+ replay ", "override"),
                                             ("ewc +  replay", "file")])
def test_strategy_chain_is_normalised(tmp_path, spelling, where):
  """'ewc + replay' is 'ewc+replay': the config (and so config.json) holds one spelling, and compares equal."""
  from cl_jax.cli import build_config
  from cl_jax.config import comparable
  if where == "file":
    args = ["--config", _config_file(tmp_path, [f"c.strategy = {spelling!r}"])]
  else:
    args = ["--config", "configs/quickstart.py", f"--config.strategy={spelling}"]
  config, _ = build_config(args)
  assert config.strategy == "ewc+replay"
  spaced = comparable(config)
  spaced["strategy"] = spelling   # a config.json written before chains were normalised
  assert comparable(spaced) == comparable(config)


@pytest.mark.parametrize("second, shown", [(["--config", "configs/split_mnist.py"], "configs/split_mnist.py"),
                                           (["--config=configs/quickstart.py"], "configs/quickstart.py")])
def test_a_second_config_flag_is_refused(tmp_path, capsys, second, shown):
  """argparse keeps the last of two silently: the run would not be the one the first flag named."""
  err = _refused(capsys, tmp_path / "run", *second)
  assert err == (f"error: --config {shown!r}: given twice (first 'configs/quickstart.py'); pass one config file "
                 "and change its values with --config.KEY=VALUE")


def test_dangling_symlink_workdir_is_refused(tmp_path, capsys):
  target = tmp_path / "gone" / "run"
  link = tmp_path / "run"
  link.symlink_to(target)
  err = _refused(capsys, link)
  assert err == (f"error: workdir {str(link)!r} is a symbolic link to {str(target)!r}, which leads nowhere (its target "
                 "does not exist, or the links loop); remove the link or create its target")
  err = _refused(capsys, link / "sub")
  assert err.startswith(f"error: workdir {str(link / 'sub')!r} lies under {str(link)!r}, which is a symbolic link")
  loop = tmp_path / "loop"
  loop.symlink_to(loop)
  assert "which leads nowhere" in _refused(capsys, loop)
  assert link.is_symlink() and not (tmp_path / "gone").exists()   # the link is left as it was, nothing created


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _mnist_like(path, n=20):
  x = np.zeros((n, 28, 28), np.uint8)
  y = np.arange(n, dtype=np.uint8) % 10
  return _npz(path, x_train=x, y_train=y, x_test=x, y_test=y)


def test_bad_data_paths(tmp_path, capsys):
  workdir = tmp_path / "run"
  mnist = ["--config.data.name=mnist"]
  err = _refused(capsys, workdir, *mnist, f"--config.data.path={tmp_path}")
  assert f"data.path={str(tmp_path)!r}: is a directory" in err

  text = tmp_path / "notes.txt"
  text.write_text("not an archive")
  err = _refused(capsys, workdir, *mnist, f"--config.data.path={text}")
  assert f"data.path={str(text)!r}: not an npz archive, or a truncated one" in err

  good = _mnist_like(tmp_path / "mnist.npz")
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(open(good, "rb").read()[:-100])
  err = _refused(capsys, workdir, *mnist, f"--config.data.path={truncated}")
  assert f"data.path={str(truncated)!r}: not an npz archive, or a truncated one" in err

  wrong = _npz(tmp_path / "wrong.npz", images=np.zeros(3))
  err = _refused(capsys, workdir, *mnist, f"--config.data.path={wrong}")
  assert "missing arrays ['x_test', 'x_train', 'y_test', 'y_train']" in err

  damaged = tmp_path / "damaged.npz"  # the zip directory is intact, a member's bytes are not
  data = bytearray(open(good, "rb").read())
  with zipfile.ZipFile(good) as z:
    info = z.getinfo("x_train.npy")
  start = info.header_offset + 30 + len(info.filename) + 200
  data[start:start + 50] = b"\xff" * 50
  damaged.write_bytes(bytes(data))
  err = _refused(capsys, workdir, *mnist, f"--config.data.path={damaged}")
  assert f"data.path={str(damaged)!r}: member 'x_train.npy' is corrupt" in err


def test_batch_larger_than_a_task_is_refused_before_anything_is_written(tmp_path, capsys):
  # Split Digits: about 288 training examples per task.
  err = _refused(capsys, tmp_path / "run", "--config.train.batch_size=400", "--config.mesh.data=1")
  assert err.startswith("error: train.batch_size=400: larger than")


def test_run_py_prints_one_line_and_exits_2(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "run.py", "--config", "configs/quickstart.py", "--config.optim.lr=1e999",
                         "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["error: optim.lr=inf: must be a finite number"]
  assert not workdir.exists()


def test_cl_jax_command_is_run_py(tmp_path):
  """`pip install -e .` installs the `cl-jax` command: the same main as run.py, from any directory."""
  from importlib.metadata import entry_points
  (command,) = [e for e in entry_points(group="console_scripts") if e.name == "cl-jax"]
  assert command.value == "cl_jax.cli:console_main"
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-c", "from cl_jax.cli import console_main; console_main()", "--config",
                         os.path.join(ROOT, "configs", "quickstart.py"), "--config.strategy=ewc+ewc",
                         "--workdir", str(workdir)], cwd=tmp_path, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2 and proc.stderr.startswith("error: strategy='ewc+ewc'"), proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("error, code", [("ConfigError", 2), ("WorkdirError", 2), ("DivergenceError", 3),
                                         ("WorkdirLocked", 4), ("Preempted", 75)])
def test_each_error_exits_with_its_code_and_one_line(tmp_path, capsys, monkeypatch, error, code):
  from cl_jax import errors, runner

  def fail(*args, **kwargs):
    raise getattr(errors, error)(f"what went wrong\nin {error}")

  monkeypatch.setattr(runner, "run", fail)  # what the command line calls
  assert main(["--config", "configs/quickstart.py", "--workdir", str(tmp_path / "w")]) == code
  assert capsys.readouterr().err == f"error: what went wrong in {error}\n"


def test_config_package_siblings_load_by_path_from_a_copy(tmp_path):
  """A copy of the configs folder elsewhere imports its own `common` (not the checkout's), with no sys.path edit."""
  pkg = tmp_path / "myconfigs"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "shared.py").write_text("STEPS = 7\n")
  (pkg / "exp.py").write_text("from cl_jax.kinds import base_config\nfrom myconfigs.shared import STEPS\n\n\n"
                              "def get_config(arg=''):\n  c = base_config()\n  c.train.steps_per_task = STEPS\n"
                              "  return c\n")
  before = list(sys.path)
  try:
    assert load_config(str(pkg / "exp.py")).train.steps_per_task == 7
    assert sys.path == before
  finally:
    sys.modules.pop("myconfigs", None)
    sys.modules.pop("myconfigs.shared", None)


def test_no_sys_path_patching_anywhere():
  """Imports work because the package is installed (pyproject.toml), never by editing sys.path at run time."""
  import re
  patching = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[[^\]]*\]\s*=|\+=|=[^=])")
  offenders = []
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__") and "egg-info" not in d]
    for f in files:
      if f.endswith((".py", ".ipynb")):
        path = os.path.join(folder, f)
        with open(path, encoding="utf-8", errors="replace") as fh:
          offenders += [f"{os.path.relpath(path, ROOT)}: {line.strip()}" for line in fh if patching.search(line)]
  assert not offenders, offenders
