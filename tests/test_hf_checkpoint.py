"""Hugging Face checkpoint import / export (cl_jax.models.hf_checkpoint) against transformers' own logits.

The fixtures under tests/fixtures/hf/ were written by scripts/make_hf_fixtures.py with transformers + PyTorch
(CPU, float32): tiny random llama (GQA, Llama-3.1 RoPE scaling, sharded files), mistral (sliding window,
tied), qwen2 (q/k/v biases, untied) and gpt2 models with their reference logits, and the further families
(MORE_FAMILIES: qwen3, gemma2, phi3, olmo2, gemma3_text), checked by one test each. This file needs neither.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax.errors import ConfigError
from cl_jax.models import hf_checkpoint as hc
from cl_jax.models import lora
from cl_jax.models.transformer import build_lm, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
# Later entries of the family table, each checked by one test (reference logits in both params layouts, KV-cache
# decoding, export -> import) to keep the suite's time small.
MORE_FAMILIES = ("qwen3", "gemma2", "phi3", "olmo2", "gemma3_text")


def _fixture(family):
  return os.path.join(FIXTURES, family)


def _reference(family):
  return np.load(os.path.join(_fixture(family), "reference.npz"))


def _logits(loaded, tokens):
  return np.asarray(jax.jit(loaded.model.apply)(loaded.params, jnp.asarray(tokens)))


def _flat(params):
  return {"/".join(str(k.key) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_reference(family):
  ref = _reference(family)
  loaded = hc.load(_fixture(family))
  logits = _logits(loaded, ref["tokens"])
  assert logits.shape == ref["logits"].shape and np.abs(ref["logits"]).max() > 1.0
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
  # The tokenizer (tokenizer.json through `tokenizers`) encodes like transformers' tokenizer did, and the
  # eos id comes from config.json.
  np.testing.assert_array_equal(loaded.tokenizer.encode(str(ref["text"])), ref["text_ids"])
  assert loaded.tokenizer.eos_id == loaded.hf_config["eos_token_id"] == 2
  assert "brown fox jumps over the" in loaded.tokenizer.decode(ref["text_ids"])


def test_each_family_feature_is_exercised_by_its_fixture():
  """The reference check above can fail: without the feature each fixture carries, logits move."""
  cfgs = {f: hc.load(_fixture(f)).config for f in FAMILIES}
  assert cfgs["llama"].kv_heads < cfgs["llama"].num_heads and cfgs["llama"].rope_scaling == "llama3"
  assert not cfgs["llama"].tied_embeddings and cfgs["mistral"].tied_embeddings
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias and cfgs["qwen2"].kv_heads == 1
  assert cfgs["gpt2"].positions == "learned" and cfgs["gpt2"].norm == "layernorm"
  for family, override in (("llama", dict(rope_scaling="none")), ("mistral", dict(sliding_window=0)),
                           ("gpt2", dict(gelu_approximate=False))):
    ref = _reference(family)
    changed = _logits(hc.load(_fixture(family), **override), ref["tokens"])
    assert np.abs(changed - ref["logits"]).max() > 1e-3, (family, override)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_is_bit_exact(family, tmp_path):
  loaded = hc.load(_fixture(family))
  # Small shards: every family also goes through the index path.
  files = hc.export(str(tmp_path), loaded.hf_config, loaded.params, tokenizer=loaded.tokenizer,
                    max_shard_bytes=20_000)
  assert hc.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
  again = hc.load(str(tmp_path))
  a, b = _flat(loaded.params), _flat(again.params)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  assert again.config == loaded.config
  # config.json keeps every field of the original (RoPE settings are rewritten in both transformers layouts).
  rope_keys = ("rope_scaling", "rope_parameters", "rope_theta")
  assert {k: v for k, v in loaded.hf_config.items() if k not in rope_keys} == {
      k: again.hf_config.get(k) for k in loaded.hf_config if k not in rope_keys}
  np.testing.assert_array_equal(again.tokenizer.encode("fox jumps"), loaded.tokenizer.encode("fox jumps"))
  # One file when it fits; a re-export replaces the shards instead of leaving them beside it.
  files = hc.export(str(tmp_path), loaded.config, loaded.params, family=family)
  assert hc.SINGLE_FILE in files and not any(f.startswith("model-") for f in os.listdir(tmp_path))
  np.testing.assert_array_equal(_flat(hc.load(str(tmp_path)).params)["embed/embedding"], a["embed/embedding"])


def test_export_with_a_lora_adapter_merged(tmp_path):
  loaded = hc.load(_fixture("qwen2"))
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  lm = lora.LoraModel(loaded.model, spec)
  params = lm.add_adapter(lora.lora_params(loaded.params), "med", jax.random.key(0))
  # A trained adapter: B != 0 everywhere.
  params["adapters"]["med"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                                           params["adapters"]["med"])
  tokens = jnp.asarray(_reference("qwen2")["tokens"])
  adapted = np.asarray(jax.jit(lambda p, x: lm.apply(p, x, adapter="med"))(params, tokens))
  with pytest.raises(ConfigError, match="adapter="):
    hc.export(str(tmp_path), loaded.hf_config, params)
  hc.export(str(tmp_path), loaded.hf_config, params, adapter="med", lora_spec=spec)
  merged = _logits(hc.load(str(tmp_path)), tokens)
  np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-4)
  assert np.abs(merged - _reference("qwen2")["logits"]).max() > 1e-2  # the adapter is really in there


def test_a_new_family_is_one_table_entry(tmp_path, monkeypatch):
  """Adding a Hugging Face family takes one `hf_families.Family` entry and no code: a toy family (Llama's
  conventions under other tensor names, its own prefix and head name, q/k/v and gate/up each fused into one
  tensor, weights stored [in, out]) registered here exports the Llama fixture and loads it back bit for bit."""
  from safetensors.numpy import load_file
  fused = {"q": "blocks.{i}.mix.qkv", "k": "blocks.{i}.mix.qkv", "v": "blocks.{i}.mix.qkv",
           "gate": "blocks.{i}.ffn.gate_up", "up": "blocks.{i}.ffn.gate_up"}
  toy = dataclasses.replace(
      hc.FAMILIES["llama"], model_type="toy", architecture="ToyForCausalLM", prefix="backbone.", lm_head="head",
      weight_layout="in_out", tensors={"embed": "tok_embed", "final_norm": "out_norm", "attn_norm": "blocks.{i}.norm1",
                                       "mlp_norm": "blocks.{i}.norm2", "o": "blocks.{i}.mix.out",
                                       "down": "blocks.{i}.ffn.down", **fused})
  loaded = hc.load(_fixture("llama"))
  cfg = loaded.config
  with monkeypatch.context() as m:
    m.setitem(hc.FAMILIES, "toy", toy)
    assert hc.family_of(cfg) == "llama"  # earlier entries keep their configs
    hc.export(str(tmp_path), loaded.hf_config, loaded.params, tokenizer=loaded.tokenizer, family="toy")
    again = hc.load(str(tmp_path))
    a, b = _flat(loaded.params), _flat(again.params)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert again.config == cfg and again.hf_config["model_type"] == "toy"
    assert again.hf_config["architectures"] == ["ToyForCausalLM"]
    np.testing.assert_array_equal(again.tokenizer.encode("fox jumps"), loaded.tokenizer.encode("fox jumps"))
  # The toy file holds the Llama tensors under the entry's names: the fused ones are Llama's [out, in] weights
  # transposed and laid side by side along the output axis, in q, k, v / gate, up order.
  theirs = {k: v for f in glob.glob(os.path.join(_fixture("llama"), "model-*.safetensors"))
            for k, v in load_file(f).items()}
  ours = load_file(str(tmp_path / hc.SINGLE_FILE))
  assert "head.weight" in ours and not any(k.startswith("model.") for k in ours)
  for i in range(cfg.num_layers):
    llama, toy_layer = f"model.layers.{i}.", f"backbone.blocks.{i}."
    np.testing.assert_array_equal(ours[toy_layer + "mix.qkv.weight"], np.concatenate(
        [theirs[f"{llama}self_attn.{p}_proj.weight"].T for p in "qkv"], axis=1))
    np.testing.assert_array_equal(ours[toy_layer + "ffn.gate_up.weight"], np.concatenate(
        [theirs[f"{llama}mlp.{p}_proj.weight"].T for p in ("gate", "up")], axis=1))
    np.testing.assert_array_equal(ours[toy_layer + "norm1.weight"], theirs[llama + "input_layernorm.weight"])
  # Registered for the test only: once removed, the family is unknown again.
  with pytest.raises(ConfigError, match="model_type='toy' is not supported"):
    hc.load(str(tmp_path))
  # A malformed entry fails where it is written.
  with pytest.raises(ValueError, match=r"lack roles \['o'\]"):
    dataclasses.replace(toy, tensors={k: v for k, v in toy.tensors.items() if k != "o"})


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from cl_jax import sharding
    from cl_jax.models import hf_checkpoint as hc, scan_layout
    assert jax.device_count() == 8, jax.devices()
    # Record how much of each HF tensor every device's read takes from the file, per cl_jax param.
    reads = []
    read_piece = hc._read_piece

    class Recorder:
      def __init__(self, tensor, piece):
        self.tensor, self.piece = tensor, piece
      def __getitem__(self, sel):
        block = self.tensor[sel]
        reads.append(("/".join(self.piece.path), block.size / np.prod(self.piece.shape)))
        return block

    hc._read_piece = lambda tensor, piece, index, dtype: read_piece(Recorder(tensor, piece), piece, index, dtype)
    out = {}
    for family in ("llama", "gpt2"):
      path = "tests/fixtures/hf/" + family
      single = hc.load(path)
      ref = np.load(path + "/reference.npz")
      cases = {"fsdp8": (1, 8, False), "data2_fsdp4": (2, 4, False), "stacked_fsdp8": (1, 8, True)}
      for name, (data, fsdp, stacked) in cases.items():
        mesh = sharding.make_mesh(data, fsdp)
        reads.clear()
        sharded = hc.load(path, mesh=mesh, scan_layers=stacked)
        largest_read = {}
        for param, fraction in reads:  # a stacked param's reads: the largest over its layers' tensors
          param = scan_layout.split_layer(param)[0] if stacked else param
          largest_read[param] = max(largest_read.get(param, 0.0), fraction)
        ref_params = scan_layout.stack_blocks(single.params) if stacked else single.params
        flat_s = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(sharded.params)[0]}
        flat_1 = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(ref_params)[0]}
        assert flat_s.keys() == flat_1.keys()
        want = sharding.state_sharding(ref_params, mesh)
        flat_w = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
        equal = all(np.array_equal(np.asarray(flat_s[k]), np.asarray(flat_1[k])) for k in flat_1)
        specs = all(flat_s[k].sharding.is_equivalent_to(flat_w[k], flat_s[k].ndim) for k in flat_1)
        fractions = {k: x.addressable_shards[0].data.size / x.size for k, x in flat_s.items()}
        logits = np.asarray(jax.jit(sharded.model.apply)(sharded.params, ref["tokens"]))
        out[family + "/" + name] = {"equal": equal, "specs": specs, "fractions": fractions, "reads": largest_read,
                                    "err": float(np.abs(logits - ref["logits"]).max())}
    print("RESULT" + json.dumps(out))
""")


def test_load_streams_into_fsdp_shardings_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0][len("RESULT"):])
  for key, r in out.items():
    assert r["equal"] and r["specs"], key
    assert r["err"] < 1e-4, key
    # Streaming: every read of a weight matrix from the file is exactly one device's shard. (A bias [H, Dh]
    # split along Dh is read over its shard's bounding range: a few KB even for large models.)
    for param, fraction in r["fractions"].items():
      name = "/".join(param[2:-2].split("']['"))
      if name.endswith(("kernel", "embedding")):
        assert r["reads"][name] == fraction, (key, name)
  # Kernels are split 8 (or 4) ways: each device holds only its slice of, e.g., q [D=32, H, Dh] (split along
  # D) and GPT-2's fused c_attn (the q / k / v parts each split along D).
  f8 = out["llama/fsdp8"]["fractions"]
  assert f8["['block_0']['attn']['q']['kernel']"] == 1 / 8
  assert f8["['block_1']['mlp']['down']['kernel']"] == 1 / 8
  assert f8["['embed']['embedding']"] == 1 / 8
  assert out["gpt2/data2_fsdp4"]["fractions"]["['block_0']['attn']['k']['kernel']"] == 1 / 4
  assert out["gpt2/fsdp8"]["fractions"]["['pos_embed']['embedding']"] == 1 / 8
  # Stacked layout (scan_layers): [L, D, ...] split along D only, every layer of it on every device; each layer's
  # HF tensor is still read one device's shard at a time (checked above for every kernel).
  assert out["llama/stacked_fsdp8"]["fractions"]["['stacked_blocks']['attn']['q']['kernel']"] == 1 / 8
  assert out["gpt2/stacked_fsdp8"]["fractions"]["['stacked_blocks']['mlp']['up']['kernel']"] == 1 / 8
  assert "stacked_blocks/attn/q/kernel" in out["gpt2/stacked_fsdp8"]["reads"]


def _copy(family, tmp_path):
  dst = tmp_path / family
  shutil.copytree(_fixture(family), dst)
  return dst


def _edit_config(directory, **changes):
  path = directory / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))


def test_clear_errors_name_the_path_and_the_supported_families(tmp_path):
  with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'}: not a directory.*llama, mistral, qwen2, gpt2"):
    hc.load(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match="empty: no config.json"):
    hc.load(str(tmp_path / "empty"))
  d = _copy("mistral", tmp_path)
  _edit_config(d, model_type="bert")
  with pytest.raises(ConfigError, match=r"config.json: model_type='bert' is not supported; supported "
                                        "families: llama, mistral, qwen2, gpt2"):
    hc.load(str(d))
  _edit_config(d, model_type="mistral", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(ConfigError, match="RoPE scaling type 'yarn' is not supported"):
    hc.load(str(d))
  _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1e3}, hidden_act="gelu")
  with pytest.raises(ConfigError, match="hidden_act='gelu'"):
    hc.load(str(d))
  _edit_config(d, hidden_act="silu", intermediate_size=40)
  with pytest.raises(ConfigError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has "
                                        r"shape \[48, 32\], but config.json implies \[40, 32\]"):
    hc.load(str(d))
  _edit_config(d, intermediate_size=48, tie_word_embeddings=False)
  with pytest.raises(ConfigError, match=r"lacks tensors .*\['lm_head.weight'\]"):
    hc.load(str(d))
  os.remove(d / "model.safetensors")
  with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
    hc.load(str(d))
  # `check` reads no weights and prefixes the config key, for a config's validation step.
  assert hc.check(_fixture("gpt2"), seq_len=64).positions == "learned"
  with pytest.raises(ConfigError, match=r"^lm.init_from='.*gpt2': .*65 tokens exceed the model's 64 learned"):
    hc.check(_fixture("gpt2"), seq_len=65)
  with pytest.raises(ConfigError, match=r"^lm.init_from='.*mistral': .*no model.safetensors"):
    hc.check(str(d))
  s = _copy("llama", tmp_path)
  os.remove(s / "model-00003-of-00006.safetensors")
  with pytest.raises(ConfigError, match=r"index.json: names shard files that do not exist .*00003"):
    hc.load(str(s))
  # The byte-level model cl_jax trains itself (RoPE + gelu MLP) is no HF family: export says so up front.
  cfg = model_config("tiny", vocab_size=32, d_model=16, num_heads=2, num_layers=1)
  _, params = build_lm(cfg)
  with pytest.raises(ConfigError, match="matches no Hugging Face family; exportable: llama/mistral/qwen2"):
    hc.export(str(tmp_path / "out"), cfg, params)
  with pytest.raises(ConfigError, match="family='llama' cannot hold this model exactly .*'qwen2'"):
    hc.export(str(tmp_path / "out"), hc.load(_fixture("qwen2")).config, hc.load(_fixture("qwen2")).params,
              family="llama")
  assert not (tmp_path / "out").exists()



def test_a_corrupt_safetensors_header_is_named_at_validation_and_at_load(tmp_path, capsys):
  """First bytes of a weight file overwritten (the header length becomes absurd): `check` (a config's validation)
  and `load` both name the file in one ConfigError; through the CLI that is exit 2 with nothing written."""
  from cl_jax.cli import main
  sharded = _copy("llama", tmp_path)
  shard = sharded / "model-00002-of-00006.safetensors"
  single = _copy("gpt2", tmp_path) / "model.safetensors"
  for file in (shard, single):
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8
    file.write_bytes(bytes(data))
  for directory, file in ((sharded, shard), (single.parent, single)):
    with pytest.raises(ConfigError, match=rf"^lm.init_from='{directory}': {file}: not a readable safetensors file"):
      hc.check(str(directory))
    with pytest.raises(ConfigError, match=rf"^{file}: not a readable safetensors file \(.*header too large\)"):
      hc.load(str(directory))
  workdir = tmp_path / "w"
  rc = main(["--config", "configs/cpt_lm.py", f"--config.lm.init_from={sharded}", "--workdir", str(workdir),
             "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2, err
  assert err.startswith(f"error: lm.init_from='{sharded}': {shard}: not a readable safetensors file") and "\n" not in err
  assert not workdir.exists()
  # A torn config.json is named too (not a bare JSONDecodeError).
  (sharded / "config.json").write_text('{"model_type": "lla')
  with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(Unterminated string"):
    hc.check(str(sharded))

def test_a_model_built_in_cl_jax_exports_in_each_family(tmp_path):
  """A freshly initialised TransformerLM with a family's architecture round-trips through that layout."""
  common = dict(vocab_size=40, d_model=16, num_heads=4, num_layers=1, max_len=24)
  configs = {"llama": dict(mlp="swiglu", num_kv_heads=2, rope_scaling="linear", rope_factor=2.0),
             "mistral": dict(mlp="swiglu", sliding_window=4, tied_embeddings=False, rope_scaling="llama3",
                             rope_factor=4.0, rope_original_max_len=16),
             "qwen2": dict(mlp="swiglu", qkv_bias=True),
             "gpt2": dict(positions="learned", norm="layernorm", norm_eps=1e-5, qkv_bias=True, o_bias=True,
                          mlp_bias=True)}
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 40)
  for family, fields in configs.items():
    cfg = model_config("tiny", **common, **fields)
    assert hc.family_of(cfg) == family
    model, params = build_lm(cfg, seed=3)
    hc.export(str(tmp_path / family), cfg, params)
    again = hc.load(str(tmp_path / family))
    assert hc.hf_config(again.config) == hc.hf_config(cfg), family  # the same architecture
    np.testing.assert_array_equal(_logits(again, tokens), np.asarray(jax.jit(model.apply)(params, tokens)))


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_of_imported_models_matches_the_full_forward(family):
  """Prefill + one-token decode steps (grouped-query cache, sliding window, learned positions) equal the
  reference logits: what cl_jax.models.sampling.generate relies on."""
  from flax import nnx
  from cl_jax.models.transformer import init_cache
  ref = _reference(family)
  loaded = hc.load(_fixture(family))
  tokens = jnp.asarray(ref["tokens"])

  @jax.jit
  def run(params, tokens, start, cache):
    return nnx.merge(loaded.model.graphdef, params).forward_with_cache(tokens, start, cache)

  cache = init_cache(loaded.config, 2, tokens.shape[1])
  assert cache[0]["k"].shape[2] == loaded.config.kv_heads
  logits, cache = run(loaded.params, tokens[:, :5], jnp.int32(0), cache)
  steps = [logits]
  for t in range(5, tokens.shape[1]):
    step, cache = run(loaded.params, tokens[:, t:t + 1], jnp.int32(t), cache)
    steps.append(step)
  np.testing.assert_allclose(np.concatenate(steps, 1), ref["logits"], rtol=0, atol=1e-4)


def test_bfloat16_checkpoints_and_original_gpt2_names(tmp_path):
  from safetensors.numpy import load_file, save_file
  # Stored in bf16 (as most released checkpoints are): read into float32 or bfloat16 params.
  loaded = hc.load(_fixture("qwen2"))
  hc.export(str(tmp_path / "bf16"), loaded.hf_config, loaded.params, dtype=jnp.bfloat16)
  assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * os.path.getsize(
      os.path.join(_fixture("qwen2"), "model.safetensors"))
  as32, as16 = hc.load(str(tmp_path / "bf16")), hc.load(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  for path, x in _flat(loaded.params).items():
    rounded = x.astype(jnp.bfloat16)
    assert _flat(as16.params)[path].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_flat(as16.params)[path], rounded)
    np.testing.assert_array_equal(_flat(as32.params)[path], rounded.astype(np.float32))
  ref = _reference("qwen2")
  err = np.abs(_logits(as32, ref["tokens"]) - ref["logits"]).max()
  assert 1e-4 < err < 0.1 * np.abs(ref["logits"]).max()  # rounded weights, the same function
  # bf16 matmuls over float32 params (the training recipe): float32 logits, close to the reference.
  mixed = hc.load(_fixture("qwen2"), compute_dtype="bfloat16")
  logits = _logits(mixed, ref["tokens"])
  assert logits.dtype == np.float32 and mixed.config.compute_dtype == "bfloat16"
  assert 1e-4 < np.abs(logits - ref["logits"]).max() < 0.1 * np.abs(ref["logits"]).max()
  # OpenAI's gpt2 checkpoints name tensors without the 'transformer.' prefix and carry causal-mask buffers.
  d = _copy("gpt2", tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  renamed = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()}
  renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
  ref = _reference("gpt2")
  np.testing.assert_allclose(_logits(hc.load(str(d)), ref["tokens"]), ref["logits"], rtol=0, atol=1e-4)
  renamed["h.0.attn.c_proj.extra"] = np.zeros(3, np.float32)
  save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ConfigError, match=r"does not account for: \['h.0.attn.c_proj.extra'\]"):
    hc.load(str(d))


def test_cpt_hf_continues_pretraining_an_imported_model_through_run_py(tmp_path):
  """configs/cpt_hf.py:path=DIR through the CLI (what run.py runs): the tiny Llama fixture adapts with a LoRA
  adapter on a local directory of .txt / .jsonl files, and the kept model comes back out in the HF layout with
  the adapter merged into exactly the adapted kernels."""
  from cl_jax.cli import main
  corpus = tmp_path / "notes"
  corpus.mkdir()
  for i in range(30):
    (corpus / f"note{i:02d}.txt").write_text(f"The patient {i} was given dose {i % 5} of the drug daily. " * 4)
  (corpus / "more.jsonl").write_text("\n".join(json.dumps({"text": f"Follow-up {i}: the dose stays. " * 5})
                                               for i in range(30)))
  workdir = tmp_path / "run"
  argv = [f"--config=configs/cpt_hf.py:path={_fixture('llama')},domain={corpus},steps=6,strategy=lora",
          f"--workdir={workdir}", "--config.lm.seq_len=32", "--config.adapt.batch_size=4", "--config.optim.lr=0.01",
          "--config.regression.eval_every=3", "--config.regression.eval_batch_size=8",
          "--config.regression.threshold=0.5", "--config.text.eval_sequences=8", "--config.text.cloze_items=8",
          "--config.text.cloze_context=16", "--config.text.max_train_sequences=64"]
  assert main(argv) == 0
  record = json.loads((workdir / "results.json").read_text())
  assert record["hf_export"] == str(workdir / "hf") and record["best_step"] > 0
  assert record["test"]["best"]["domain/perplexity"] < record["test"]["base"]["domain/perplexity"]
  base, adapted = hc.load(_fixture("llama")), hc.load(str(workdir / "hf"))
  assert adapted.config == base.config and adapted.hf_config["rope_parameters"]["rope_type"] == "llama3"
  text = "dose of the drug"
  np.testing.assert_array_equal(adapted.tokenizer.encode(text), base.tokenizer.encode(text))
  a, b = _flat(base.params), _flat(adapted.params)
  for name in a:  # LoRA adapts the attention and MLP projections; everything else is the base, bit for bit
    changed = not np.array_equal(a[name], b[name])
    assert changed == (name.startswith("block_") and name.endswith("kernel")), name
  # The adapter itself, in PEFT's format on the unchanged checkpoint: base + (alpha / r) A B = the merged export.
  assert record["hf_adapter"] == str(workdir / "hf_adapter")
  adapter, spec = hc.import_peft_adapter(record["hf_adapter"], base.config, base.params)
  for path, layer in adapter.items():
    kernel = a[path + "/kernel"]
    delta = (spec.alpha / spec.rank) * np.asarray(layer["A"]) @ np.asarray(layer["B"])
    np.testing.assert_allclose(b[path + "/kernel"], kernel + delta.reshape(kernel.shape), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_in_the_stacked_layout_keeps_its_logits(family, tmp_path):
  """Under `scan_layers` the importer builds the stacked layout (one [L, ...] leaf per kernel kind, layer i = HF
  layer i): reference logits, the same KV-cache decoding, and export -> re-import bit-exact in both layouts."""
  from flax import nnx
  from cl_jax.models import scan_layout
  from cl_jax.models.transformer import init_cache
  ref = _reference(family)
  plain = hc.load(_fixture(family))
  loaded = hc.load(_fixture(family), scan_layers=True, remat="dots")
  num_layers = loaded.config.num_layers
  assert "block_1" not in loaded.params and loaded.params["stacked_blocks"]["mlp"]["up"]["kernel"].shape == (
      num_layers, *plain.params["block_0"]["mlp"]["up"]["kernel"].shape)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded.params)[0],
                       jax.tree.leaves(scan_layout.stack_blocks(plain.params))):
    assert np.array_equal(np.asarray(a), np.asarray(b)), p
  np.testing.assert_allclose(_logits(loaded, ref["tokens"]), ref["logits"], rtol=0, atol=1e-4)
  tokens = jnp.asarray(ref["tokens"])
  run = jax.jit(lambda p, t, s, c: nnx.merge(loaded.model.graphdef, p).forward_with_cache(t, s, c))
  cache = init_cache(loaded.config, 2, tokens.shape[1])
  assert cache[0]["k"].shape[:3] == (num_layers, 2, tokens.shape[1])
  steps = []
  for start, stop in ((0, 5),) + tuple((t, t + 1) for t in range(5, tokens.shape[1])):
    logits, cache = run(loaded.params, tokens[:, start:stop], jnp.int32(start), cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), ref["logits"], rtol=0, atol=1e-4)
  hc.export(str(tmp_path), loaded.hf_config, loaded.params, max_shard_bytes=20_000)
  for again, want in ((hc.load(str(tmp_path)), plain.params),
                      (hc.load(str(tmp_path), scan_layers=True), loaded.params)):
    a, b = _flat(again.params), _flat(want)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


# How each further family is run: unrolled blocks (a Python loop; under remat a `jax.checkpoint` per block told its
# static layer index) or scanned (`scan_layers`: one block over params stacked [L, ...], layers that differ get
# their index scanned along with them, through `jax.checkpoint` under remat).
MORE_FAMILY_RUNS = {"qwen3": dict(remat="full"), "gemma2": {}, "phi3": {}, "olmo2": dict(scan_layers=True),
                    "gemma3_text": dict(scan_layers=True, remat="full")}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_match_transformers_and_round_trip(family, tmp_path):
  """qwen3 (per-head q/k norms, head dim 16 != 32 / 4, layer 1 of 2 sliding), gemma2 (sandwich norms with 1 + w
  gains, scaled embeddings, attention and final soft-caps, query_pre_attn_scalar 12 != head dim 8, layer 0
  sliding), phi3 (fused qkv_proj and gate_up_proj), olmo2 (post-norms, q/k norms over the whole projection) and
  gemma3_text (q/k norms, linear RoPE scaling on the global layer, theta 10 on the sliding one), each run as
  MORE_FAMILY_RUNS says: the reference logits, and export -> import bit-exact with the same config
  (transformers' side of the export: scripts/make_hf_fixtures.py --check-export). gemma3_text's alternating
  sliding / global layers also run scanned over a KV cache (what sampling does)."""
  from flax import nnx
  from cl_jax.models import scan_layout
  from cl_jax.models.transformer import init_cache
  ref = _reference(family)
  loaded = hc.load(_fixture(family), **MORE_FAMILY_RUNS[family])
  assert np.abs(ref["logits"]).max() > 1.0
  np.testing.assert_allclose(_logits(loaded, ref["tokens"]), ref["logits"], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(loaded.tokenizer.encode(str(ref["text"])), ref["text_ids"])
  if family == "gemma3_text":
    assert loaded.config.per_layer and loaded.params["stacked_blocks"]["attn"]["q_norm"]["scale"].shape == (2, 8)
    model = nnx.merge(loaded.model.graphdef, loaded.params)
    cached, cache = jax.jit(model.forward_with_cache)(jnp.asarray(ref["tokens"]), jnp.int32(0),
                                                       init_cache(loaded.config, 2, 16))
    np.testing.assert_allclose(cached, ref["logits"], rtol=0, atol=1e-4)
    assert cache[0]["k"].shape[:2] == (2, 2)  # [layers, batch, ...]: one stacked cache, scanned with the layers
  hc.export(str(tmp_path), loaded.hf_config, loaded.params, tokenizer=loaded.tokenizer)
  again = hc.load(str(tmp_path))
  a, b = _flat(scan_layout.unstack_blocks(loaded.params)), _flat(again.params)
  assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
  assert again.config == loaded.config.replace(remat="none", scan_layers=False)
  # phi3 computes Llama's function: a TransformerConfig alone exports as llama, as phi3 only when asked.
  assert hc.family_of(again.config) == ("llama" if family == "phi3" else family)
  rope_keys = ("rope_scaling", "rope_parameters", "rope_theta")
  assert {k: v for k, v in loaded.hf_config.items() if k not in rope_keys} == {
      k: again.hf_config.get(k) for k in loaded.hf_config if k not in rope_keys}


def test_each_feature_of_the_further_families_moves_the_logits():
  """What the further fixtures carry is exercised: with the option off (params unchanged), the logits leave the
  reference; and a model built in cl_jax with a family's conventions exports as that family."""
  cfgs = {f: hc.transformer_config(hc.read_config(_fixture(f))) for f in ("qwen3", "gemma2", "gemma3_text")}
  assert cfgs["qwen3"].global_layers == (0,) and cfgs["qwen3"].sliding_window == 5 and cfgs["qwen3"].qk_norm == "head"
  assert cfgs["gemma2"].global_layers == (1,) and (cfgs["gemma2"].attn_softcap, cfgs["gemma2"].final_softcap,
                                                   cfgs["gemma2"].attn_scale_dim) == (5.0, 10.0, 12.0)
  assert cfgs["gemma3_text"].rope_local_base == 10.0 and cfgs["gemma3_text"].rope_scaling == "linear"
  # Two overrides only, to keep the suite's time small (that a window moves the logits: mistral's check above).
  for family, override in (("gemma2", dict(attn_softcap=0.0)), ("gemma3_text", dict(rope_local_base=0.0))):
    ref = _reference(family)
    changed = _logits(hc.load(_fixture(family), **override), ref["tokens"])
    assert np.abs(changed - ref["logits"]).max() > 1e-3, (family, override)
  gemma_like = model_config("tiny", vocab_size=16, d_model=16, num_heads=2, num_layers=2, mlp="geglu",
                            block_norms="sandwich", norm_plus_one=True, embed_scale=True)
  assert hc.family_of(gemma_like) == "gemma2"
  assert hc.family_of(gemma_like.replace(qk_norm="head")) == "gemma3_text"
  assert hc.family_of(gemma_like.replace(mlp="swiglu", block_norms="post", norm_plus_one=False, embed_scale=False,
                                         qk_norm="full")) == "olmo2"
  with pytest.raises(ConfigError, match="matches no Hugging Face family"):  # Gemma's layer without its 1 + w gains
    hc.family_of(gemma_like.replace(norm_plus_one=False))
  # A per-layer window pattern exports only to a family that states windows per layer.
  mixed = gemma_like.replace(mlp="swiglu", block_norms="pre", norm_plus_one=False, embed_scale=False, qkv_bias=True,
                             sliding_window=3, global_layers=(1,))
  assert hc.family_of(mixed) == "qwen2"
  with pytest.raises(ConfigError, match="family='mistral' cannot hold this model exactly"):
    hc.hf_config(mixed, "mistral")
  # Bad input is named: a layer index out of range, a config.json whose layer_types do not fit its layers.
  with pytest.raises(ValueError, match=r"global_layers=\(2,\): expected a tuple of layer indices in \[0, 2\)"):
    mixed.replace(global_layers=(2,))
  hf = dict(hc.read_config(_fixture("gemma2")), layer_types=["sliding_attention"])
  with pytest.raises(ConfigError, match=r"^x/config.json: layer_types=\['sliding_attention'\]: expected 2 entries"):
    hc.transformer_config(hf, "x/config.json")
