"""A run sharded over 8 fake CPU devices matches the same run on 1 device."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from conftest import tiny_config
    from cl_jax import sharding
    from cl_jax.data import train_dataset
    from cl_jax.train.loop import build

    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, (data, fsdp) in {"single": (1, 1), "fsdp8": (1, 8), "data2_fsdp4": (2, 4)}.items():
      c = tiny_config(steps=12)
      c.model.hidden = [64, 48]          # 64x48 kernel divides by 8; the 10-unit head does not
      c.mesh.data, c.mesh.fsdp = data, fsdp
      s = build(c)
      state = s.state
      it = iter(train_dataset(s.scenario, [0], 32, 0, 0).to_iter_dataset())
      losses = []
      for _ in range(12):
        state, m = s.train_step(state, sharding.put_batch(next(it), s.mesh))
        losses.append(float(m["loss"]))
      params = jax.tree.map(lambda x: np.asarray(x).tolist(), state.params)
      shard_fraction = {
          "/".join(str(getattr(k, "key", k)) for k in path): x.addressable_shards[0].data.size / x.size
          for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
      mu_fraction = [x.addressable_shards[0].data.size / x.size for x in jax.tree.leaves(state.opt_state)
                     if getattr(x, "ndim", 0) == 2]
      out[name] = {"losses": losses, "params": params, "shard_fraction": shard_fraction,
                   "mu_fraction": mu_fraction}
    c = tiny_config("replay", steps=2)
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.replay.capacity = 96
    buf = build(c).state.strategy_state
    out["replay_specs"] = {k: str(getattr(buf, k).sharding.spec) for k in ("x", "y", "size")}
    print("RESULT" + json.dumps(out))
""")


def _run():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=os.path.join(ROOT, "tests"), env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  return json.loads(line[len("RESULT"):])


def test_sharded_run_matches_single_device_and_shards_are_one_eighth():
  import numpy as np
  out = _run()
  single = out["single"]
  assert single["losses"][0] > single["losses"][-1]  # it trains
  for name in ("fsdp8", "data2_fsdp4"):
    np.testing.assert_allclose(out[name]["losses"], single["losses"], rtol=2e-5, atol=2e-6)
    flat_a = np.concatenate([np.ravel(v) for v in _leaves(out[name]["params"])])
    flat_b = np.concatenate([np.ravel(v) for v in _leaves(single["params"])])
    np.testing.assert_allclose(flat_a, flat_b, rtol=1e-4, atol=1e-6)
  frac = out["fsdp8"]["shard_fraction"]
  assert frac["dense_0/kernel"] == 1 / 8      # 64 x 64 (8x8 digits flattened)
  assert frac["dense_1/kernel"] == 1 / 8      # 64 x 48
  assert frac["dense_1/bias"] == 1 / 8        # 48
  assert frac["head/kernel"] == 1 / 8         # 48 x 10: 48 divides
  assert frac["head/bias"] == 1.0             # 10 does not divide by 8: replicated
  assert out["fsdp8"]["mu_fraction"] and all(f == 1 / 8 for f in out["fsdp8"]["mu_fraction"])
  assert out["data2_fsdp4"]["shard_fraction"]["dense_0/kernel"] == 1 / 4
  assert all(f == 1.0 for f in single["shard_fraction"].values())
  # The replay buffer is sharded along its slots over both batch axes, like a batch; counters replicated.
  assert out["replay_specs"] == {"x": "P(('data', 'fsdp'),)", "y": "P(('data', 'fsdp'),)", "size": "P()"}


def _leaves(tree):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _leaves(tree[k])
  else:
    yield tree
