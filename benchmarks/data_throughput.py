"""Tokenize-once corpora (`cl-jax prepare`) against the train step: prepare speed, streaming speed, memory, start-up.

  python benchmarks/data_throughput.py                          # 0.1 GB and 2 GB corpora -> results/data_throughput.md
  python benchmarks/data_throughput.py --small_mb 20 --large_mb 200 --out /tmp/dt.md   # a quick look

1. Corpora: JSON-lines files of real text -- CPython's standard-library source and docstrings (the project's own
   corpora, `cl_jax.data.text`), each document made unique by a numbered first line so that exact dedup keeps all
   of them -- of `--small_mb` and `--large_mb` megabytes.
2. Tokenizer: a byte-level BPE with a 32,000-token vocabulary trained here (`tokenizers`) on a few MB of the same
   text, saved as a `tokenizer.json` -- the kind of fast tokenizer a Hugging Face checkpoint ships.
3. Prepare throughput: `cl_jax.data.prepare.prepare` of each corpus (MB of text per second, and per core: the
   `tokenizers` library spreads each batch over all cores).
4. Streaming throughput: the LM run's batch path (`MixtureSampler` over the cache's rows, `lm.data.sampler_batch`:
   this process's rows, read on demand from the shards) in tokens/s, against the jitted train step's tokens/s of the
   125M preset (AdamW, float32) at the same sequence length, timed in this process (median of repeats).
5. Whole runs in fresh processes: continued pre-training of a checkpoint in the Hugging Face layout (a Llama saved by
   `transformers`, `--model_shape`, with the trained tokenizer as its `tokenizer.json`) through `configs/cpt_hf.py`,
   the domain source a prepared cache (small or large) and the general source the small cache, `--steps`
   adaptation steps with an evaluation and a checkpoint every `--steps // 2`: peak RSS of the process and
   launch-to-exit wall time, on the small and the large cache, run alternately twice.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(path: str, megabytes: float) -> float:
  """JSON-lines of unique real-text documents totalling about `megabytes` MB; returns the MB written."""
  from cl_jax.data import text
  docs = [d.text for d in text.code_documents()] + [d.text for d in text.general_documents()]
  os.makedirs(path, exist_ok=True)
  target, written, k, part = megabytes * 1e6, 0, 0, 0
  while written < target:
    with open(os.path.join(path, f"part-{part:04d}.jsonl"), "w") as f:
      for d in docs:
        line = json.dumps({"text": f"# variant {k}\n{d}"}) + "\n"
        f.write(line)
        written += len(line)
        k += 1
        if written >= target:
          break
    part += 1
  return written / 1e6


def train_tokenizer(path: str, sample_dir: str, vocab: int = 32000) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  files = sorted(os.path.join(sample_dir, f) for f in os.listdir(sample_dir))[:1]
  texts = (json.loads(line)["text"] for f in files for line in open(f))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                     # all 256 byte symbols, as GPT-2 / Llama 3 / SmolLM have
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
  out = os.path.join(path, "tokenizer.json")
  tok.save(out)
  return out


MODEL_SHAPES = {  # Llama shapes saved by transformers (tied embeddings, 32k vocabulary of the trained tokenizer)
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "smollm135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3),
}


def make_model(path: str, tokenizer_json: str, shape: str) -> str:
  """A Llama checkpoint directory in the Hugging Face layout, written by `transformers` (random init, seed 0:
  the weights' values do not move memory or start-up), its tokenizer the one the caches were prepared with."""
  import torch
  import transformers as tf
  if not os.path.exists(os.path.join(path, "config.json")):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=0, **MODEL_SHAPES[shape])
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
  shutil.copy(tokenizer_json, os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return path


def _params(model: str) -> int:
  """Parameter count from the checkpoint's safetensors header (no weights read)."""
  with open(os.path.join(model, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  return sum(int(__import__("math").prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


def streaming_tokens_per_s(cache: str, tokenizer, batch: int, steps: int) -> float:
  from cl_jax.data import mixture as mx
  from cl_jax.data import prepare
  from cl_jax.lm.data import sampler_batch
  m = prepare.open_prepared(cache, tokenizer)
  rows = prepare.cached_split(m, "train").tokens
  sampler = mx.MixtureSampler(mx.constant({"domain": 1.0}), {"domain": len(rows)}, batch, seed=0)
  sampler_batch(sampler, 0, {"domain": rows}, 1)
  times = []
  for s in range(1, steps + 1):
    t = time.perf_counter()
    sampler_batch(sampler, s, {"domain": rows}, 1)
    times.append(time.perf_counter() - t)
  return batch * m.seq_len / statistics.median(times)


def step_tokens_per_s(seq_len: int, batch: int, repeats: int) -> float:
  import jax
  from benchmarks.lm_throughput import make_train
  from cl_jax.models.transformer import model_config
  cfg = model_config("125m", vocab_size=32000, max_len=seq_len)
  call, _, _, tokens = make_train(cfg, batch, seq_len)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return tokens / statistics.median(times)


CHILD = r"""
import json, sys, time
t0 = float(sys.argv[1])
import cl_jax
from configs import cpt_hf
model, seq_len, general, domain, workdir, steps = sys.argv[2:8]
steps = int(steps)
c = cpt_hf.get_config(f"path={model},domain=cache:{domain},general=cache:{general},steps={steps},seq_len={seq_len}")
c.text.validation = c.text.test = 0.05  # the split the caches were prepared with (prepare's default)
c.text.eval_sequences, c.text.general_eval_sequences, c.text.cloze_items = 64, 64, 32
c.adapt.batch_size = c.regression.eval_batch_size = 8
c.regression.eval_every = max(steps // 2, 1)
first = {}
def watch():  # the first training record in metrics.jsonl: launch to first step
  import os, threading
  path = os.path.join(workdir, "metrics.jsonl")
  while not first:
    if os.path.exists(path) and '"type": "train"' in open(path).read():
      first["s"] = time.time() - t0
    time.sleep(0.05)
import threading
threading.Thread(target=watch, daemon=True).start()
cl_jax.run(c, workdir, progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss_mb": hwm / 1024, "wall": time.time() - t0, "first_step": first.get("s", float("nan"))}))
"""


def run_child(model: str, seq_len: int, general: str, domain: str, workdir: str, steps: int) -> dict:
  t0 = time.time()
  out = subprocess.run([sys.executable, "-c", CHILD, str(t0), model, str(seq_len), general, domain, workdir,
                        str(steps)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise RuntimeError(f"exit {out.returncode}: {out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--small_mb", type=float, default=100)
  p.add_argument("--large_mb", type=float, default=2000)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--model_shape", default="small", choices=sorted(MODEL_SHAPES),
                 help="the Llama the runs continue (written by transformers into the work directory)")
  p.add_argument("--steps", type=int, default=4, help="adaptation steps per run (evaluation + checkpoint at half)")
  p.add_argument("--work", default=None, help="scratch directory (default: a temporary one); corpora, tokenizer and "
                 "finished caches already in it are reused, with the prepare timings recorded beside them")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "data_throughput.md"))
  args = p.parse_args(argv)
  from cl_jax.data import prepare
  from cl_jax.data.tokenizer import load_tokenizer
  work = args.work or tempfile.mkdtemp(prefix="data_throughput-")
  cores = os.cpu_count()
  rows, sizes = {}, {}
  for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
    t = time.perf_counter()
    done = os.path.join(work, f"corpus-{name}.json")
    if os.path.exists(done) and json.load(open(done))["target_mb"] == mb:
      sizes[name] = json.load(open(done))["mb"]
    else:
      shutil.rmtree(os.path.join(work, f"corpus-{name}"), ignore_errors=True)
      sizes[name] = write_corpus(os.path.join(work, f"corpus-{name}"), mb)
      json.dump({"target_mb": mb, "mb": sizes[name]}, open(done, "w"))
    print(f"{name} corpus: {sizes[name]:.0f} MB ready in {time.perf_counter() - t:.0f} s", flush=True)
  tok_path = os.path.join(work, "tokenizer.json")
  if not os.path.exists(tok_path):
    tok_path = train_tokenizer(work, os.path.join(work, "corpus-small"))
  tok = load_tokenizer(tok_path)
  model = make_model(os.path.join(work, f"model-{args.model_shape}"), tok_path, args.model_shape)
  for name in ("small", "large"):
    out, timing = os.path.join(work, f"cache-{name}"), os.path.join(work, f"cache-{name}.timing.json")
    if os.path.exists(timing):  # a finished prepare of this corpus: its own timing, measured when it ran
      m, (secs, cpu) = prepare.open_prepared(out, tok), json.load(open(timing))
    else:
      t, c = time.perf_counter(), time.process_time()
      m = prepare.prepare([f"dir:{os.path.join(work, f'corpus-{name}')}"], tok, out, seq_len=args.seq_len,
                          tokenizer_spec=tok_path)
      secs, cpu = time.perf_counter() - t, time.process_time() - c
      json.dump([secs, cpu], open(timing, "w"))
    tokens = sum(s["tokens"] for s in m.data["splits"].values())
    disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e6
    rows[name] = {"mb": sizes[name], "prepare_s": secs, "mb_per_s": sizes[name] / secs,
                  "mb_per_cpu_s": sizes[name] / cpu, "tokens": tokens, "disk_mb": disk}
    print(f"prepare {name}: {sizes[name] / secs:.2f} MB/s ({sizes[name] / secs / cores:.2f} per core), "
          f"{tokens / 1e6:.1f} M tokens, {disk:.0f} MB on disk", flush=True)
  stream = streaming_tokens_per_s(os.path.join(work, "cache-large"), tok, args.batch, 50)
  step = step_tokens_per_s(args.seq_len, 4, args.repeats) if args.repeats else float("nan")
  print(f"streaming {stream:,.0f} tokens/s; 125M train step {step:,.0f} tokens/s; ratio {stream / step:,.0f}x",
        flush=True)
  runs = {"small": [], "large": []}
  for r in range(2):
    for name in ("small", "large"):
      shutil.rmtree(os.path.join(work, f"run-{name}-{r}"), ignore_errors=True)
      res = run_child(model, args.seq_len, os.path.join(work, "cache-small"), os.path.join(work, f"cache-{name}"),
                      os.path.join(work, f"run-{name}-{r}"), args.steps)
      runs[name].append(res)
      print(f"run on {name}: peak RSS {res['rss_mb']:.0f} MB, launch to first step {res['first_step']:.1f} s, "
            f"to exit {res['wall']:.1f} s", flush=True)
  rss = {n: max(x["rss_mb"] for x in v) for n, v in runs.items()}
  wall = {n: statistics.median(x["wall"] for x in v) for n, v in runs.items()}
  first = {n: statistics.median(x["first_step"] for x in v) for n, v in runs.items()}
  self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  lines = [
      "# Tokenize-once corpora: prepare, stream, run",
      "",
      f"`python benchmarks/data_throughput.py --small_mb {args.small_mb:g} --large_mb {args.large_mb:g} "
      f"--seq_len {args.seq_len}` on this machine ({cores} cores; {time.strftime('%Y-%m-%d')}). Real text (CPython "
      "source and docstrings, each document unique), a 32,000-token byte-level BPE (`tokenizers`), "
      f"`seq_len` {args.seq_len}. Timings are medians; compare ratios, not absolute times (a shared machine).",
      "",
      "| corpus | text MB | prepare MB/s | MB/s per core | MB per CPU-second | tokens (M) | cache on disk MB |",
      "|---|---:|---:|---:|---:|---:|---:|",
      *[f"| {n} | {r['mb']:.0f} | {r['mb_per_s']:.2f} | {r['mb_per_s'] / cores:.2f} | {r['mb_per_cpu_s']:.2f} | "
        f"{r['tokens'] / 1e6:.1f} | {r['disk_mb']:.0f} |" for n, r in rows.items()],
      "",
      f"Streaming (the run's batch path over the large cache, batch {args.batch} x {args.seq_len}): "
      f"**{stream:,.0f} tokens/s**, against the 125M preset's jitted train step at {step:,.0f} tokens/s: "
      f"**{stream / step:,.0f}x** what the step consumes (goal >= 20x).",
      "",
      f"Runs: `configs/cpt_hf.py` continuing a Llama checkpoint in the Hugging Face layout ({args.model_shape}: "
      f"{_params(model) / 1e6:.1f} M parameters, written by transformers), domain source `cache:` the corpus's "
      f"cache, general source the small cache, {args.steps} adaptation steps of 8 x {args.seq_len} tokens, "
      f"evaluation and checkpoint every {max(args.steps // 2, 1)}; two runs of each, alternating.",
      "",
      "| run (domain: this cache) | peak RSS MB (max) | launch to first step s (median) | launch to exit s (median) |",
      "|---|---:|---:|---:|",
      *[f"| {n} ({rows[n]['mb']:.0f} MB of text) | {rss[n]:.0f} | {first[n]:.1f} | {wall[n]:.1f} |"
        for n in ("small", "large")],
      "",
      f"Peak RSS large / small: **{rss['large'] / rss['small']:.2f}x** (goal <= 1.2x); launch to first step large / "
      f"small: **{first['large'] / first['small']:.2f}x** (goal <= 1.5x; to exit: {wall['large'] / wall['small']:.2f}x)."
      " This benchmark process peaked at "
      f"{self_rss:.0f} MB (prepare of both corpora included).",
  ]
  from benchmarks.common import emit
  emit(lines, args.out)


if __name__ == "__main__":
  main()
