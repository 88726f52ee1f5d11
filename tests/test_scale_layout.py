"""The stacked params layout of `scan_layers` (cl_jax.models.scan_layout): one [L, ...] leaf per kernel kind, the same
function as the per-block layout (logits, gradients, KV-cache sampling, merges) layer by layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax import merging
from cl_jax.models import scan_layout
from cl_jax.models.transformer import TransformerConfig, build_lm

CFG = TransformerConfig(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp="swiglu",
                        max_len=24, tied_embeddings=False, qkv_bias=True)


@pytest.fixture(scope="module")
def models():
  return build_lm(CFG, seed=1), build_lm(CFG.replace(scan_layers=True), seed=1)


def test_converters_round_trip_and_the_stacked_init_is_the_stacked_per_block_init(models):
  (_, params), (_, stacked) = models
  assert scan_layout.is_stacked(stacked) and not scan_layout.is_stacked(params)
  assert scan_layout.num_layers(stacked) == scan_layout.num_layers(params) == 3
  assert set(stacked) == {"embed", "stacked_blocks", "final_norm", "lm_head"}
  assert stacked["stacked_blocks"]["attn"]["q"]["bias"].shape == (3, 4, 8)
  jax.tree.map(np.testing.assert_array_equal, scan_layout.stack_blocks(params), stacked)
  jax.tree.map(np.testing.assert_array_equal, scan_layout.unstack_blocks(stacked), params)
  assert scan_layout.split_layer(("block_2", "mlp", "up", "kernel")) == (("stacked_blocks", "mlp", "up", "kernel"), 2)
  assert scan_layout.split_layer("block_2/attn/q") == ("stacked_blocks/attn/q", 2)
  assert scan_layout.layer_path("stacked_blocks/attn/q/kernel", 1) == "block_1/attn/q/kernel"
  assert scan_layout.layer_axes("opt_state/0/mu/stacked_blocks/attn/q/kernel") == 1
  assert scan_layout.layer_axes("blocks/0/kernel") == 0  # a generic model's own "blocks" are not stacked layers
  assert scan_layout.layer_axes(("embed", "embedding")) == 0
  np.testing.assert_array_equal(scan_layout.get_layer(stacked, ("block_1", "attn", "k", "kernel")),
                                params["block_1"]["attn"]["k"]["kernel"])
  with pytest.raises(ValueError, match="not 0 .. L-1"):
    scan_layout.stack_blocks({"block_0": {"w": jnp.zeros(2)}, "block_2": {"w": jnp.zeros(2)}})


def test_stacked_layout_gives_the_per_block_logits_and_gradients(models):
  (model, params), (smodel, stacked) = models
  tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, CFG.vocab_size)

  def loss(apply):
    def f(p):
      logits = apply(p, tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(f))

  loss_a, grads = loss(model.apply)(params)
  loss_b, sgrads = loss(smodel.apply)(stacked)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  assert sgrads["stacked_blocks"]["mlp"]["gate"]["kernel"].shape == (3, 32, 128)
  for (path, g), g2 in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                           jax.tree.leaves(scan_layout.unstack_blocks(sgrads))):
    np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads["block_2"]["attn"]["o"]["kernel"]).max()) > 1e-4


def test_kv_cache_sampling_in_the_stacked_layout(models):
  """generate (prefill + scanned decode steps over the stacked cache, left-padded rows) equals the per-block
  model's greedy tokens, and the full-recompute reference."""
  from cl_jax.models.sampling import generate
  (model, params), (smodel, stacked) = models
  prompt = jax.random.randint(jax.random.key(2), (2, 6), 0, CFG.vocab_size)
  valid = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], jnp.int32)
  kw = dict(max_new_tokens=8, temperature=0.0)
  want = generate(model, params, prompt, jax.random.key(0), valid=valid, **kw)
  got = generate(smodel, stacked, prompt, jax.random.key(0), valid=valid, **kw)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(generate(smodel, stacked, prompt, jax.random.key(0), **kw),
                                generate(smodel, stacked, prompt, jax.random.key(0), use_cache=False, **kw))


@pytest.mark.parametrize("method,kw", [("ties", dict(density=0.3)), ("dare_linear", dict(density=0.5, seed=3)),
                                       ("slerp", dict(t={"embed|norm": 0.5, "default": [0.0, 1.0]}))])
def test_merges_are_per_layer_in_the_stacked_layout(method, kw):
  """A stacked leaf is merged slice by slice: the same numbers as merging block_0, block_1, ... (mergekit's
  per-tensor top-k, per-layer SLERP t from a depth gradient, DARE masks keyed by the per-block path)."""
  _, base = build_lm(TransformerConfig(vocab_size=16, d_model=16, num_layers=3, num_heads=2, max_len=8), seed=1)
  fts = [jax.tree.map(lambda x, i=i: x + 0.02 * jax.random.normal(jax.random.key(10 + i), x.shape), base)
         for i in range(2)]
  plain = merging.merge(method, base, fts, **kw)
  stacked = merging.merge(method, scan_layout.stack_blocks(base), [scan_layout.stack_blocks(f) for f in fts], **kw)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(plain)[0],
                          jax.tree.leaves(scan_layout.unstack_blocks(stacked))):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  if method == "ties":  # per-layer top-k: each layer keeps its own 30% (a whole-tensor top-k would not)
    up = lambda p: p["stacked_blocks"]["mlp"]["up"]["kernel"]
    tau = up(stacked) - up(scan_layout.stack_blocks(base))
    kept = np.mean(np.asarray(tau) != 0, axis=(1, 2))
    assert np.all(kept > 0.2), kept
