"""LM at scale (issue 9 item 2): remat, layers under scan, gradient accumulation, bf16 params with a float32
master copy, initialisation into the shardings, packed segments through jax.nn.dot_product_attention."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cl_jax.models.scan_layout import stack_blocks, to_layout, unstack_blocks
from cl_jax.models.transformer import TransformerConfig, build_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TransformerConfig(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp="swiglu",
                        max_len=24)


def _tokens(key=0, shape=(3, 24)):
  return jax.random.randint(jax.random.key(key), shape, 0, CFG.vocab_size)


def _loss_and_grads(cfg, params, tokens):
  model, _ = build_lm(cfg)

  def loss(p):
    logits = model.apply(p, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("changes", [dict(remat="full"), dict(remat="dots"), dict(scan_layers=True), dict(attn_chunk=8),
                                     dict(scan_layers=True, remat="full"), dict(scan_layers=True, remat="dots")])
def test_remat_and_scan_give_the_plain_models_loss_and_gradients(changes):
  _, params = build_lm(CFG, seed=1)
  tokens = _tokens(0, (3, 25))  # the model reads 24 tokens: 3 query blocks of 8 under attn_chunk=8
  loss, grads = _loss_and_grads(CFG, params, tokens)
  cfg = CFG.replace(**changes)
  loss2, grads2 = _loss_and_grads(cfg, to_layout(params, cfg.scan_layers), tokens)
  if cfg.scan_layers:  # the stacked layout: one [L, ...] gradient per kernel kind, layer i = block_i's
    assert grads2["stacked_blocks"]["attn"]["q"]["kernel"].shape == (3, *grads["block_0"]["attn"]["q"]["kernel"].shape)
  grads2 = unstack_blocks(grads2)
  assert jax.tree.structure(grads2) == jax.tree.structure(grads)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-6)
  assert float(optax.tree.norm(grads)) > 1e-3  # the gradients compared are not trivially zero


def test_scanned_logits_equal_unscanned_with_packed_segments():
  model, params = build_lm(CFG, seed=2)
  scanned, _ = build_lm(CFG.replace(scan_layers=True, remat="full"))
  tokens = _tokens(3)
  seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 3, 0))
  pos = jnp.asarray(np.repeat([list(range(10)) + list(range(14))], 3, 0))
  packed = jnp.stack([tokens, seg, pos], -1)  # [B, T, 3]: tokens, segment ids, positions
  a = model.apply(params, packed)
  b = jax.jit(lambda p: scanned.apply(p, packed))(stack_blocks(params))
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes", [dict(), dict(scan_layers=True, remat="dots", attn_chunk=8)])
def test_packed_documents_never_attend_across(changes):
  """Perturbing document 2's tokens leaves document 1's logits unchanged, and changes document 2's."""
  model, params = build_lm(CFG.replace(**changes), seed=3)
  tokens = np.asarray(_tokens(4, (2, 24)))
  seg = np.array([[1] * 9 + [2] * 15, [1] * 16 + [2] * 8])
  pos = np.concatenate([np.arange(9), np.arange(15)])[None].repeat(2, 0)
  pos[1] = np.concatenate([np.arange(16), np.arange(8)])
  other = tokens.copy()
  other[seg == 2] = (other[seg == 2] + 7) % CFG.vocab_size
  f = jax.jit(lambda t: model.apply(params, jnp.stack([t, jnp.asarray(seg), jnp.asarray(pos)], -1)))
  a, b = np.asarray(f(jnp.asarray(tokens))), np.asarray(f(jnp.asarray(other)))
  first = seg == 1
  np.testing.assert_allclose(b[first], a[first], rtol=0, atol=1e-6)
  assert np.abs(b[~first] - a[~first]).max() > 1e-3
  # without the segment ids the first document of row 1 sees nothing of the second either (causal), but the
  # second's logits depend on the first: the mask is what separates them
  g = jax.jit(lambda t: model.apply(params, t))
  t2 = tokens.copy()
  t2[seg == 1] = (t2[seg == 1] + 5) % CFG.vocab_size
  with_seg, plain = np.asarray(f(jnp.asarray(t2))), np.asarray(g(jnp.asarray(t2)))
  np.testing.assert_allclose(with_seg[~first], a[~first], rtol=0, atol=1e-6)
  assert np.abs(plain[~first] - np.asarray(g(jnp.asarray(tokens)))[~first]).max() > 1e-3


def _lm_step(cfg, optimizer, grad_accum, params):
  from cl_jax.losses import next_token_loss
  from cl_jax.strategies import Learner
  from cl_jax.train.state import TrainState
  from cl_jax.train.step import make_train_step
  model, _ = build_lm(cfg)
  step = make_train_step(next_token_loss(Learner(model.apply, lambda t, i: None)), optimizer, lambda s: 1e-2,
                         grad_accum=grad_accum)
  state = TrainState(jnp.int32(0), params, optimizer.init(params), (), jax.random.key_data(jax.random.key(0)),
                     jnp.int32(0))
  return jax.jit(step), state


def test_grad_accum_equals_one_big_batch_step():
  _, params = build_lm(CFG, seed=4)
  tokens = _tokens(5, (8, 17))
  batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  tx = optax.sgd(0.5, momentum=0.9)  # linear in the gradient (Adam's g / sqrt(v) amplifies rounding of tiny g)
  outs = {}
  for k in (1, 4):
    step, state = _lm_step(CFG, tx, k, params)
    for _ in range(2):
      state, metrics = step(state, batch)
    outs[k] = (state, metrics)
  (s1, m1), (s4, m4) = outs[1], outs[4]
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(params)))
  assert moved > 1e-3
  with pytest.raises(ValueError, match="train.grad_accum=3"):
    _lm_step(CFG, tx, 3, params)[0](_lm_step(CFG, tx, 3, params)[1], batch)


def test_bf16_params_keep_a_float32_master_copy():
  from cl_jax.train.precision import MasterWeightsState, cast_params, optimizer_for
  _, params32 = build_lm(CFG, seed=5)
  params = cast_params(params32, "bfloat16")
  # lr 1e-5 with SGD: each update is far below bf16's resolution (2^-8 relative), so bf16 params updated in
  # place would never move; the master copy accumulates them.
  tx = optimizer_for(optax.sgd(1e-5), "bfloat16")
  step, state = _lm_step(CFG, tx, 1, params)
  tokens = _tokens(6, (4, 17))
  batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  for _ in range(3):
    state, _ = step(state, batch)
  assert isinstance(state.opt_state, MasterWeightsState)
  assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {m.dtype for m in jax.tree.leaves(state.opt_state.master)} == {jnp.dtype(jnp.float32)}
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state.master)):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))  # params = rounded master
  drift = [float(jnp.max(jnp.abs(m - p0.astype(jnp.float32))))
           for m, p0 in zip(jax.tree.leaves(state.opt_state.master), jax.tree.leaves(params))]
  assert max(drift) > 0  # the master moved...
  # ...and holds what the bf16 params cannot: updates below bf16's resolution (2^-8 relative) accumulate there
  lost = [float(jnp.max(jnp.abs(m - p.astype(jnp.float32))))
          for m, p in zip(jax.tree.leaves(state.opt_state.master), jax.tree.leaves(state.params))]
  assert max(lost) > 0


_SHARDED_INIT = textwrap.dedent("""
  import jax, numpy as np
  from cl_jax import sharding
  from cl_jax.models.transformer import TransformerConfig, build_lm, init_lm
  cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=16)
  mesh = sharding.make_mesh(1, 8)
  model, params = init_lm(cfg, 7, mesh, "bfloat16")
  _, ref = build_lm(cfg, 7)
  want = sharding.state_sharding(params, mesh)
  for p, sh, r in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(ref)):
    assert p.sharding.is_equivalent_to(sh, p.ndim), (p.sharding, sh)
    assert p.dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(np.asarray(p, np.float32), np.asarray(r.astype(p.dtype), np.float32), atol=1e-2)
  q = params["block_0"]["attn"]["q"]["kernel"]
  assert q.sharding.spec[0] == "fsdp" and q.addressable_shards[0].data.shape[0] == q.shape[0] // 8
  # the stacked layout: the same values (stack_blocks of the per-block ones), the layer axis whole on every device
  from cl_jax.models.scan_layout import stack_blocks
  _, stacked = init_lm(cfg.replace(scan_layers=True), 7, mesh)
  q = stacked["stacked_blocks"]["attn"]["q"]["kernel"]
  assert q.sharding.spec[:2] == (None, "fsdp") and q.addressable_shards[0].data.shape[:2] == (2, 32 // 8), q.sharding
  for p, r in zip(jax.tree.leaves(stacked), jax.tree.leaves(stack_blocks(ref))):
    np.testing.assert_allclose(np.asarray(p), np.asarray(r), rtol=0, atol=1e-7)  # jit vs eager rounding
  print("OK")
""")


def test_init_lands_in_the_shardings():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_INIT], cwd=os.path.join(ROOT, "tests"), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_lm_config_scale_keys_are_checked_and_1b_trains_in_bf16():
  from cl_jax.lm import default_config
  from cl_jax.kinds import validate as check_config  # types, the LM schema, then its cross-key checks
  from cl_jax.lm.runner import model_config
  c = default_config()
  c.lm.size = "1b"
  assert model_config(c, 256).compute_dtype == "bfloat16"  # the size's own dtype (was silently float32)
  c.lm.compute_dtype = "float32"
  assert model_config(c, 256).compute_dtype == "float32"  # an explicit value wins
  c = default_config()
  c.lm.remat, c.lm.scan_layers, c.lm.attn_chunk = "dots", True, 64
  cfg = model_config(c, 256)
  assert cfg.remat == "dots" and cfg.scan_layers and cfg.attn_chunk == 64
  for key, value, match in (("lm.remat", "some", "lm.remat='some'"),
                            ("lm.param_dtype", "float16", "lm.param_dtype='float16'"),
                            ("train.grad_accum", 0, "train.grad_accum=0"),
                            ("lm.attn_chunk", -1, "lm.attn_chunk=-1"),
                            ("train.grad_accum", 3, "not divisible")):
    c = default_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
      check_config(c)
