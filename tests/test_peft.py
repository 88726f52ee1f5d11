"""LoRA / O-LoRA adapters in and out in PEFT's format (issue 22 item 4).

tests/fixtures/peft/qwen2_lora/ is an adapter `peft` saved on the qwen2 fixture (every projection; a rank_pattern
and an alpha_pattern, so modules differ in rank and scale; random A and B) with the PeftModel's logits
(scripts/make_peft_fixtures.py, which also checks that peft loads cl_jax's exports: max logit difference ~1e-5).
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")

from cl_jax.errors import ConfigError  # noqa: E402
from cl_jax.models import hf_checkpoint, lora, scan_layout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2 = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")
ADAPTER = os.path.join(ROOT, "tests", "fixtures", "peft", "qwen2_lora")


@pytest.fixture(scope="module")
def base():
  return hf_checkpoint.load(QWEN2, tokenizer=False)


@pytest.fixture(scope="module")
def logits(base):
  """logits(adapters) of the qwen2 fixture on the reference tokens with the adapters' sum folded into the
  kernels, W + sum_k (alpha / r_k) A_k B_k (cl_jax's convention, what `LoraModel.apply(..., adapter=names)`
  computes; folded on the host so one compiled forward serves every test)."""
  forward = jax.jit(base.model.apply)
  tokens = jnp.asarray(np.load(os.path.join(ADAPTER, "reference.npz"))["tokens"])

  def run(*adapters):
    params = jax.tree.map(np.asarray, base.params)
    for adapter, spec in adapters:
      for path, layer in adapter.items():
        node = params
        for part in path.split("/"):
          node = node[part]
        a, b = np.asarray(layer["A"], np.float64), np.asarray(layer["B"], np.float64)
        delta = (spec.alpha / a.shape[-1]) * (a @ b)
        node["kernel"] = (node["kernel"] + delta.reshape(node["kernel"].shape)).astype(np.float32)
    return np.asarray(forward(params, tokens))

  return run


def test_peft_adapter_gives_peft_logits(base, logits):
  ref = np.load(os.path.join(ADAPTER, "reference.npz"))
  adapter, spec = hf_checkpoint.import_peft_adapter(ADAPTER, base.config, base.params)
  assert spec.rank == 4 and spec.alpha == 8.0 and len(adapter) == 14  # 7 projections x 2 layers
  assert adapter["block_1/mlp/down"]["A"].shape == (48, 2)  # rank_pattern down_proj: 2
  np.testing.assert_allclose(logits((adapter, spec)), ref["logits"], atol=1e-4)
  # The adapter matters (the base alone is far away), and the alpha_pattern scale matters: ignoring it
  # (v_proj at lora_alpha 8 instead of 3) moves the logits.
  assert np.abs(logits() - ref["logits"]).max() > 1
  wrong = dict(adapter)
  for p in ("block_0/attn/v", "block_1/attn/v"):
    wrong[p] = {"A": adapter[p]["A"], "B": adapter[p]["B"] * (8.0 / 3.0)}
  assert np.abs(logits((wrong, spec)) - ref["logits"]).max() > 1e-2


def test_export_has_peft_layout_and_round_trips(base, logits, tmp_path):
  adapter, spec = hf_checkpoint.import_peft_adapter(ADAPTER, base.config, base.params)
  params = lora.lora_params(base.params, {"a": adapter})
  out = str(tmp_path / "adapter")
  hf_checkpoint.export_peft_adapter(out, params, "a", spec, base.hf_config, base_model="tests/fixtures/hf/qwen2")
  from safetensors.numpy import load_file
  theirs, ours = load_file(os.path.join(ADAPTER, "adapter_model.safetensors")), load_file(
      os.path.join(out, "adapter_model.safetensors"))
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in ours
  cfg, ref_cfg = (json.load(open(os.path.join(d, "adapter_config.json"))) for d in (out, ADAPTER))
  for key in ("r", "lora_alpha", "peft_type", "bias", "base_model_name_or_path"):
    assert cfg[key] == ref_cfg[key], key
  assert sorted(cfg["target_modules"]) == sorted(ref_cfg["target_modules"])
  assert {k.replace("\\", "") for k in cfg["rank_pattern"]} == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
  # Factors equal PEFT's except where the alpha_pattern scale was folded into B (v_proj: B x 3 / 8).
  for k, v in theirs.items():
    scale = 3.0 / 8.0 if "v_proj.lora_B" in k else 1.0
    np.testing.assert_allclose(ours[k], v * scale, rtol=1e-6, atol=1e-7)
  back, spec2 = hf_checkpoint.import_peft_adapter(out, base.config, base.params)
  assert (spec2.rank, spec2.alpha) == (spec.rank, spec.alpha) and set(back) == set(adapter)
  for p in adapter:
    for f in "AB":
      np.testing.assert_allclose(np.asarray(back[p][f]), np.asarray(adapter[p][f]), rtol=1e-6, atol=1e-7)


def test_olora_slots_export_as_one_adapter_of_their_sum(base, logits, tmp_path):
  spec = lora.LoraSpec(targets=("block_*/attn/q", "block_*/mlp/up"), rank=2, alpha=6.0)
  rng = np.random.default_rng(0)
  slots = [{f"block_{i}/{m}": {"A": 0.3 * rng.standard_normal((32, 2), np.float32),
                               "B": 0.3 * rng.standard_normal((2, d_out), np.float32)}
            for i in (0, 1) for m, d_out in (("attn/q", 32), ("mlp/up", 48))} for _ in range(2)]
  params = lora.lora_params(base.params, {"t0": slots[0], "t1": slots[1]})
  summed = logits((slots[0], spec), (slots[1], spec))
  out = str(tmp_path / "olora")
  hf_checkpoint.export_peft_adapter(out, params, ("t0", "t1"), spec, base.hf_config)
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 12.0 and cfg["target_modules"] == ["q_proj", "up_proj"]
  back, spec2 = hf_checkpoint.import_peft_adapter(out, base.config, base.params)
  assert back["block_0/attn/q"]["A"].shape == (32, 4)
  np.testing.assert_allclose(logits((back, spec2)), summed, atol=1e-4)
  assert np.abs(logits((slots[0], spec)) - summed).max() > 1e-2  # the second slot counts
  # Only some layers adapted: target_modules becomes a regex naming exactly those modules.
  only = lora.lora_params(base.params, {"t0": {"block_0/attn/q": slots[0]["block_0/attn/q"]}})
  hf_checkpoint.export_peft_adapter(str(tmp_path / "one"), only, "t0", spec, base.hf_config)
  assert json.load(open(tmp_path / "one" / "adapter_config.json"))["target_modules"] == \
      r"(model\.layers\.0\.self_attn\.q_proj)"
  with pytest.raises(ConfigError, match="layers \\[0\\] only"):  # the stacked layout needs every layer
    hf_checkpoint.import_peft_adapter(str(tmp_path / "one"), base.config, _stacked(base.params))


def _stacked(params):
  """The stacked layout (scan_layers) of per-block params, on the host."""
  blocks = sorted(k for k in params if k.startswith("block_"))
  out = {k: v for k, v in params.items() if k not in blocks}
  out[scan_layout.STACK] = jax.tree.map(lambda *xs: np.stack(xs), *[params[k] for k in blocks])
  return out


def test_import_into_the_stacked_layout(base):
  flat, _ = hf_checkpoint.import_peft_adapter(ADAPTER, base.config, base.params)
  adapter, spec = hf_checkpoint.import_peft_adapter(ADAPTER, base.config, _stacked(base.params))
  assert adapter["stacked_blocks/attn/q"]["A"].shape == (2, 32, 4) and spec.targets == tuple(sorted(adapter))
  assert len(adapter) == 7
  for p, layer in flat.items():
    stacked_path, i = scan_layout.split_layer(p)
    np.testing.assert_array_equal(np.asarray(adapter[stacked_path]["B"][i]), np.asarray(layer["B"]))


def test_bad_adapters_are_refused_naming_the_file(base, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(ADAPTER, bad)
  cfg = json.load(open(bad / "adapter_config.json"))
  json.dump({**cfg, "use_dora": True}, open(bad / "adapter_config.json", "w"))
  with pytest.raises(ConfigError, match=r"adapter_config.json: use_dora=True"):
    hf_checkpoint.import_peft_adapter(str(bad), base.config)
  json.dump(cfg, open(bad / "adapter_config.json", "w"))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(bad / "adapter_model.safetensors"))
  tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 32), np.float32)
  save_file(tensors, str(bad / "adapter_model.safetensors"))
  with pytest.raises(ConfigError, match=r"layers\.7\.self_attn\.q_proj'.*no whole linear weight"):
    hf_checkpoint.import_peft_adapter(str(bad), base.config)
  with pytest.raises(ConfigError, match="no adapter_config.json"):
    hf_checkpoint.import_peft_adapter(str(tmp_path), base.config)


def test_a_new_model_run_exports_model_and_adapter(tmp_path, capsys):
  """`lm.export_hf` for a model trained from scratch (no lm.init_from): a Llama-shaped one (lm.mlp='swiglu')
  is written as llama with its tokenizer, its LoRA adapter in PEFT's format on <workdir>/hf_base; the default
  gelu model, which no family holds, gets a one-line notice instead."""
  import ml_collections

  from cl_jax.lm.runner import export_hf
  from cl_jax.models.transformer import model_config
  # The params of a Llama-shaped model (read from the llama fixture, so no init is compiled), handed over as a
  # new run's: no imported config.json to keep, the family found from the TransformerConfig.
  llama = hf_checkpoint.load(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"))
  cfg, params, tok = llama.config, llama.params, llama.tokenizer
  c = ml_collections.ConfigDict({"lm": {"init_from": ""}, "lora": lora.default_config()})
  c.lora.targets, c.lora.rank, c.lora.alpha = "block_*/attn/v", 2, 4.0
  rng = np.random.default_rng(0)
  slot = {"block_0/attn/v": {"A": rng.standard_normal((32, 2), np.float32),
                             "B": rng.standard_normal((2, 16), np.float32)}}
  kept = lora.lora_params(params, {"lora": slot})
  out = export_hf(c, str(tmp_path), cfg, None, kept, "lora", tok)
  assert out == {"hf_export": str(tmp_path / "hf"), "hf_adapter": str(tmp_path / "hf_adapter")}
  merged, base = hf_checkpoint.load(out["hf_export"]), hf_checkpoint.load(str(tmp_path / "hf_base"))
  assert merged.hf_config["model_type"] == "llama" and merged.tokenizer.encode("the fox").size > 0
  adapter, spec = hf_checkpoint.import_peft_adapter(out["hf_adapter"], base.config, base.params)
  assert json.load(open(tmp_path / "hf_adapter" / "adapter_config.json"))["base_model_name_or_path"] == \
      str(tmp_path / "hf_base")
  delta = (spec.alpha / 2) * np.asarray(adapter["block_0/attn/v"]["A"]) @ np.asarray(adapter["block_0/attn/v"]["B"])
  want = np.asarray(params["block_0"]["attn"]["v"]["kernel"]) + delta.reshape(32, 2, 8)
  np.testing.assert_allclose(np.asarray(merged.params["block_0"]["attn"]["v"]["kernel"]), want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(base.params["block_0"]["attn"]["q"]["kernel"]),
                                np.asarray(params["block_0"]["attn"]["q"]["kernel"]))
  gelu = model_config("tiny", vocab_size=tok.vocab_size, d_model=32, num_heads=4, num_layers=2, max_len=32)
  skipped = export_hf(c, str(tmp_path / "g"), gelu, None, params, None, tok)
  assert skipped["hf_export"] is None and "matches no Hugging Face family" in skipped["hf_export_skipped"]
  assert len(capsys.readouterr().out.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "g" / "hf")
