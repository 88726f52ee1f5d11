"""Two real processes on 127.0.0.1 run continual pre-training as a two-host job: each process feeds only its own rows
of every global batch (the mixture sampler decides rows from seed and step alone), the numbers match one process,
and only process 0 writes the outputs. The domain corpus is a prepared cache (`cl-jax prepare`): each process reads
only its own rows of each batch from the shards, and a killed pair resumes at the exact sequence."""
import json
import os
import signal
import tempfile

import numpy as np
import pytest

from multihost_util import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small local corpora (this repository's result notes as prose, its strategy sources as code, prepared into a cache
# by the module fixture below): quick to load.
CACHE = os.path.join(tempfile.gettempdir(), f"cl_jax_lm_multihost_cache_{os.getpid()}")  # one per xdist worker
ARGS = ["--config", "configs/cpt_lm.py:mixture=70_30", "--config.lm.d_model=32",
        "--config.lm.num_layers=1", "--config.lm.num_heads=2", "--config.lm.seq_len=32",
        f"--config.text.general=files:{ROOT}/results/*.md", f"--config.text.domain=cache:{CACHE}",
        "--config.text.validation=0.25", "--config.text.test=0.25",
        "--config.text.max_train_sequences=256", "--config.text.eval_sequences=16",
        "--config.text.general_eval_sequences=16", "--config.text.cloze_items=8",
        "--config.text.cloze_context=16", "--config.pretrain.steps=8", "--config.pretrain.batch_size=8",
        "--config.adapt.steps=8", "--config.adapt.batch_size=8", "--config.regression.eval_every=4",
        "--config.regression.eval_batch_size=16", "--config.regression.threshold=0.5",
        "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=4", "--no_progress"]


@pytest.fixture(scope="module", autouse=True)
def domain_cache():
  """The strategy sources tokenized once (byte tokenizer, the runs' seq_len and split): `cache:` in ARGS."""
  import shutil

  from cl_jax.data import prepare
  from cl_jax.data.tokenizer import ByteTokenizer
  shutil.rmtree(CACHE, ignore_errors=True)
  prepare.prepare([f"files:{ROOT}/cl_jax/strategies/*.py"], ByteTokenizer(), CACHE, seq_len=32, validation=0.25,
                  test=0.25, shard_sequences=64, progress=False)
  yield CACHE
  shutil.rmtree(CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The same run as one process: the reference both two-process tests compare with."""
  import cl_jax
  from cl_jax.cli import build_config
  w = tmp_path_factory.mktemp("lm_one") / "one"
  config, _ = build_config(ARGS + ["--workdir", str(w)])
  return cl_jax.run(config, str(w), progress=False)


def _assert_same_numbers(two: dict, one) -> None:
  for model in ("base", "best", "final"):
    for k, v in one.extra["test"][model].items():
      np.testing.assert_allclose(two["test"][model][k], v, rtol=2e-3, err_msg=f"{model} {k}")


def test_lm_two_processes_match_one_and_write_each_output_once(tmp_path, one_process):
  one = one_process
  w = tmp_path / "two"
  outs = launch(["run.py", *ARGS, "--workdir", str(w)], num_processes=2)
  for i, o in enumerate(outs):
    assert o.returncode == 0, f"process {i}:\n{o.stderr[-3000:]}"
  two = json.loads((w / "results.json").read_text())
  # The same global batches: each process gathered half of each, so the numbers agree up to reduction order.
  _assert_same_numbers(two, one)
  records = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  for phase in ("pretrain", "adapt"):
    steps = [r["step"] for r in records if r["type"] == "train" and r["phase"] == phase]
    assert steps == list(range(1, 9)), phase     # each step once, not once per process
    ref = [r["loss"] for r in one.metrics("train") if r["phase"] == phase]
    np.testing.assert_allclose([r["loss"] for r in records if r["type"] == "train" and r["phase"] == phase], ref,
                               rtol=2e-3, atol=2e-4)
  assert [r["step"] for r in records if r["type"] == "eval" and r["phase"] == "adapt"] == [0, 4, 8]
  # One TensorBoard event file per phase, written by process 0 only: as many as the one-process run has.
  assert len(os.listdir(w / "tensorboard")) == len(os.listdir(os.path.join(one.workdir, "tensorboard"))) == 2
  assert not (w / ".lock").exists()
  assert (w / "summary.md").exists() and (w / "monitor.png").exists()


def test_lm_both_processes_killed_mid_pretraining_resume_to_the_same_results(tmp_path, one_process):
  """SIGKILL in both processes at pre-training step 6 (after the checkpoint at 4); the relaunch resumes there."""
  w = tmp_path / "crashed"
  killed = launch(["run.py", *ARGS, "--workdir", str(w)], num_processes=2, env={"CL_JAX_TEST_KILL_AT_STEP": "6"})
  assert all(o.returncode == -signal.SIGKILL for o in killed), [o.stderr[-2000:] for o in killed]
  assert not (w / "results.json").exists()
  outs = launch(["run.py", *ARGS, "--workdir", str(w)], num_processes=2)
  for i, o in enumerate(outs):
    assert o.returncode == 0, f"process {i}:\n{o.stderr[-3000:]}"
  assert "Resuming" in outs[0].stdout + outs[0].stderr
  _assert_same_numbers(json.loads((w / "results.json").read_text()), one_process)
  records = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  for phase in ("pretrain", "adapt"):  # every step logged exactly once across the crash
    assert [r["step"] for r in records if r["type"] == "train" and r["phase"] == phase] == list(range(1, 9)), phase
