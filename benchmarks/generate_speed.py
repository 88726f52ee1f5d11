"""cl_jax generation against transformers' `generate` on the same checkpoints, on this CPU.

  python benchmarks/generate_speed.py                  # writes results/generate_speed.md
  python benchmarks/generate_speed.py --repeats 3 --new 32 --out /tmp/g.md   # quick check

Checkpoints: the tiny llama fixture (tests/fixtures/hf/llama) and a random-init Llama built by transformers
(`LlamaConfig` below, ~50M params, saved with `save_pretrained` and imported by cl_jax from that directory): both
sides read the same safetensors. Work: greedy decoding of random prompt ids (the same for both), `--new` new
tokens, end-of-sequence ignored (transformers: no eos_token_id in its generation config; cl_jax: ignore_eos) so
both produce every token by the same greedy rule.

Measured per (model, batch): time to first token = wall time of a call with max_new_tokens=1 (prefill + one
token); tokens/s = batch * new / wall time of a full call. cl_jax is `cl_jax.lm.generation.generate_ids` (prompts
left-padded to their bucket, jitted prefill + while_loop), transformers is `model.generate` (PyTorch eager, its
KV cache, float32, torch's default threads). Each figure is a median over `--repeats` calls after a warm-up,
the two libraries timed round-robin (`benchmarks.common.interleaved_medians`) so load from other processes hits
both alike; the ratio cl_jax / transformers is the number to read. Greedy ids are compared too.

Compilation (cl_jax only): the first call of a new bucket compiles; a later prompt of another length in the same
bucket does not. For contrast, `cl_jax.models.sampling.generate` (the token-id sampler, no buckets) compiles for
every new prompt length: the wall time of one such call at a new length is reported beside a bucketed call at a new
length.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common import interleaved_medians  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)


def build_small(path: str) -> None:
  """A random-init Llama from transformers, saved with the fixture's tokenizer files (ids are what we feed)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, **SMALL)
  LlamaForCausalLM(cfg).eval().save_pretrained(path)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURE, f), path)


def bench(path: str, label: str, batches, prompt_len: int, new: int, repeats: int) -> list[dict]:
  import jax
  import torch
  from transformers import AutoModelForCausalLM
  from cl_jax.lm import generation
  from cl_jax.models import sampling
  hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  # No end-of-sequence at all (not min_new_tokens, which would also forbid eos and so change the greedy argmax):
  # both sides then decode exactly `new` tokens by the same rule.
  hf.generation_config.eos_token_id = None
  m = generation.load(path)
  params = sum(x.size for x in jax.tree.leaves(m.params))
  vocab = min(128, hf.config.vocab_size)  # ids every tokenizer here knows; the model's vocab may be larger
  rows = []
  for batch in batches:
    prompts = np.random.default_rng(batch).integers(3, vocab, size=(batch, prompt_len)).astype(np.int32)
    x = torch.tensor(prompts, dtype=torch.long)

    def ours(n):
      return generation.generate_ids(m, list(prompts), max_new_tokens=n, batch_size=batch, ignore_eos=True)

    def theirs(n):
      with torch.no_grad():
        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)

    c0 = sampling.compilations()
    t = time.perf_counter()
    ids_ours = np.stack([o.ids for o in ours(new)])
    first_call = time.perf_counter() - t
    ours(1)
    compiled = sampling.compilations() - c0
    ids_theirs = theirs(new)[:, prompt_len:].numpy()
    agree = float(np.mean(ids_ours == ids_theirs))
    times = interleaved_medians({"ttft_ours": lambda: ours(1), "ttft_theirs": lambda: theirs(1),
                                 "full_ours": lambda: ours(new), "full_theirs": lambda: theirs(new)},
                                repeats=repeats, warmup=1)
    rows.append(dict(model=label, params=params, batch=batch, prompt=prompt_len, new=new, agree=agree,
                     first_call=first_call, compiled=compiled, **times))
    print(rows[-1], flush=True)
  return rows


def recompile_contrast(path: str, new: int) -> dict:
  """Wall time of one call at a prompt length never seen before: the token-id sampler vs the bucketed generator."""
  import jax
  from cl_jax.lm import generation
  from cl_jax.models import sampling
  m = generation.load(path)
  rng = np.random.default_rng(7)
  out = {}
  for length in (19, 21):  # two new lengths, both in the 32 bucket; the first warms the bucket
    p = rng.integers(3, 128, size=(1, length)).astype(np.int32)
    t = time.perf_counter()
    np.asarray(sampling.generate(m.model, m.params, p, jax.random.PRNGKey(0), max_new_tokens=new, temperature=0.0))
    out[f"sampler_{length}"] = time.perf_counter() - t
    t = time.perf_counter()
    generation.generate_ids(m, list(p), max_new_tokens=new, batch_size=1, ignore_eos=True)
    out[f"bucketed_{length}"] = time.perf_counter() - t
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--prompt", type=int, default=24)
  ap.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
  ap.add_argument("--out", default=os.path.join(ROOT, "results", "generate_speed.md"))
  args = ap.parse_args()
  import jax
  import torch
  import transformers
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  load0 = os.getloadavg()[0]
  tmp = tempfile.mkdtemp()
  try:
    small = os.path.join(tmp, "small-llama")
    build_small(small)
    rows = bench(FIXTURE, "llama fixture", (1, 4), args.prompt, args.new, args.repeats)
    rows += bench(small, "random Llama (transformers init)", (1, 4), args.prompt, args.new, args.repeats)
    contrast = recompile_contrast(small, 30)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  load1 = os.getloadavg()[0]
  cmd = "python benchmarks/generate_speed.py" + "".join(
      f" --{k} {v}" for k, v in (("repeats", args.repeats), ("new", args.new), ("prompt", args.prompt))) + (
      f" --torch_threads {args.torch_threads}" if args.torch_threads else "")
  lines = [
      "# Generation speed: cl_jax vs transformers `generate`", "",
      f"`{cmd}`", "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, JAX {jax.__version__} ({jax.default_backend()}), "
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}. "
      f"Load average (1 min) {load0:.1f} before, {load1:.1f} after: the machine is shared, so the two libraries "
      "were timed round-robin and the ratios are the numbers to read, not the absolute times.", "",
      f"Greedy decoding of random prompt ids ({args.prompt} tokens, the same for both), {args.new} new tokens, "
      "end-of-sequence ignored; float32 on CPU. Both load the same safetensors directory. "
      f"Random Llama: {SMALL}.", "",
      "Time to first token (TTFT) = a call with max_new_tokens=1; tokens/s = batch x new tokens / a full call; "
      f"medians of {args.repeats} calls after a warm-up. Ratios are cl_jax / transformers for tokens/s (> 1: cl_jax "
      "faster) and transformers / cl_jax for TTFT (> 1: cl_jax faster). `same ids` = the fraction of greedy tokens "
      "equal to transformers'. `first call` = the first full call of that batch size, compilation included; "
      "`programs compiled` = for that batch size, one for the full calls and one for the TTFT calls (another "
      "max_new_tokens), then none: every timed call reused them.", "",
      "| model | params | batch | cl_jax tok/s | transformers tok/s | **tok/s ratio** | cl_jax TTFT ms | "
      "transformers TTFT ms | **TTFT ratio** | same ids | cl_jax first call s | cl_jax programs compiled |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    tps_o = r["batch"] * r["new"] / r["full_ours"]
    tps_t = r["batch"] * r["new"] / r["full_theirs"]
    lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {tps_o:,.0f} | {tps_t:,.0f} | "
                 f"**{tps_o / tps_t:.2f}x** | {1e3 * r['ttft_ours']:.1f} | {1e3 * r['ttft_theirs']:.1f} | "
                 f"**{r['ttft_theirs'] / r['ttft_ours']:.2f}x** | {r['agree']:.3f} | {r['first_call']:.1f} | "
                 f"{r['compiled']} |")
  ratios = [r["batch"] * r["new"] / r["full_ours"] / (r["batch"] * r["new"] / r["full_theirs"]) for r in rows]
  from cl_jax.lm.generation import bucket_of
  bucket = bucket_of(args.prompt)
  lines += ["", f"Median tokens/s ratio over the rows: {statistics.median(ratios):.2f}x.", "",
            f"cl_jax left-pads the {args.prompt}-token prompts to their {bucket}-token bucket, so its prefill covers "
            f"{bucket / args.prompt:.2f}x the positions transformers' does; the TTFT columns include that. torch ran "
            f"with {torch.get_num_threads()} thread(s) (`--torch_threads`; 0 keeps torch's default).", "",
            "## Compilation per prompt length", "",
            "One call of 30 new tokens on the random Llama at a prompt length not seen before (wall seconds; the "
            "first length also compiles the bucketed program of the 32 bucket, the second reuses it):", "",
            "| prompt length | `sampling.generate` (compiles per length) | `generation.generate_ids` (bucket 32) |",
            "|---|---|---|"]
  for length in (19, 21):
    lines.append(f"| {length} | {contrast[f'sampler_{length}']:.2f} | {contrast[f'bucketed_{length}']:.2f} |")
  lines.append("")
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
