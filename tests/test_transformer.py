"""The causal transformer LM and its losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cl_jax.losses import distillation_kl, lm_loss_fn, next_token_metrics, token_cross_entropy
from cl_jax.models.transformer import (TransformerConfig, build_lm, init_cache, matmul_flops_per_token,
                                       model_config, rope)

# Larger init than the default so the model's outputs depend strongly on its inputs: tests of
# "does not depend on" must be able to fail.
CFG = model_config("tiny", vocab_size=64, d_model=32, num_heads=4, num_layers=2, max_len=32,
                   init_std=0.3)


def _tokens(seed, shape=(2, 12), vocab=64):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_param_paths_are_stable_strings():
  _, params = build_lm(CFG.replace(tied_embeddings=False))
  flat = {"/".join(str(k.key) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert flat["embed/embedding"] == (64, 32)
  assert flat["block_0/attn/q/kernel"] == (32, 4, 8)
  assert flat["block_1/attn/o/kernel"] == (4, 8, 32)
  assert flat["block_0/mlp/up/kernel"] == (32, 128)
  assert flat["block_0/mlp/down/kernel"] == (128, 32)
  assert flat["final_norm/scale"] == (32,)
  assert flat["lm_head/kernel"] == (32, 64)
  assert len(flat) == 1 + 2 * 8 + 1 + 1
  _, tied = build_lm(CFG)
  assert "lm_head" not in tied


def test_causal_masking_later_tokens_do_not_change_earlier_logits():
  model, params = build_lm(CFG)
  tokens = _tokens(0)
  cut = 5
  changed = tokens.at[:, cut + 1:].set((tokens[:, cut + 1:] + 17) % 64)
  a, b = jax.jit(model.apply)(params, tokens), jax.jit(model.apply)(params, changed)
  np.testing.assert_allclose(a[:, :cut + 1], b[:, :cut + 1], rtol=0, atol=1e-5)
  # ... while the later positions do see the change (so the check above can fail).
  assert float(jnp.min(jnp.max(jnp.abs(a[:, cut + 1:] - b[:, cut + 1:]), axis=-1))) > 1e-2


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 2, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))

  def score(pq, pk):
    return jnp.sum(rope(q, jnp.array([pq]), 1e4) * rope(k, jnp.array([pk]), 1e4), -1)

  np.testing.assert_allclose(score(3, 1), score(13, 11), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(score(3, 1) - score(3, 2)))) > 1e-2


def test_prefill_cache_matches_full_forward_and_decode_continues_it():
  model, params = build_lm(CFG)
  tokens = _tokens(1)
  full = jax.jit(model.apply)(params, tokens)

  @jax.jit
  def run(params, tokens, start, cache):
    return nnx.merge(model.graphdef, params).forward_with_cache(tokens, start, cache)

  cache = init_cache(CFG, 2, 12)
  logits, cache = run(params, tokens[:, :8], jnp.int32(0), cache)
  np.testing.assert_allclose(logits, full[:, :8], atol=1e-5)
  for t in range(8, 12):
    step, cache = run(params, tokens[:, t:t + 1], jnp.int32(t), cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_bf16_compute_keeps_f32_params_and_f32_logits():
  model32, params = build_lm(CFG)
  model16, params16 = build_lm(CFG.replace(compute_dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  tokens = _tokens(2)
  a = jax.jit(model32.apply)(params, tokens)
  b = jax.jit(model16.apply)(params, tokens)  # same params, bf16 matmuls
  assert b.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(a - b)))
  assert 1e-4 < err < 0.1 * float(jnp.max(jnp.abs(a)))  # rounded, but the same function


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="num_heads"):
    TransformerConfig(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="norm"):
    model_config("tiny", norm="batchnorm")
  with pytest.raises(ValueError, match="size"):
    model_config("huge")
  with pytest.raises(ValueError, match="unknown field"):
    model_config("tiny", width=3)


def test_layernorm_variant_runs_and_differs():
  tokens = _tokens(3)
  m_rms, p_rms = build_lm(CFG, seed=4)
  m_ln, p_ln = build_lm(CFG.replace(norm="layernorm"), seed=4)
  assert "bias" in p_ln["final_norm"]
  a, b = jax.jit(m_rms.apply)(p_rms, tokens), jax.jit(m_ln.apply)(p_ln, tokens)
  assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_next_token_metrics_matches_numpy():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
  mask = jnp.ones((2, 6)).at[1, 4:].set(0)
  loss, m = next_token_metrics(logits, {"tokens": tokens, "mask": mask})
  lp = np.asarray(jax.nn.log_softmax(logits))
  tgt = np.asarray(tokens[:, 1:])
  nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  w = np.asarray(mask[:, 1:])
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-6)
  acc = ((np.argmax(lp, -1) == tgt) * w).sum() / w.sum()
  np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)
  assert float(m["num_tokens"]) == 8.0
  np.testing.assert_allclose(token_cross_entropy(logits, tokens[:, 1:]), nll, rtol=1e-6)


def test_distillation_kl_formula_and_temperature():
  s = jax.random.normal(jax.random.key(0), (3, 4, 9))
  t = jax.random.normal(jax.random.key(1), (3, 4, 9))
  assert float(distillation_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
  for temp in (1.0, 3.0):
    pt = jax.nn.softmax(t / temp)
    kl = np.sum(pt * (jax.nn.log_softmax(t / temp) - jax.nn.log_softmax(s / temp)), -1)
    np.testing.assert_allclose(distillation_kl(s, t, temp), temp ** 2 * kl.mean(), rtol=1e-5)
  # The teacher is a constant: no gradient flows into it.
  g = jax.grad(lambda tt: distillation_kl(s, tt, 2.0))(t)
  assert float(jnp.max(jnp.abs(g))) == 0.0


def test_a_few_adamw_steps_learn_a_periodic_sequence():
  cfg = model_config("tiny", vocab_size=16, d_model=32, num_heads=2, num_layers=1, max_len=32)
  model, params = build_lm(cfg)
  pattern = jnp.array([1, 5, 2, 9, 3, 7])
  tokens = jnp.stack([jnp.roll(jnp.tile(pattern, 4), -s)[:17] for s in range(6)])
  batch = {"tokens": tokens}
  loss_fn = lm_loss_fn(model.apply)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  assert first == pytest.approx(np.log(16), rel=0.05)  # untrained: near uniform
  _, metrics = loss_fn(params, batch)
  assert float(metrics["task_loss"]) < 0.5 and float(metrics["accuracy"]) > 0.9


def test_flop_count_matches_xla_cost_analysis():
  cfg = model_config("tiny", vocab_size=128, d_model=64, num_heads=4, num_layers=2)
  model, params = build_lm(cfg)
  tokens = jnp.zeros((2, 32), jnp.int32)
  cost = jax.jit(model.apply).lower(params, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = 2 * 32 * matmul_flops_per_token(cfg, 32)["forward"]
  # XLA also counts elementwise work (softmax, gelu, norms), so it is a little above the matmul count.
  assert ours <= cost["flops"] < 1.25 * ours


SHARD_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from cl_jax import sharding
    from cl_jax.losses import lm_loss_fn
    from cl_jax.models.transformer import build_lm, model_config
    from cl_jax.train.state import TrainState
    from cl_jax.train.step import compile_train_step, make_train_step

    assert jax.device_count() == 8, jax.devices()
    cfg = model_config("tiny", vocab_size=64, d_model=32, num_heads=4, num_layers=2, max_len=32)
    model, params = build_lm(cfg)
    tx = optax.adamw(1e-2)
    step = make_train_step(lm_loss_fn(model.apply), tx, lambda s: 1e-2)
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
    out = {}
    for name, (data, fsdp) in {"single": (1, 1), "data2_fsdp4": (2, 4)}.items():
      mesh = sharding.make_mesh(data, fsdp)
      fresh = jax.tree.map(np.asarray, params)  # host copies: the donated state must not alias `params`
      state = TrainState(jnp.int32(0), fresh, tx.init(fresh), (),
                         jax.random.key_data(jax.random.key(0)), jnp.int32(0))
      state_sh = sharding.state_sharding(state, mesh)
      state = jax.device_put(state, state_sh)
      fn = compile_train_step(step, state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh))
      batch = sharding.put_batch({"tokens": np.asarray(tokens)}, mesh)
      losses = []
      for _ in range(3):
        state, m = fn(state, batch)
        losses.append(float(m["loss"]))
      q = state.params["block_0"]["attn"]["q"]["kernel"]
      out[name] = {"losses": losses, "q": np.asarray(q).ravel().tolist(),
                   "q_shard": q.addressable_shards[0].data.size / q.size}
    print("RESULT" + json.dumps(out))
""")


def test_fsdp_and_data_sharded_train_step_matches_single_device():
  """The project's sharding rules (cl_jax.sharding) on a 2 x 4 (data, fsdp) mesh of fake CPU devices."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], cwd=root, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0][len("RESULT"):])
  single, sharded = out["single"], out["data2_fsdp4"]
  assert single["losses"][-1] < single["losses"][0]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
  # The sharded step sums the gradient in another order (per-device partial sums, then a reduction), so params
  # agree to float32 reduction-order error carried through Adam, not bit for bit. Adam divides by sqrt(v): an
  # element whose gradient is near zero can move its update by a visible fraction of lr, so the per-element bound
  # is a fraction of the steps' total movement (3 steps x lr 1e-2), not a relative one; measured ~5e-6 on x86.
  # A wrong reduction (e.g. a device's local gradient only) moves params by O(lr) = 1e-2 and fails both checks.
  q_single, q_sharded = np.asarray(single["q"]), np.asarray(sharded["q"])
  np.testing.assert_allclose(q_sharded, q_single, rtol=0, atol=1e-3 * 3 * 1e-2)
  assert np.linalg.norm(q_sharded - q_single) <= 1e-4 * np.linalg.norm(q_single)
  assert sharded["q_shard"] == 0.25 and single["q_shard"] == 1.0
