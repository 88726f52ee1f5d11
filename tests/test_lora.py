"""LoRA: identity at init, frozen base bit for bit, optimizer state only on adapters, merge == run."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cl_jax.losses import cross_entropy
from cl_jax.models import CNN, MLP, functional
from cl_jax.models import lora


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  return x, d.target.astype(np.int32)


def _mlp(seed=0, hidden=(32, 32)):
  return functional(MLP(64, hidden, 10, rngs=nnx.Rngs(seed)))


def _trained_adapter(params, spec, rng, name="b"):
  """Gives adapter `name` a random non-zero B so the adapter actually changes the output."""
  params = lora.add_adapter(params, name, rng, spec)
  ad = params["adapters"][name]
  keys = jax.random.split(jax.random.fold_in(rng, 1), len(ad))
  ad = {p: {"A": l["A"], "B": 0.3 * jax.random.normal(k, l["B"].shape)} for k, (p, l) in zip(keys, ad.items())}
  return {"base": params["base"], "adapters": {**params["adapters"], name: ad}}


def test_target_selection():
  _, base = _mlp()
  assert lora.target_paths(base, "all-linear") == ("dense_0", "dense_1")  # the head is left alone
  assert lora.target_paths(base, ["dense_1", "head"]) == ("dense_1", "head")
  with pytest.raises(ValueError, match="dense_9"):
    lora.target_paths(base, ["dense_9"])
  cnn_model, cnn = functional(CNN((8, 8), (4, 8), 16, 10, rngs=nnx.Rngs(0)))
  assert lora.target_paths(cnn) == ("dense_0",)  # conv kernels are 4-D: not 'linear'
  axes = lora.LoraModel(cnn_model, lora.LoraSpec()).in_axes(cnn)
  assert axes == {"conv_0": None, "conv_1": None, "dense_0": 1, "head": 1}
  with pytest.raises(ValueError, match="conv_0"):
    lora.target_paths(cnn, ["conv_0"], axes)
  with pytest.raises(ValueError, match="rank"):
    lora.LoraSpec(rank=0)


def test_fresh_adapter_is_identity_and_shapes(digits):
  x = jnp.asarray(digits[0][:64])
  model, base = _mlp()
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  lm = lora.LoraModel(model, spec)
  params = lora.add_adapter(lora.lora_params(base), "t0", jax.random.key(1), spec)
  ad = params["adapters"]["t0"]
  assert ad["dense_0"]["A"].shape == (64, 4) and ad["dense_0"]["B"].shape == (4, 32)
  assert float(jnp.abs(ad["dense_0"]["A"]).sum()) > 0  # A random, B zero
  ref = model.apply(base, x)
  np.testing.assert_array_equal(lm.apply(params, x, adapter="t0"), ref)
  np.testing.assert_array_equal(lm.apply(params, x), ref)  # disabled
  # A non-zero B changes the output; disabling the adapter restores the base exactly.
  params = _trained_adapter(params, spec, jax.random.key(2))
  assert float(jnp.abs(lm.apply(params, x, adapter="b") - ref).max()) > 1e-2
  np.testing.assert_array_equal(lm.apply(params, x, adapter=None), ref)
  with pytest.raises(KeyError, match="nope"):
    lm.apply(params, x, adapter="nope")


def test_adapter_forward_matches_hand_formula(digits):
  x = jnp.asarray(digits[0][:16])
  model, base = _mlp(hidden=(32,))
  spec = lora.LoraSpec(rank=2, alpha=6.0)
  params = _trained_adapter(lora.lora_params(base), spec, jax.random.key(3))
  l = params["adapters"]["b"]["dense_0"]
  h = jax.nn.relu(x @ (base["dense_0"]["kernel"] + 3.0 * l["A"] @ l["B"]) + base["dense_0"]["bias"])
  expected = h @ base["head"]["kernel"] + base["head"]["bias"]
  np.testing.assert_allclose(lora.LoraModel(model, spec).apply(params, x, adapter="b"), expected,
                             rtol=1e-5, atol=1e-5)


def test_training_an_adapter_leaves_base_bit_identical(digits):
  """The adapter trained with the task loop's own pieces: build_optimizer(trainable=...) + make_train_step."""
  from cl_jax.kinds import base_config
  from cl_jax.strategies import LossContext
  from cl_jax.train.optim import build_optimizer
  from cl_jax.train.state import TrainState
  from cl_jax.train.step import make_train_step

  x_all, y_all = digits
  batch = {"x": jnp.asarray(x_all[:512]), "y": jnp.asarray(y_all[:512]), "task": jnp.zeros((512,), jnp.int32)}
  model, base = _mlp()
  spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1)
  lm = lora.LoraModel(model, spec)
  params = lora.add_adapter(lora.lora_params(base), "other", jax.random.key(0), spec)
  params = lora.add_adapter(params, "task", jax.random.key(1), spec)
  base_before = jax.tree.map(np.array, params["base"])
  other_before = jax.tree.map(np.array, params["adapters"]["other"])
  out_before = np.array(model.apply(base, batch["x"]))
  optim = base_config().optim
  optim.lr = 1e-2
  schedule = optax.constant_schedule(1e-2)
  opt = build_optimizer(optim, schedule, trainable=lora.trainable_mask(params, "task"))
  opt_state = opt.init(params)
  # The optimizer state holds exactly two Adam moments of the adapter, nothing of the base.
  n_state = sum(l.size for l in jax.tree.leaves(opt_state) if l.ndim > 0)
  assert n_state == 2 * lora.num_adapter_params(params["adapters"]["task"])

  def loss_fn(p, b, ctx: LossContext):  # adapter dropout draws from the step's rng
    loss = cross_entropy(lm.apply(p, b["x"], adapter="task", rng=ctx.rng), b["y"]).mean()
    return loss, {}

  step = jax.jit(make_train_step(loss_fn, opt, schedule))
  state = TrainState(jnp.int32(0), params, opt_state, (), jax.random.key(3), jnp.int32(0))
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  params = state.params
  assert losses[-1] < 0.5 * losses[0]  # the adapter learns
  jax.tree.map(np.testing.assert_array_equal, params["base"], base_before)
  jax.tree.map(np.testing.assert_array_equal, params["adapters"]["other"], other_before)
  np.testing.assert_array_equal(np.array(lm.apply(params, batch["x"])), out_before)
  assert float(jnp.abs(params["adapters"]["task"]["dense_0"]["B"]).max()) > 0
  # Dropout is on in training (two rngs, two outputs) and off without an rng.
  a = lm.apply(params, batch["x"], adapter="task", rng=jax.random.key(1))
  b = lm.apply(params, batch["x"], adapter="task", rng=jax.random.key(2))
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(lm.apply(params, batch["x"], adapter="task"),
                                lm.apply(params, batch["x"], adapter="task"))


def test_merge_adapter_equals_running_with_it(digits):
  x = jnp.asarray(digits[0][:64])
  model, base = _mlp()
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  lm = lora.LoraModel(model, spec)
  params = _trained_adapter(lora.lora_params(base), spec, jax.random.key(4))
  merged = lora.merge_adapter(params, "b", spec)
  assert "b" not in merged["adapters"]
  np.testing.assert_allclose(lm.apply(merged, x), lm.apply(params, x, adapter="b"), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(merged["base"]["dense_0"]["kernel"] - base["dense_0"]["kernel"]).max()) > 1e-3
  np.testing.assert_array_equal(merged["base"]["head"]["kernel"], base["head"]["kernel"])


def test_sum_and_per_example_selection(digits):
  x = jnp.asarray(digits[0][:32])
  model, base = _mlp()
  spec = lora.LoraSpec(rank=3, alpha=3.0)
  lm = lora.LoraModel(model, spec)
  p = _trained_adapter(lora.lora_params(base), spec, jax.random.key(5), "a")
  p = _trained_adapter(p, spec, jax.random.key(6), "b")
  # Sum of two adapters == base with both merged.
  both = lora.merge_adapter(lora.merge_adapter(p, "a", spec), "b", spec)
  np.testing.assert_allclose(lm.apply(p, x, adapter=("a", "b")), lm.apply(both, x), rtol=1e-4, atol=1e-4)
  # Per-example: example b uses adapter index[b]; -1 means the base.
  idx = jnp.asarray(np.arange(32) % 3 - 1)
  out = lm.apply(p, x, adapter=("a", "b"), adapter_index=idx)
  ref = {-1: lm.apply(p, x), 0: lm.apply(p, x, adapter="a"), 1: lm.apply(p, x, adapter="b")}
  for k in (-1, 0, 1):
    rows = np.where(np.asarray(idx) == k)[0]
    np.testing.assert_allclose(out[rows], ref[k][rows], rtol=1e-5, atol=1e-5)


def test_generic_kernel_module_is_folded():
  """A non-Linear module that holds a 2-D kernel (as a transformer block might) gets W + s A B."""

  class Proj(nnx.Module):
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (6, 5)))

    def __call__(self, x):
      return x @ self.kernel[...]

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Proj(rngs), Proj(rngs)])
      self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x, task=None):
      h = self.blocks[0](x)
      return self.head(jnp.concatenate([h, x[:, :1]], -1))

  model, base = functional(Net(nnx.Rngs(0)))
  paths = lora.target_paths(base)
  assert paths == ("blocks/0", "blocks/1")
  spec = lora.LoraSpec(targets=["blocks/0"], rank=2, alpha=2.0)
  p = _trained_adapter(lora.lora_params(base), spec, jax.random.key(7))
  x = jax.random.normal(jax.random.key(8), (4, 6))
  lm = lora.LoraModel(model, spec)
  merged = lora.merge_adapter(p, "b", spec)
  np.testing.assert_allclose(lm.apply(p, x, adapter="b"), lm.apply(merged, x), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(lm.apply(p, x, adapter="b") - lm.apply(p, x)).max()) > 1e-3


def test_save_load_roundtrip(tmp_path, digits):
  x = jnp.asarray(digits[0][:16])
  model, base = _mlp()
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  p = _trained_adapter(lora.lora_params(base), spec, jax.random.key(9), "task_1")
  lora.save_adapter(str(tmp_path), p, "task_1", spec)
  assert os.path.isdir(tmp_path / "task_1")
  with pytest.raises(FileExistsError):
    lora.save_adapter(str(tmp_path), p, "task_1", spec)
  fresh, spec2 = lora.load_adapter(str(tmp_path), "task_1", lora.lora_params(base))
  assert spec2 == spec
  lm = lora.LoraModel(model, spec)
  np.testing.assert_array_equal(lm.apply(fresh, x, adapter="task_1"), lm.apply(p, x, adapter="task_1"))
  alone, _ = lora.load_adapter(str(tmp_path), "task_1")
  jax.tree.map(np.testing.assert_array_equal, alone, p["adapters"]["task_1"])
  with pytest.raises(FileNotFoundError, match="missing"):
    lora.load_adapter(str(tmp_path), "missing")


def test_transformer_lm_attention_and_mlp_kernels():
  """The LM's einsum projections (q/k/v [D, H, Dh], o [H, Dh, D], up/down 2-D) take adapters too."""
  from cl_jax.models.transformer import build_lm, model_config
  cfg = model_config("tiny", vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_len=8)
  model, base = build_lm(cfg, seed=0)
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  lm = lora.LoraModel(model, spec)
  assert lm.target_paths(base) == tuple(f"block_0/{m}" for m in ("attn/k", "attn/o", "attn/q", "attn/v",
                                                                  "mlp/down", "mlp/up"))
  assert lm.in_axes(base)["block_0/attn/o"] == 2 and lm.in_axes(base)["block_0/attn/q"] == 1
  params = lm.add_adapter(lora.lora_params(base), "code", jax.random.key(0))
  ad = params["adapters"]["code"]
  assert ad["block_0/attn/o"]["A"].shape == (16, 2) and ad["block_0/attn/q"]["B"].shape == (2, 16)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  run = jax.jit(lambda p, adapter=None: lm.apply(p, tokens, adapter=adapter), static_argnames="adapter")
  ref = jax.jit(model.apply)(base, tokens)
  np.testing.assert_array_equal(run(params, "code"), ref)
  keys = jax.random.split(jax.random.key(3), len(ad))
  ad = {p: {"A": l["A"], "B": 0.5 * jax.random.normal(k, l["B"].shape)} for k, (p, l) in zip(keys, ad.items())}
  params = {"base": base, "adapters": {"code": ad}}
  out = run(params, "code")
  assert float(jnp.abs(out - ref).max()) > 1e-3
  np.testing.assert_allclose(run(lm.merge_adapter(params, "code")), out, rtol=1e-4, atol=1e-5)
  # The adapter gets a gradient.
  g = jax.jit(jax.grad(lambda p: run(p, "code").sum()))(params)
  assert float(jnp.abs(g["adapters"]["code"]["block_0/mlp/up"]["B"]).max()) > 0


def test_adapters_on_stacked_transformer_kernels_match_the_per_block_layout(tmp_path):
  """Under `scan_layers` (kernels `stacked_blocks/...` [L, ...]) every adapter is stacked per layer (A [L, d_in, r]):
  the adapted logits, the gradients, merge-back and save / load equal the per-block layout's, layer by layer."""
  from cl_jax.models.transformer import build_lm, model_config
  from cl_jax.strategies import olora
  cfg = model_config("tiny", vocab_size=32, d_model=16, num_layers=3, num_heads=2, max_len=8, mlp="swiglu")
  model, base = build_lm(cfg, seed=0)
  smodel, sbase = build_lm(cfg.replace(scan_layers=True), seed=0)
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  lm, slm = lora.LoraModel(model, spec), lora.LoraModel(smodel, spec)
  assert slm.target_paths(sbase) == tuple(f"stacked_blocks/{m}" for m in ("attn/k", "attn/o", "attn/q", "attn/v",
                                                                   "mlp/down", "mlp/gate", "mlp/up"))
  sparams = slm.add_adapter(lora.lora_params(sbase), "code", jax.random.key(0))
  ad = sparams["adapters"]["code"]
  assert ad["stacked_blocks/attn/o"]["A"].shape == (3, 16, 2) and ad["stacked_blocks/attn/q"]["B"].shape == (3, 2, 16)
  keys = jax.random.split(jax.random.key(3), len(ad))
  ad = {p: {"A": l["A"], "B": 0.5 * jax.random.normal(k, l["B"].shape)} for k, (p, l) in zip(keys, ad.items())}
  sparams = {"base": sbase, "adapters": {"code": ad}}
  params = lora.lora_to_layout(sparams, False)  # layer i's adapter at block_i/...
  assert params["adapters"]["code"]["block_2/attn/o"]["A"].shape == (16, 2)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  loss = lambda m: jax.jit(lambda p: jnp.sum(jnp.sin(m.apply(p, tokens, adapter="code"))))
  out, sout = lm.apply(params, tokens, adapter="code"), slm.apply(sparams, tokens, adapter="code")
  assert float(jnp.abs(out - model.apply(base, tokens)).max()) > 1e-3
  np.testing.assert_allclose(sout, out, rtol=1e-5, atol=1e-5)
  g, sg = jax.grad(loss(lm))(params), jax.grad(loss(slm))(sparams)
  sg = lora.lora_to_layout(sg, False)
  for p in params["adapters"]["code"]:
    for k in ("A", "B"):
      np.testing.assert_allclose(sg["adapters"]["code"][p][k], g["adapters"]["code"][p][k], rtol=1e-4, atol=1e-6)
  merged = slm.merge_adapter(sparams, "code")
  np.testing.assert_allclose(smodel.apply(merged["base"], tokens), sout, rtol=1e-4, atol=1e-5)
  lora.save_adapter(str(tmp_path), sparams, "code", spec)
  again, _ = lora.load_adapter(str(tmp_path), "code", lora.lora_params(sbase))
  jax.tree.map(np.testing.assert_array_equal, again["adapters"]["code"], ad)
  # O-LoRA's penalties sum per layer: the stacked and per-block layouts give the same numbers.
  old = {p: {"A": jax.random.normal(jax.random.key(7), l["A"].shape)} for p, l in ad.items()}
  per_block = lora.lora_to_layout({"base": {}, "adapters": {"old": old}}, False)["adapters"]["old"]
  np.testing.assert_allclose(olora.orthogonality_penalty([old], ad),
                             olora.orthogonality_penalty([per_block], params["adapters"]["code"]), rtol=1e-5)
  np.testing.assert_allclose(olora.norm_penalty(ad), olora.norm_penalty(params["adapters"]["code"]), rtol=1e-5)
