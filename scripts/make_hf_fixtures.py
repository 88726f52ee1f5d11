"""Builds the Hugging Face reference fixtures of tests/test_hf_checkpoint.py (tests/fixtures/hf/).

    pip install torch==2.13.0 transformers    # reference-only: never needed by the test suite
    python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--check-export] [--check-variants]

For each family of `family_configs` (llama with grouped-query attention and Llama-3.1 RoPE scaling, sharded;
mistral with a sliding window and tied embeddings; qwen2 with q/k/v biases and untied embeddings; gpt2; qwen3 with
q/k norms, a head dim != d_model / heads and one sliding layer of two; gemma2 with alternating sliding / global
layers, both soft-caps and query_pre_attn_scalar != head dim; phi3 with its fused projections; olmo2 with post-norms
and whole-projection q/k norms; gemma3_text with q/k norms, linear RoPE scaling on the global layer and another
theta on the sliding one) it builds a
tiny random model with `transformers` (PyTorch, CPU, float32, eager attention), perturbs every parameter (norm
gains and biases too, so a mis-mapped one changes the logits), and writes into `<out>/<family>/`:

  config.json, model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json),
  tokenizer.json (+ tokenizer_config.json)   -- `save_pretrained`, the layout real checkpoints have
  reference.npz   tokens [2, T] int32, logits [2, T, V] float32 (the transformers forward pass),
                  text (str) and text_ids (the transformers tokenizer's ids of `text`)

The tokenizer is a small BPE trained with the `tokenizers` package on a paragraph of CPython's own
documentation (pydoc_data), so the fixtures depend on nothing downloaded.

`--check-export` also goes the other way: cl_jax imports each fixture, exports it with
`cl_jax.models.hf_checkpoint.export`, and transformers loads the export; it prints the largest logit
difference against the reference (0: the export holds the very same weights). `--check-variants` builds random
models in cl_jax with the architecture options the fixtures do not cover (VARIANTS), exports them and compares
their logits with transformers' (~1e-6).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
SEQ = 16
TEXT = "The quick brown fox jumps over the lazy dog; def f(x): return x + 1"


def train_tokenizer(path: str) -> None:
  """A byte-fallback-free BPE with a 128-token vocabulary over a few pydoc topics."""
  from pydoc_data.topics import topics
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  corpus = [topics[k] for k in sorted(topics)[:40]] + [TEXT]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                limit_alphabet=60, show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.save(path)


def family_configs():
  import transformers as tf
  common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
  return {
      "llama": tf.LlamaConfig(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
          rope_parameters=dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=64), **common),
      "mistral": tf.MistralConfig(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=6, tie_word_embeddings=True,
          rope_parameters=dict(rope_type="default", rope_theta=1000.0), **common),
      "qwen2": tf.Qwen2Config(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
          max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
          rope_parameters=dict(rope_type="default", rope_theta=10000.0), **common),
      "gpt2": tf.GPT2Config(
          n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, activation_function="gelu_new",
          layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=VOCAB,
          bos_token_id=1, eos_token_id=2),
      "qwen3": tf.Qwen3Config(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
          use_sliding_window=True, sliding_window=5, max_window_layers=1,
          layer_types=["full_attention", "sliding_attention"],
          rope_parameters=dict(rope_type="default", rope_theta=10000.0), **common),
      "gemma2": tf.Gemma2Config(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=12,
          attn_logit_softcapping=5.0, final_logit_softcapping=10.0, hidden_activation="gelu_pytorch_tanh",
          tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0), pad_token_id=0,
          **common),
      "phi3": tf.Phi3Config(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, original_max_position_embeddings=128, rms_norm_eps=1e-5,
          tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0,
          rope_parameters=dict(rope_type="default", rope_theta=10000.0), **common),
      "olmo2": tf.Olmo2Config(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0,
          rope_parameters=dict(rope_type="default", rope_theta=500.0), **common),
      "gemma3_text": tf.Gemma3TextConfig(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
          head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=8,
          layer_types=["sliding_attention", "full_attention"], hidden_activation="gelu_pytorch_tanh",
          tie_word_embeddings=True, pad_token_id=0,
          rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1000.0),
                           "sliding_attention": dict(rope_type="default", rope_theta=10.0)}, **common),
  }


def perturb(model, seed: int) -> None:
  """Every parameter away from its init: weights N(0, 0.3^2) (large enough that logits depend strongly on
  every layer), norm gains 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if name.endswith("bias"):
        p.copy_(0.2 * noise)
      elif p.ndim == 1:  # norm gains
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.3 * noise)


def build(out: str) -> None:
  import torch
  import transformers as tf
  torch.manual_seed(0)
  tok_path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
  train_tokenizer(tok_path)
  hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=tok_path, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>")
  text_ids = np.asarray(hf_tok(TEXT, add_special_tokens=False)["input_ids"], np.int32)
  rng = np.random.default_rng(0)
  tokens = np.stack([np.resize(text_ids, SEQ), rng.integers(0, VOCAB, SEQ)]).astype(np.int32)
  from cl_jax.models.hf_families import FAMILIES
  for i, (family, config) in enumerate(family_configs().items()):
    config._attn_implementation = "eager"
    # The class transformers builds is the one the family's entry names in config.json's `architectures`.
    model = getattr(tf, FAMILIES[family].architecture)(config).eval()
    perturb(model, seed=100 + i)
    if config.tie_word_embeddings:
      model.tie_weights()
    directory = os.path.join(out, family)
    shutil.rmtree(directory, ignore_errors=True)
    # llama is saved in shards (each a few KB), the others as one file.
    model.save_pretrained(directory, max_shard_size="20KB" if family == "llama" else "50GB")
    hf_tok.save_pretrained(directory)
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    np.savez(os.path.join(directory, "reference.npz"), tokens=tokens, logits=logits.astype(np.float32),
             text=np.asarray(TEXT), text_ids=text_ids)
    files = sorted(os.listdir(directory))
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    print(f"{family}: {files} ({size / 1024:.0f} KiB); |logits| max {np.abs(logits).max():.2f}")


def check_export(out: str) -> None:
  """cl_jax import -> cl_jax export -> transformers load: logits equal the reference."""
  import torch
  import transformers as tf
  from cl_jax.models import hf_checkpoint
  for family in family_configs():
    ref = np.load(os.path.join(out, family, "reference.npz"))
    loaded = hf_checkpoint.load(os.path.join(out, family))
    with tempfile.TemporaryDirectory() as tmp:
      hf_checkpoint.export(tmp, loaded.hf_config, loaded.params, tokenizer=loaded.tokenizer)
      model = tf.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
      with torch.no_grad():
        logits = model(torch.from_numpy(ref["tokens"]).long()).logits.numpy()
    print(f"{family}: transformers on cl_jax's export, max |logit - reference| = "
          f"{np.abs(logits - ref['logits']).max():.2e}")


# Variants the fixtures do not cover: biases everywhere with a head dim != d_model / heads and linear RoPE scaling
# (llama), a sliding window with Llama-3.1 scaling (mistral), a sliding window (qwen2), exact gelu (gpt2); attention
# biases and every layer sliding (qwen3); exact gelu, no soft-caps, query scale = head dim and the other layer
# global (gemma2); a sliding window (phi3); attention biases (olmo2); a final soft-cap, query scale != head dim and
# one theta for all layers (gemma3_text).
VARIANTS = {
    "llama": dict(mlp="swiglu", qkv_bias=True, o_bias=True, mlp_bias=True, rope_scaling="linear", rope_factor=2.0,
                  attn_head_dim=8),
    "mistral": dict(mlp="swiglu", sliding_window=4, tied_embeddings=False, rope_scaling="llama3", rope_factor=4.0,
                    rope_original_max_len=16, num_kv_heads=2),
    "qwen2": dict(mlp="swiglu", qkv_bias=True, sliding_window=5),
    "gpt2": dict(positions="learned", norm="layernorm", norm_eps=1e-5, qkv_bias=True, o_bias=True, mlp_bias=True,
                 gelu_approximate=False),
    "qwen3": dict(mlp="swiglu", qk_norm="head", qkv_bias=True, o_bias=True, sliding_window=5, attn_head_dim=8),
    "gemma2": dict(mlp="geglu", gelu_approximate=False, block_norms="sandwich", norm_plus_one=True, embed_scale=True,
                   sliding_window=3, global_layers=(0,), tied_embeddings=False),
    "phi3": dict(mlp="swiglu", sliding_window=4, num_kv_heads=2),
    "olmo2": dict(mlp="swiglu", qk_norm="full", block_norms="post", qkv_bias=True, o_bias=True, num_kv_heads=2),
    "gemma3_text": dict(mlp="geglu", block_norms="sandwich", norm_plus_one=True, embed_scale=True, qk_norm="head",
                        sliding_window=3, global_layers=(1,), final_softcap=5.0, attn_scale_dim=6.0),
}


def check_variants() -> None:
  """Models built in cl_jax (random, every param perturbed), exported, run by transformers: same logits."""
  import jax
  import torch
  import transformers as tf
  from cl_jax.models import hf_checkpoint
  from cl_jax.models.transformer import build_lm, model_config
  tokens = np.random.default_rng(0).integers(0, 40, (2, 24))
  for family, fields in VARIANTS.items():
    cfg = model_config("tiny", vocab_size=40, d_model=16, num_heads=4, num_layers=2, max_len=24, init_std=0.3,
                       **fields)
    model, params = build_lm(cfg, seed=1)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), params)
    ours = np.asarray(model.apply(params, tokens))
    with tempfile.TemporaryDirectory() as tmp:
      hf_checkpoint.export(tmp, cfg, params, family=family)
      ref = tf.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
      with torch.no_grad():
        theirs = ref(torch.from_numpy(tokens).long()).logits.numpy()
    print(f"{family} variant {fields}: max |cl_jax - transformers| = {np.abs(ours - theirs).max():.2e} "
          f"(logits up to {np.abs(ours).max():.1f})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "hf"))
  parser.add_argument("--check-export", action="store_true")
  parser.add_argument("--check-variants", action="store_true",
                      help="also compare cl_jax-built variants (VARIANTS) with transformers after export")
  parser.add_argument("--skip-build", action="store_true", help="only check the existing fixtures")
  args = parser.parse_args()
  if not args.skip_build:
    build(args.out)
  if args.check_export:
    check_export(args.out)
  if args.check_variants:
    check_variants()


if __name__ == "__main__":
  main()
