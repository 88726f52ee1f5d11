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


def _register_extra_strategy():
  """Registers a strategy with a config section of its own, as a later version of the code would."""
  import ml_collections
  from cl_jax.strategies import REGISTRY, StrategyEntry, naive

  def default_config():
    return ml_collections.ConfigDict(dict(strength=1.0))

  REGISTRY["h2_extra"] = StrategyEntry(naive, {"h2_extra": default_config}, None, ("h2_extra",))


def test_comparable_drops_only_the_sections_the_chain_does_not_read():
  from cl_jax.config import comparable
  from cl_jax.kinds import base_config
  c = base_config()
  c.strategy = "ewc+replay"
  d = comparable(c)
  assert {"ewc", "fisher", "replay", "optim", "train", "lora"} <= set(d)
  assert not {"distill", "olora"} & set(d)
  c.replay.capacity = 7
  assert comparable(c)["replay"]["capacity"] == 7 and comparable(c) != d   # a used section still counts
  c.distill.alpha = 5.0
  assert comparable(c)["replay"]["capacity"] == 7 and "distill" not in comparable(c)
  assert comparable(json.loads(c.to_json_best_effort())) == comparable(c)   # config.json or ConfigDict alike


def test_adding_a_strategy_keeps_old_workdirs_resumable(tmp_path):
  """A finished run's workdir, written before a new strategy (and its config section) existed, still resumes."""
  import cl_jax
  from cl_jax.strategies import REGISTRY
  from conftest import tiny_config
  workdir = str(tmp_path / "run")
  first = cl_jax.run(tiny_config(steps=4, **{"scenario.num_tasks": 2}), workdir, progress=False)
  written = json.loads((tmp_path / "run" / "config.json").read_text())
  try:
    _register_extra_strategy()
    c = tiny_config(steps=4, **{"scenario.num_tasks": 2})
    assert "h2_extra" in c and "h2_extra" not in written
    again = cl_jax.run(c, workdir, progress=False)   # resumes (nothing left to train) instead of refusing
    assert again.acc == first.acc
    c.strategy = "h2_extra"
    with pytest.raises(Exception, match="different config"):   # a run that does read the new section differs
      cl_jax.run(c, workdir, progress=False)
  finally:
    REGISTRY.pop("h2_extra", None)


def test_a_spaced_strategy_chain_is_stored_normalised_and_resumes_as_the_same_run(tmp_path):
  """Issue 23: 'ewc + replay' and 'ewc+replay' are one run: config.json holds 'ewc+replay', and a workdir written
  with the spaces (before chains were normalised) resumes under either spelling instead of being refused."""
  import cl_jax
  from conftest import tiny_config
  workdir = tmp_path / "run"
  c = tiny_config(steps=4, **{"scenario.num_tasks": 2})
  c.strategy = "ewc + replay"
  first = cl_jax.run(c, str(workdir), progress=False)
  assert c.strategy == "ewc+replay"
  written = json.loads((workdir / "config.json").read_text())
  assert written["strategy"] == "ewc+replay"
  (workdir / "config.json").write_text(json.dumps({**written, "strategy": "ewc + replay"}))  # an older workdir
  c = tiny_config(steps=4, **{"scenario.num_tasks": 2})
  c.strategy = "ewc+replay"
  assert cl_jax.run(c, str(workdir), progress=False).acc == first.acc   # resumes: nothing left to train


def test_lm_config_errors_name_the_full_key(tmp_path, capsys):
  rc = main(["--config", "configs/cpt_lm.py", "--config.adapt.steps=abc", "--workdir", str(tmp_path / "w")])
  assert rc == 2 and "adapt.steps='abc': expected an integer" in capsys.readouterr().err
  rc = main(["--config", "configs/cpt_lm.py", "--config.adapt.steps=0", "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: adapt.steps=0"), err
  assert not (tmp_path / "w").exists()


def test_merge_config_errors_name_the_full_key(tmp_path, capsys):
  rc = main(["--config", "configs/merge.py:method=ties,run=runs/none", "--config.merge.density=1.5",
             "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: merge.density=1.5"), err
  assert not (tmp_path / "w").exists()


def test_every_registered_strategy_keeps_the_contract():
  """REGISTRY entries: sections owned are sections read, both exist in base_config, and the defaults validate."""
  import ml_collections
  from cl_jax.kinds import base_config
  from cl_jax.lm import default_config as lm_default_config
  from cl_jax.lm.cit import default_config as cit_default_config
  from cl_jax.strategies import REGISTRY, StrategyEntry
  base = base_config()
  for name, entry in REGISTRY.items():
    assert isinstance(entry, StrategyEntry) and callable(entry.build), name
    assert set(entry.default_config) <= set(entry.config_sections), (name, "owns a section it does not declare")
    for section in entry.config_sections:
      assert section in base, (name, section)
    for section, default in entry.default_config.items():
      assert isinstance(default(), ml_collections.ConfigDict), (name, section)
    if entry.check_config is not None:   # the defaults are valid for a kind the strategy runs on
      errors = []
      for config in (base_config(), lm_default_config(), cit_default_config()):
        if all(s in config for s in entry.config_sections):
          config.strategy = name
          try:
            entry.check_config(config)
            break
          except ValueError as e:
            errors.append(str(e))
      else:
        raise AssertionError((name, errors))


def test_registering_a_section_twice_with_different_defaults_is_refused():
  import ml_collections
  from cl_jax.strategies import REGISTRY, StrategyEntry, default_configs, naive
  REGISTRY["h2_clash"] = StrategyEntry(naive, {"replay": lambda: ml_collections.ConfigDict()}, None, ("replay",))
  try:
    with pytest.raises(ValueError, match="config section 'replay' is already owned"):
      default_configs()
  finally:
    REGISTRY.pop("h2_clash")


def test_kinds_allow_the_strategies_whose_needs_they_meet():
  """Issue 20 item 3: the allowed strategies of a kind are computed from the strategies' needs; a refusal is one line
  naming the capability the kind lacks."""
  from cl_jax.errors import ConfigError
  from cl_jax.kinds import base_config, validate
  from cl_jax.kinds.classic import PROVIDES as CLASSIC_PROVIDES
  from cl_jax.lm.cit import cit_strategies
  from cl_jax.lm.config import lm_strategies
  from cl_jax.strategies import CAPABILITIES, REGISTRY, allowed, check_allowed
  for name, entry in REGISTRY.items():
    assert entry.needs <= set(CAPABILITIES), name
  assert set(allowed(CLASSIC_PROVIDES)) == set(REGISTRY) - {"lora_per_task"}
  assert {"si", "mas", "agem", "olora", "lora", "ewc", "distill"} <= set(lm_strategies())
  assert {"replay", "lora_per_task", "olora", "distill"} <= set(cit_strategies())
  c = base_config()
  c.strategy = "ewc+lora_per_task"
  with pytest.raises(ConfigError, match=r"^strategy='ewc\+lora_per_task': kind 'classic' cannot run "
                                        r"lora_per_task \(needs routing: ") as e:
    validate(c)
  assert "\n" not in str(e.value)
  assert check_allowed("naive+replay", {"class_labels"}, "toy", own=("replay",)) == ["naive", "replay"]
  with pytest.raises(ValueError, match=r"^strategy='replay': kind 'toy' cannot run replay \(needs input_buffer: "):
    check_allowed("replay", {"class_labels"}, "toy")
  with pytest.raises(ValueError, match="unknown capabilities"):
    allowed({"labels"})
