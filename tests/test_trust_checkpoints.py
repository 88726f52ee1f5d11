"""Checkpoints that prove themselves and metrics that are never lost (issue 23): every fault here is one the run
used to swallow (garbage restored, another run's state restored, a KeyError, records silently missing). Each is
now set aside (or rewritten) with one warning naming its cause, and the run ends as the uninterrupted one: the same
results.json (all but `timing`) and a byte-identical metrics.jsonl. The LM kind's run shares this code
(`cl_jax.train.loop.run_tasks` -> `cl_jax.checkpoint.Checkpoints`); tests/test_cpt.py checks it on an LM run."""
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cl_jax
from cl_jax.checkpoint import CheckpointError, Checkpoints, abstract_like, digest
from conftest import tiny_config

# Split Digits, 5 tasks x 10 steps: rolling checkpoints at 35 and 45 (every 5, 2 kept), task ones at 10..50.
SETTINGS = {"checkpoint.every_steps": 5, "model.hidden": [16]}


def config(seed=0):
  return tiny_config(steps=10, seed=seed, **SETTINGS)


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  r.pop("timing")
  r.pop("provenance")
  return r


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("straight") / "run")
  cl_jax.run(config(), w, progress=False)
  return w


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory):
  """The same experiment with seed 1: checkpoints of the same shapes, another run."""
  w = str(tmp_path_factory.mktemp("seed1") / "run")
  cl_jax.run(config(seed=1), w, progress=False)
  return w


def flip_bytes(step_dir, n=64):
  """Inverts n bytes in the middle of the checkpoint's largest array file (its data, not its framing)."""
  blobs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.path.basename(d) == "d"]
  path = max(blobs, key=os.path.getsize)
  at = os.path.getsize(path) // 2
  with open(path, "r+b") as f:
    f.seek(at)
    data = f.read(n)
    f.seek(at)
    f.write(bytes(b ^ 0xFF for b in data))


def rerun(workdir, capsys):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cl_jax.run(config(), workdir, progress=False)
  return [str(w.message) for w in caught], capsys.readouterr().out


def test_flipped_bytes_a_foreign_checkpoint_and_empty_meta_are_set_aside_and_a_torn_log_rewritten(
    tmp_path, straight, other_seed, capsys):
  """The newest three checkpoints each damaged another way, metrics.jsonl cut mid-line: the run falls back to the
  fourth (rolling/35), says why once per checkpoint, and ends exactly as the uninterrupted run."""
  assert results(other_seed) != results(straight)  # restoring seed 1's state would change the numbers
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  ck = os.path.join(w, "checkpoints")
  flip_bytes(os.path.join(ck, "tasks", "50"))
  shutil.rmtree(os.path.join(ck, "rolling", "45"))
  shutil.copytree(os.path.join(other_seed, "checkpoints", "rolling", "45"), os.path.join(ck, "rolling", "45"))
  with open(os.path.join(ck, "tasks", "40", "meta", "metadata"), "w") as f:
    f.write("{}")
  with open(os.path.join(w, "metrics.jsonl"), "r+b") as f:
    lines = f.read().splitlines(keepends=True)
    f.truncate(sum(map(len, lines[:20])) + len(lines[20]) // 2)  # line 21 of 56 cut in the middle
  said, out = rerun(w, capsys)
  checkpoints = [m for m in said if m.startswith("checkpoint ")]
  assert len(checkpoints) == 3, said
  assert "tasks/50 is corrupt (array digest mismatch in " in checkpoints[0]
  assert "rolling/45 belongs to another run (written by a run with seed 1" in checkpoints[1]
  assert "tasks/40 is corrupt (its meta item is {}" in checkpoints[2]
  torn = [m for m in said if "metrics.jsonl" in m]
  assert len(torn) == 1 and "was torn" in torn[0] and "step 35" in torn[0], said
  assert "from step 35" in out
  assert sorted(os.listdir(os.path.join(ck, "unreadable"))) == ["rolling-45", "tasks-40", "tasks-50"]
  assert results(w) == results(straight)
  with open(os.path.join(w, "metrics.jsonl"), "rb") as a, open(os.path.join(straight, "metrics.jsonl"), "rb") as b:
    assert a.read() == b.read()


def test_deleted_metrics_log_is_rewritten_from_the_checkpoint(tmp_path, straight, capsys):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  os.remove(os.path.join(w, "metrics.jsonl"))
  said, out = rerun(w, capsys)
  assert "from step 50" in out and not [m for m in said if m.startswith("checkpoint ")]
  lost = [m for m in said if "metrics.jsonl" in m]
  assert len(lost) == 1 and "was missing" in lost[0], said
  with open(os.path.join(w, "metrics.jsonl"), "rb") as a, open(os.path.join(straight, "metrics.jsonl"), "rb") as b:
    assert a.read() == b.read()
  assert results(w) == results(straight)


# ----------------------------------------------------------------------------- in-process: the pieces alone

def test_digest_catches_flips_and_moves_and_is_the_same_on_host_and_device():
  from cl_jax.checkpoint import LANES, _lanes_device, _lanes_host
  rng = np.random.default_rng(0)
  x = rng.standard_normal(5000).astype(np.float32)
  base = digest({"x": jnp.asarray(x)})["x"]
  seen = []
  for i, bit in [(0, 0), (1, 31), (2500, 7), (4999, 22), (1 + LANES, 31)]:  # a single flipped bit anywhere
    y = x.copy()
    y.view(np.uint32)[i] ^= np.uint32(1 << bit)
    seen.append(digest({"x": jnp.asarray(y)})["x"])
  seen.append(digest({"x": jnp.asarray(x[::-1].copy())})["x"])  # the same values, other places
  seen.append(digest({"x": jnp.asarray(np.roll(x, 1))})["x"])
  z = x.copy()
  z.view(np.uint32)[[3, 4]] ^= np.uint32(1 << 31)  # two sign flips (a plain sum of the words would cancel them)
  seen.append(digest({"x": jnp.asarray(z)})["x"])
  z = x.copy()
  z.view(np.uint8)[4000:4064] ^= 0xFF  # 64 inverted bytes
  seen.append(digest({"x": jnp.asarray(z)})["x"])
  assert len(seen) == 9 and base not in seen
  # The definition, in float64 numpy (exact below 2^53): lane j sums the words at i = j (mod 1021), mod 2^32;
  # integer sums, so any reduction order (sharding, backend) gives these words.
  w = x.view(np.uint32)
  lanes = np.bincount(np.arange(w.size) % LANES, weights=w.astype(np.float64), minlength=LANES) % 2**32
  j = np.arange(LANES, dtype=np.uint64)
  h = (lanes.astype(np.uint64) + j * 0x9E3779B9) % 2**32
  for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = ((h ^ (h >> shift)) * mul) % 2**32
  h ^= h >> 16
  assert base == f"{int(h.sum() % 2**32):08x}{int((h * (2 * j + 1) % 2**32).sum() % 2**32):08x}"
  # The jitted device path (accelerators) and the host path (CPU) agree on every dtype a state holds.
  leaves = [jnp.asarray(x), jnp.ones(3000, jnp.bfloat16), jnp.arange(2100, dtype=jnp.int8),
            jnp.array([True, False] * 600), jax.random.key(0), jnp.int32(7)]
  device = np.asarray(_lanes_device(leaves))
  for row, leaf in zip(device, leaves):
    assert (row == _lanes_host(leaf)).all()
  assert len({tuple(r) for r in device}) == len(leaves)


def _saved(tmp_path, identity=None):
  state = {"w": jnp.arange(4.0), "b": jnp.ones((2, 2))}
  ck = Checkpoints(str(tmp_path), identity=identity)
  ck.save(1, state, {"n": 1}, kind="rolling")
  ck.save(2, jax.tree.map(lambda x: x + 1, state), {"n": 2}, kind="rolling")
  ck.wait()
  return ck, state


def _meta_path(tmp_path, step):
  return tmp_path / "checkpoints" / "rolling" / str(step) / "meta" / "metadata"


def test_old_checkpoints_without_digests_are_restored_with_a_note(tmp_path):
  ck, state = _saved(tmp_path)
  meta = json.loads(_meta_path(tmp_path, 2).read_text())
  assert set(meta["_verify"]) == {"version", "identity", "layout", "arrays", "meta_sha256"}
  del meta["_verify"]  # as written before this change
  _meta_path(tmp_path, 2).write_text(json.dumps(meta))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  with pytest.warns(UserWarning, match="rolling/2 was written before checkpoints carried digests"):
    restored, meta = ck.restore(abstract_like(state, shardings))
  assert meta == {"n": 2} and np.asarray(restored["w"]).tolist() == [1.0, 2.0, 3.0, 4.0]
  ck.close()


def test_another_layout_is_told_apart_from_damage(tmp_path):
  ck, state = _saved(tmp_path)
  meta = json.loads(_meta_path(tmp_path, 1).read_text())
  del meta["_verify"]  # an old checkpoint: orbax's own tree metadata tells the layout
  _meta_path(tmp_path, 1).write_text(json.dumps(meta))
  grown = {"w": jax.ShapeDtypeStruct((5,), jnp.float32), "b": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert ck.restore(grown) is None
  said = [str(w.message) for w in caught]
  assert len(said) == 2, said
  assert "rolling/2 holds another state layout" in said[0] and "w: saved float32[4], expected float32[5]" in said[0]
  assert "rolling/1 holds another state layout" in said[1] and "w: saved [4], expected [5]" in said[1]
  assert sorted(os.listdir(tmp_path / "checkpoints" / "unreadable")) == ["rolling-1", "rolling-2"]
  ck.close()


def test_a_named_checkpoint_that_fails_verification_raises(tmp_path):
  ck, state = _saved(tmp_path, identity={"config_sha256": "a" * 64, "seed": 0, "code": "c"})
  meta = json.loads(_meta_path(tmp_path, 2).read_text())
  meta["n"] = 3  # an edited meta item: the sha256 no longer matches
  _meta_path(tmp_path, 2).write_text(json.dumps(meta))
  abstract = abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
  with pytest.raises(CheckpointError, match="rolling/2 is corrupt .*meta item changed"):
    ck.restore(abstract, kind="rolling")
  # Another code version is said once and accepted (a fix committed while a job waited); another seed is not.
  ck.identity = {"config_sha256": "a" * 64, "seed": 0, "code": "d"}
  with pytest.warns(UserWarning, match="written by code c, this run's code is d"):
    assert ck.restore(abstract, kind="rolling", step=1)[1] == {"n": 1}
  ck.identity = {"config_sha256": "a" * 64, "seed": 1, "code": "c"}
  with pytest.raises(CheckpointError, match="belongs to another run .*seed 0; this run has seed 1"):
    ck.restore(abstract, kind="rolling", step=1)
  ck.close()


def test_merging_reads_only_params_that_match_their_digests(tmp_path, straight):
  from cl_jax.checkpoint import boundary_params
  params = boundary_params(straight, 5)  # the finished run's params, verified (paths as the run saved them)
  assert digest(params)
  w = tmp_path / "w"
  shutil.copytree(straight, w)
  meta_path = w / "checkpoints" / "tasks" / "50" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  meta["_verify"]["arrays"]["params/head/bias"] = "0" * 16  # what a changed array file looks like from here
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="tasks/50 is corrupt .*params/head/bias"):
    boundary_params(str(w), 5)
  assert boundary_params(str(w), 4)  # the others still load
