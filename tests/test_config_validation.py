"""Bad configs are refused with a message naming the key, a non-zero exit, and the workdir untouched."""
import json
import os

import pytest

from cl_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("args, message", [
    (["--config.optim.lrr=0.1"], "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    (["--config.optim.lr=-0.1"], "optim.lr=-0.1: must be positive"),
    (["--config.scenario.num_tasks=3"], "scenario.num_tasks=3: does not divide the 10 classes"),
    (["--config.mesh.data=64"], "only 1 are available"),
    (["--config.data.name=mnist", "--config.data.path=/nonexistent/mnist.npz"], "data.path='/nonexistent/mnist.npz'"),
    (["--config.strategy=ewc_typo"], "strategy='ewc_typo'"),
    (["--config.train.batch_size=0"], "train.batch_size=0"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, capsys, args, message):
  workdir = tmp_path / "run"
  rc = main(["--config", "configs/quickstart.py", *args, "--workdir", str(workdir)])
  assert rc == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_unknown_key_lists_the_valid_ones(tmp_path, capsys):
  assert main(["--config", "configs/quickstart.py", "--config.nope=1", "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert "'optim'" in err and "'scenario'" in err and "'train'" in err


def test_bad_config_arg_is_refused(tmp_path, capsys):
  assert main(["--config", "configs/quickstart.py:scenaro=task", "--workdir", str(tmp_path / "w")]) == 2
  assert "scenaro" in capsys.readouterr().err


def test_workdir_with_another_config_is_refused_and_kept(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"something": "else"}))
  (workdir / "results.json").write_text("{}")
  rc = main(["--config", "configs/quickstart.py", "--workdir", str(workdir)])
  assert rc == 2
  assert "different config" in capsys.readouterr().err
  assert json.loads((workdir / "config.json").read_text()) == {"something": "else"}
  assert (workdir / "results.json").exists()
