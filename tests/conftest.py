"""Shared test fixtures. Tests run on CPU; sharding tests start a subprocess with 8 fake devices."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MNIST_NPZ = os.path.join(ROOT, "..", "shared", "data", "mnist.npz")


def tiny_config(strategy="naive", kind="class", steps=60, **overrides):
  """Split Digits, 5 tasks, a small MLP: a real run in a few seconds."""
  from cl_jax.config import set_overrides
  from cl_jax.kinds import base_config
  c = base_config()
  c.strategy = strategy
  c.data.name = "digits"
  c.scenario.kind = kind
  c.model.hidden = [64]
  c.train.steps_per_task = steps
  c.train.batch_size = 32
  c.train.log_every_steps = 10
  c.eval.every_steps = 0
  c.checkpoint.every_steps = 0
  set_overrides(c, overrides)
  return c


def metrics_bytes(workdir) -> bytes:
  """A run's metrics.jsonl, byte for byte: what resumed runs are compared on."""
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    return f.read()


@pytest.fixture
def mnist_path():
  if not os.path.exists(MNIST_NPZ):
    pytest.skip("../shared/data/mnist.npz is not present")
  return MNIST_NPZ


# Under `pytest -n 2` (CI), whole files go to a worker (xdist's `loadfile`), heaviest first. A file's module-scoped
# fixtures (a reference run, a prepared cache) then run once, not once on each worker that draws some of its tests;
# and the longest files start first, so the last file handed out is a light one and neither worker idles at the
# end waiting for the other. The order: the files' measured wall time (`--durations`), largest first; unlisted files
# follow in collection order. Only the order of files changes, never a test's fixtures or assertions.
HEAVY_FIRST = (
    "test_faults.py", "test_lm_multihost.py", "test_strategies.py", "test_notebooks.py", "test_multihost.py",
    "test_many_seeds.py", "test_cpt.py", "test_transformer.py", "test_hooks_every_kind.py", "test_hf_checkpoint.py",
    "test_vocab_run.py", "test_merging.py", "test_sharding.py", "test_exit_codes.py", "test_scale.py",
    "test_config_validation.py", "test_device_data.py", "test_merging_experiment.py", "test_trust_checkpoints.py",
    "test_generative_replay_classic.py", "test_cit.py", "test_data_sources.py", "test_chain_order.py",
    "test_provenance.py", "test_training.py", "test_prepare.py", "test_lora.py", "test_olora_loop.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: in-file order is kept


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is not installed
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "load":  # `-n 2` alone means load; an explicit other --dist is kept
    return None
  from xdist.scheduler import LoadFileScheduling
  config.option.loadscopereorder = False  # keep the order above (xdist would sort files by test count)
  return LoadFileScheduling(config, log)
