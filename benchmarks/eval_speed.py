"""Benchmark evaluation speed: the cl_jax engine vs the plain forward pass and vs lm-eval's `hf` model.

  nice -n 5 python benchmarks/eval_speed.py                 # writes results/eval_speed.md
  python benchmarks/eval_speed.py --items 32 --repeats 1 --out /tmp/e.md   # quick check

Checkpoint: a random-init Llama built by transformers (`benchmarks.generate_speed.SMALL`, ~50M params, here with
2,048 positions so that 1,024 new tokens fit), saved with `save_pretrained` with the tiny fixture's tokenizer; cl_jax
imports it from that directory, lm-eval's `hf` model (transformers, PyTorch eager, float32) reads the same files.

Measured, each a median over `--repeats` calls after a warm-up, timed round-robin (`interleaved_medians`) so load
from other processes hits all alike:

  multiple choice   `Engine.loglikelihood` of the completion set's requests (`cl_jax.eval.benchmark_sets`, 4 endings
                    per item, `--items` requests), batch `--batch`: items/s and tokens/s (tokens = the unpadded
                    input positions, context + continuation). Against
                    * the plain forward pass: the same jitted `apply(params, tokens)` on one [batch, W] block, W the
                      length bucket the requests fall in (tokens/s = batch x W / time: every position counts), and
                    * lm-eval's `hf` model's `loglikelihood` on the same requests and batch size.
  generation        `Engine.generate_until` of `--gen_items` completion contexts, greedy, `--new` new tokens, stop
                    string "\\n\\n" (the random model never writes it), against the `hf` model's `generate_until`:
                    items/s and new tokens/s (the same texts on both sides).
  per-token cost    `Engine.generate_ids` of one prompt, greedy, eos ignored, 128 and 1,024 new tokens: seconds per
                    new token, and the ratio 1,024 / 128 (the KV cache makes each step O(length) attention, so the
                    cost should stay nearly flat); transformers' `generate` beside it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common import emit, interleaved_medians  # noqa: E402
from benchmarks.generate_speed import FIXTURE, SMALL  # noqa: E402

POSITIONS = 2048


def build(path: str) -> None:
  """The random Llama of generate_speed.py with POSITIONS positions, and the fixture's tokenizer files."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, **{**SMALL, "max_position_embeddings": POSITIONS})
  LlamaForCausalLM(cfg).eval().save_pretrained(path)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURE, f), path)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--items", type=int, default=64, help="multiple-choice requests (4 per completion item)")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--gen_items", type=int, default=8)
  ap.add_argument("--new", type=int, default=64, help="new tokens per generate_until request")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(ROOT, "results", "eval_speed.md"))
  args = ap.parse_args()
  import jax
  import torch
  import transformers
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM
  from cl_jax.eval import benchmark_sets
  from cl_jax.eval.lm_engine import Engine
  from cl_jax.lm import generation

  load0 = os.getloadavg()[0]
  tmp = tempfile.mkdtemp()
  try:
    path = os.path.join(tmp, "small-llama")
    build(path)
    m = generation.load(path)
    engine = Engine.from_model(m, batch_size=args.batch)
    n_params = sum(x.size for x in jax.tree.leaves(m.params))
    hf = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=args.batch)
    bench = benchmark_sets.load("completion", limit=-(-args.items // 4))
    mc = [tuple(r) for r in benchmark_sets.requests(bench)][:args.items]
    mc_inst = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(mc)]

    # --- multiple choice vs the forward pass and the hf model
    pairs = [engine.encode_pair(c, x) for c, x in mc]
    real = sum(len(a) + len(b) - 1 for a, b in pairs)
    width = engine._width(max(len(a) + len(b) - 1 for a, b in pairs))
    block = np.random.default_rng(0).integers(3, 128, size=(args.batch, width)).astype(np.int32)
    forward = jax.jit(engine.apply)

    def ours_mc():
      return engine.loglikelihood(mc)

    def hf_mc():
      return hf.loglikelihood(mc_inst, disable_tqdm=True)

    def plain_forward():
      return forward(m.params, block).block_until_ready()

    ll_ours, ll_hf = ours_mc(), hf_mc()
    agree_mc = float(np.max(np.abs([a[0] - b[0] for a, b in zip(ll_ours, ll_hf)])))
    t_mc = interleaved_medians({"ours": ours_mc, "hf": hf_mc, "forward": plain_forward}, repeats=args.repeats)

    # --- generation
    contexts = [c for c, _ in mc[::4]][:args.gen_items]
    kw = {"until": ["\n\n"], "max_gen_toks": args.new, "do_sample": False}
    gen_inst = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(kw)), idx=i)
                for i, c in enumerate(contexts)]

    def ours_gen():
      return engine.generate_until([(c, dict(kw)) for c in contexts])

    def hf_gen():
      return hf.generate_until(gen_inst, disable_tqdm=True)

    before = engine.stats["generate_until"]["tokens"]
    texts_ours = ours_gen()
    new_tokens = engine.stats["generate_until"]["tokens"] - before
    same_texts = float(np.mean([a == b for a, b in zip(texts_ours, hf_gen())]))
    t_gen = interleaved_medians({"ours": ours_gen, "hf": hf_gen}, repeats=args.repeats)

    # --- per-token cost of cached generation: 128 vs 1024 new tokens
    prompt = engine.tok_encode(contexts[0])[:32]
    hf_model = hf.model
    hf_model.generation_config.eos_token_id = None
    x = torch.tensor([prompt])

    def ours_n(n):
      return lambda: engine.generate_ids([prompt], max_new_tokens=n, ignore_eos=True)

    def hf_n(n):
      def run():
        with torch.no_grad():
          return hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                   pad_token_id=0)
      return run

    t_tok = interleaved_medians({"ours_128": ours_n(128), "ours_1024": ours_n(1024), "hf_128": hf_n(128),
                                 "hf_1024": hf_n(1024)}, repeats=args.repeats)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  load1 = os.getloadavg()[0]

  mc_tps = {k: real / t_mc[k] for k in ("ours", "hf")}
  fwd_tps = args.batch * width / t_mc["forward"]
  cmd = "python benchmarks/eval_speed.py" + "".join(
      f" --{k} {getattr(args, k)}" for k in ("items", "batch", "gen_items", "new", "repeats"))
  per = {k: t_tok[k] / int(k.split("_")[1]) for k in t_tok}
  lines = [
      "# Benchmark evaluation speed: the cl_jax engine vs the forward pass and lm-eval's `hf` model", "",
      f"`nice -n 5 {cmd}`", "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, JAX {jax.__version__} ({jax.default_backend()}), "
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
      f"lm_eval 0.4.13. Load average (1 min) {load0:.1f} before, {load1:.1f} after: the machine is shared by several "
      "engineers and was loaded, so everything was timed round-robin in one run and the ratios are the numbers to "
      "read, not the absolute times.", "",
      f"Model: random-init Llama from transformers, {n_params / 1e6:.1f}M params ({SMALL}, "
      f"{POSITIONS} positions), float32 on CPU, the tiny fixture's tokenizer (128 tokens, nearly one per "
      "character); the same safetensors for both libraries. Medians of "
      f"{args.repeats} calls after a warm-up.", "",
      "## Multiple choice (loglikelihood)", "",
      f"{len(mc)} requests of the completion set ({len(mc) // 4} items x 4 endings), batch {args.batch}, "
      f"{real:,} input tokens in all (unpadded), length bucket {width}. Largest difference between the two "
      f"libraries' log-likelihoods: {agree_mc:.1e}.", "",
      "| | seconds | items/s | tokens/s | vs forward pass |", "|---|---|---|---|---|",
      f"| plain forward pass, one [{args.batch}, {width}] block | {t_mc['forward']:.3f} | - | {fwd_tps:,.0f} | 1.00x |",
      f"| cl_jax `Engine.loglikelihood` | {t_mc['ours']:.3f} | {len(mc) / t_mc['ours']:,.1f} | {mc_tps['ours']:,.0f} | "
      f"**{mc_tps['ours'] / fwd_tps:.2f}x** |",
      f"| lm-eval `hf` model | {t_mc['hf']:.3f} | {len(mc) / t_mc['hf']:,.1f} | {mc_tps['hf']:,.0f} | "
      f"{mc_tps['hf'] / fwd_tps:.2f}x |", "",
      f"cl_jax / hf: **{t_mc['hf'] / t_mc['ours']:.2f}x** the items/s. The forward pass counts every position of its "
      "block; the engine's tokens are the requests' real tokens (their padding to the bucket is its cost). Goal: the "
      f"engine at >= 0.7x the forward pass's tokens/s: {'met' if mc_tps['ours'] / fwd_tps >= 0.7 else 'NOT met'}.",
      "",
      "## Generation (generate_until)", "",
      f"{len(contexts)} contexts, greedy, max_gen_toks {args.new}, batch {args.batch}: {new_tokens} new tokens. "
      f"Texts equal to the hf model's: {same_texts:.0%}.", "",
      "| | seconds | items/s | new tokens/s |", "|---|---|---|---|",
      f"| cl_jax `Engine.generate_until` | {t_gen['ours']:.3f} | {len(contexts) / t_gen['ours']:,.2f} | "
      f"{new_tokens / t_gen['ours']:,.0f} |",
      f"| lm-eval `hf` model | {t_gen['hf']:.3f} | {len(contexts) / t_gen['hf']:,.2f} | "
      f"{new_tokens / t_gen['hf']:,.0f} |", "",
      f"cl_jax / hf: **{t_gen['hf'] / t_gen['ours']:.2f}x** the items/s.", "",
      "## Cached generation: cost per new token, 128 vs 1,024 new tokens", "",
      f"One {len(prompt)}-token prompt, greedy, eos ignored.", "",
      "| | ms / token at 128 | ms / token at 1,024 | ratio 1,024 / 128 |", "|---|---|---|---|",
      f"| cl_jax `Engine.generate_ids` | {1e3 * per['ours_128']:.2f} | {1e3 * per['ours_1024']:.2f} | "
      f"**{per['ours_1024'] / per['ours_128']:.2f}x** |",
      f"| transformers `generate` | {1e3 * per['hf_128']:.2f} | {1e3 * per['hf_1024']:.2f} | "
      f"{per['hf_1024'] / per['hf_128']:.2f}x |", "",
      f"Goal: within 1.3x: {'met' if per['ours_1024'] / per['ours_128'] <= 1.3 else 'NOT met'}.",
  ]
  emit(lines, args.out)


if __name__ == "__main__":
  main()
