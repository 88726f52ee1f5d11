"""One real run per bound on Split Digits: naive forgets in class-IL, joint does not; outputs are written."""
import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from cl_jax import run


@pytest.fixture(scope="module")
def naive_and_joint(tmp_path_factory):
  out = {}
  for strategy in ("naive", "joint"):
    workdir = tmp_path_factory.mktemp(strategy)
    out[strategy] = (run(tiny_config(strategy, steps=80), str(workdir), progress=False), workdir)
  return out


def test_naive_forgets_and_joint_does_not(naive_and_joint):
  naive, _ = naive_and_joint["naive"]
  joint, _ = naive_and_joint["joint"]
  r = np.asarray(naive.accuracy_matrix)
  assert np.all(np.diag(r[1:]) > 0.9)          # each task is learnt...
  assert naive.bwt < -0.8                      # ...and forgotten (class-IL, nothing against it)
  assert joint.bwt > -0.1 and joint.acc > 0.85
  assert joint.acc - naive.acc > 0.5


def test_run_writes_every_output(naive_and_joint):
  _, workdir = naive_and_joint["naive"]
  for name in ("config.json", "metrics.jsonl", "results.json", "summary.md", "accuracy_matrix.png",
               "accuracy_curves.png"):
    assert (workdir / name).stat().st_size > 0, name
  assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
  results = json.loads((workdir / "results.json").read_text())
  assert len(results["accuracy_matrix"]) == 6 and len(results["accuracy_matrix"][0]) == 5
  assert set(results) >= {"acc", "bwt", "fwt", "forgetting", "timing"}
  assert len(results["timing"]["task_seconds"]) == 5
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["type"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 401))
  assert {"loss", "accuracy", "lr", "grad_norm", "param_norm", "update_norm"} <= set(train[0])
  assert len(os.listdir(workdir / "checkpoints" / "tasks")) == 5


def test_same_seed_same_results(tmp_path, naive_and_joint):
  again = run(tiny_config("naive", steps=80), str(tmp_path / "again"), progress=False)
  np.testing.assert_array_equal(again.accuracy_matrix, naive_and_joint["naive"][0].accuracy_matrix)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
  from cl_jax.errors import DivergenceError
  c = tiny_config("naive", steps=30)
  c.optim.name = "sgd"
  c.optim.lr = 1e12   # diverges within a few steps: a non-finite or exploding loss
  c.train.log_every_steps = 1
  with pytest.raises(DivergenceError, match="diverged") as e:
    run(c, str(tmp_path / "w"), progress=False)
  assert e.value.exit_code == 3
  assert not (tmp_path / "w" / "results.json").exists()


def test_fused_steps_match_one_step_per_call(tmp_path, naive_and_joint):
  c = tiny_config("naive", steps=80)
  c.train.steps_per_call = 8
  fused = run(c, str(tmp_path / "fused"), progress=False)
  _, ref_dir = naive_and_joint["naive"]

  def losses(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      return [r["loss"] for r in map(json.loads, f) if r["type"] == "train"]

  a, b = losses(tmp_path / "fused"), losses(ref_dir)
  assert len(a) == len(b) == 400
  np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(fused.accuracy_matrix, naive_and_joint["naive"][0].accuracy_matrix, atol=0.02)


def test_task_loop_runs_any_plan_with_stop_best_and_resume(tmp_path):
  """The one task loop on a toy plan (a scalar pulled toward each task's target): a per-evaluation hook marks a
  best checkpoint and stops the run; the hooks' meta survives a resume, which stays stopped."""
  from typing import NamedTuple

  import jax
  import jax.numpy as jnp
  from cl_jax.checkpoint import Checkpoints
  from cl_jax.train.loop import Plan, Verdict, run_tasks, with_finite_flag
  from cl_jax.workdir import read_metrics

  class S(NamedTuple):
    step: jax.Array
    params: jax.Array

  def step(s, batch):
    loss = jnp.mean((s.params - batch["y"]) ** 2)
    return S(s.step + 1, s.params - 0.2 * (s.params - jnp.mean(batch["y"]))), {"loss": loss}

  class Source:
    def __init__(self, t, state):
      self.i = (state or {}).get("i", 0)
      self.t = t

    def __next__(self):
      self.i += 1
      return {"y": np.full(4, 1.0 + self.t, np.float32)}

    def get_state(self):
      return {"i": self.i}

  seen = {"evals": 0}

  def on_eval(state, step_no, record):
    seen["evals"] += 1
    return Verdict(stop=step_no == 14, best=step_no == 8)  # evals at 4, 8, 10 (end of task 1), 14

  def plan():
    return Plan(state=S(jnp.int32(0), jnp.float32(0.0)), state_sharding=S(None, None), steps=[10, 10],
                batches=Source, train_step=jax.jit(with_finite_flag(step)), put_batch=lambda b, stacked: b,
                evaluate=lambda s, t: {"value": float(s.params)}, on_eval=on_eval, eval_every=4,
                checkpoint_every=4, log_every=3, meta=lambda: dict(seen), load_meta=seen.update,
                record={"phase": "toy"})

  ck = Checkpoints(str(tmp_path))
  out = run_tasks(plan(), str(tmp_path), ck, resume=False, progress=False)
  assert out.stopped == {"step": 14, "task": 2} and int(out.state.step) == 14
  assert ck.best.all_steps() == [8]
  train = [r for r in read_metrics(str(tmp_path)) if r["type"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 15)) and all(r["phase"] == "toy" for r in train)
  assert [r["task"] for r in read_metrics(str(tmp_path)) if r["type"] == "eval"] == [0, 1, 1, 1, 2]
  assert abs(out.boundary[1]["value"] - (1 - 0.8 ** 10)) < 1e-5  # task 1 pulled the scalar toward 1
  seen["evals"] = 0
  fresh = plan()
  again = run_tasks(fresh, str(tmp_path), ck, resume=True, progress=False)
  assert again.stopped == out.stopped and int(again.state.step) == 14 and seen["evals"] == 5
  # The resume let the fresh state go (one train state in memory, not two); the restored one is intact.
  assert all(x.is_deleted() for x in jax.tree.leaves(fresh.state))
  assert not any(x.is_deleted() for x in jax.tree.leaves(again.state))
  ck.close()


def test_results_load_summary_plot_and_metrics(naive_and_joint):
  import cl_jax
  naive, workdir = naive_and_joint["naive"]
  loaded = cl_jax.Results.load(str(workdir))
  assert loaded.kind == "classic" and loaded.as_dict() == json.loads((workdir / "results.json").read_text())
  np.testing.assert_array_equal(loaded.accuracy_matrix, naive.accuracy_matrix)
  text = loaded._repr_markdown_()
  assert "naive — split/class (digits)" in text and f"{100 * naive.acc:+.2f}" in text
  fig = loaded.plot()
  assert type(fig).__name__ == "Figure" and len(fig.axes) >= 2
  assert len(loaded.metrics("train")) == 400 and loaded.metrics("eval")[0]["task"] == 0


def test_event_file_is_read_back_by_tensorboard_protos(tmp_path):
  """cl_jax writes TensorBoard events itself (workdir.EventFile): records, CRCs, purge and scalars must parse."""
  import struct
  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto import event_pb2
  from cl_jax.workdir import MetricsLog
  log = MetricsLog(str(tmp_path), resume_step=7, keep=lambda r: False, tb_every=2)
  log.write_many([{"type": "train", "step": s, "task": 1, "loss": 1.0 / s, "lr": 0.5} for s in (8, 9, 10)])
  log.write({"type": "eval", "step": 10, "task": 1, "accuracy": [0.25, float("nan")], "boundary": True})
  log.close()
  data = next((tmp_path / "tensorboard").iterdir()).read_bytes()
  masked = lambda c: (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  events, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(crc32c(data[pos:pos + 8]))
    body = data[pos + 12:pos + 12 + n]
    assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked(crc32c(body))
    events.append(event_pb2.Event.FromString(body))
    pos += 16 + n
  assert events[0].file_version == "brain.Event:2"
  assert events[1].session_log.status == event_pb2.SessionLog.START and events[1].step == 8
  scalars = [(e.step, v.tag, v.simple_value) for e in events[2:] for v in e.summary.value]
  assert [s for s in scalars if s[1] == "train/loss"] == [(8, "train/loss", np.float32(1 / 8)),
                                                          (10, "train/loss", np.float32(0.1))]  # every 2nd step
  assert (10, "eval/accuracy_task1", 0.25) in scalars and len([s for s in scalars if s[0] == 10]) == 4
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [8, 9, 10, 10] and '"accuracy": [0.25, null]' in lines[3]


def test_chunk_divergence_check_agrees_with_step_by_step():
  from cl_jax.errors import DivergenceError
  from cl_jax.train.loop import _Divergence
  cases = [([2.0, 1.5, 1.0], None), ([2.0, 50.0, 1.0], None), ([2.0, np.nan, 1.0], None),
           ([2.0, 1.0, 1.0], [True, False, True]), ([[2.0, 1.0], [1.0, 30.0]], None)]
  for losses, finite in cases:
    chunk, steps = _Divergence(10.0, {"run_ref": None, "task_ref": None}), _Divergence(10.0, None)
    ok = chunk.check_chunk(np.asarray(losses, np.float32), None if finite is None else np.asarray(finite))
    try:
      for i, loss in enumerate(losses):
        steps.check(i, "t", np.asarray(loss, np.float32), None if finite is None else finite[i])
      passed = True
    except DivergenceError:
      passed = False
    assert ok == passed, (losses, finite)
    if ok:
      assert chunk.state() == steps.state()


def test_torch_init_matches_pytorch_linear_defaults():
  """model.init='torch': kernel and bias uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear), so std 1/sqrt(3 fan_in);
  the default stays Flax's (kernel std 1/sqrt(fan_in), bias 0); 'xavier' is Glorot uniform; other values are refused
  before any work."""
  from cl_jax.kinds import base_config, validate
  from cl_jax.errors import ConfigError
  from cl_jax.models import build_model
  c = base_config()
  c.model.hidden = [300]
  stats = {}
  for init in ("lecun", "torch", "xavier"):
    c.model.init = init
    validate(c)
    _, p = build_model(c.model, (28, 28), 10, 1, 0)
    stats[init] = {k: (np.asarray(p[k]["kernel"]), np.asarray(p[k]["bias"])) for k in ("dense_0", "head")}
  for layer, fan_in in (("dense_0", 784), ("head", 300)):
    k, b = stats["torch"][layer]
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(k).max() <= bound and np.abs(b).max() <= bound and np.abs(b).max() > 0.9 * bound
    np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.05)
    k, b = stats["lecun"][layer]
    np.testing.assert_allclose(k.std(), 1 / np.sqrt(fan_in), rtol=0.05)
    assert not b.any()
  # 'xavier' (mammoth's MNIST MLP, Buzzega et al. 2020): Glorot uniform U(±sqrt(6 / (fan_in + fan_out))), bias 0.
  for layer, fans in (("dense_0", 784 + 300), ("head", 300 + 10)):
    k, b = stats["xavier"][layer]
    bound = np.sqrt(6.0 / fans)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound and not b.any()
    np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.05)
  c.model.init = "kaiming"
  with pytest.raises(ConfigError, match="model.init='kaiming'"):
    validate(c)
