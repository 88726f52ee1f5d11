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
5. Whole runs in fresh processes (`cl_jax.run` of `configs/cpt_lm.py` with both `text.general` and `text.domain` on a
   cache, a small model, 2 + 2 steps): peak RSS of the process and launch-to-exit wall time, on the small and the
   large cache, run alternately twice.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
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
                                                     show_progress=False))
  out = os.path.join(path, "tokenizer.json")
  tok.save(out)
  return out


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
from configs import cpt_lm
c = cpt_lm.get_config()
c.lm.tokenizer = sys.argv[2]
c.lm.seq_len = int(sys.argv[3])
c.lm.d_model, c.lm.num_layers, c.lm.num_heads = 64, 2, 2
c.text.general, c.text.domain = "cache:" + sys.argv[4], "cache:" + sys.argv[5]
c.text.eval_sequences, c.text.general_eval_sequences, c.text.cloze_items = 64, 64, 32
c.text.validation = c.text.test = 0.05  # the split the caches were prepared with (prepare's default)
c.pretrain.steps, c.adapt.steps, c.regression.eval_every = 2, 2, 2
c.pretrain.batch_size = c.adapt.batch_size = c.regression.eval_batch_size = 8  # logits: 8 x seq_len x 32k
cl_jax.run(c, sys.argv[6], progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss_mb": hwm / 1024, "wall": time.time() - t0}))
"""


def run_child(tokenizer: str, seq_len: int, general: str, domain: str, workdir: str) -> dict:
  t0 = time.time()
  out = subprocess.run([sys.executable, "-c", CHILD, str(t0), tokenizer, str(seq_len), general, domain, workdir],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
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
  p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "data_throughput.md"))
  args = p.parse_args(argv)
  from cl_jax.data import prepare
  from cl_jax.data.tokenizer import load_tokenizer
  work = args.work or tempfile.mkdtemp(prefix="data_throughput-")
  cores = os.cpu_count()
  rows, sizes = {}, {}
  for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
    t = time.perf_counter()
    sizes[name] = write_corpus(os.path.join(work, f"corpus-{name}"), mb)
    print(f"{name} corpus: {sizes[name]:.0f} MB written in {time.perf_counter() - t:.0f} s", flush=True)
  tok_path = train_tokenizer(work, os.path.join(work, "corpus-small"))
  tok = load_tokenizer(tok_path)
  for name in ("small", "large"):
    out = os.path.join(work, f"cache-{name}")
    t = time.perf_counter()
    m = prepare.prepare([f"dir:{os.path.join(work, f'corpus-{name}')}"], tok, out, seq_len=args.seq_len,
                        tokenizer_spec=tok_path)
    secs = time.perf_counter() - t
    tokens = sum(s["tokens"] for s in m.data["splits"].values())
    disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e6
    rows[name] = {"mb": sizes[name], "prepare_s": secs, "mb_per_s": sizes[name] / secs,
                  "tokens": tokens, "disk_mb": disk}
    print(f"prepare {name}: {sizes[name] / secs:.2f} MB/s ({sizes[name] / secs / cores:.2f} per core), "
          f"{tokens / 1e6:.1f} M tokens, {disk:.0f} MB on disk", flush=True)
  stream = streaming_tokens_per_s(os.path.join(work, "cache-large"), tok, args.batch, 50)
  step = step_tokens_per_s(args.seq_len, 4, args.repeats) if args.repeats else float("nan")
  print(f"streaming {stream:,.0f} tokens/s; 125M train step {step:,.0f} tokens/s; ratio {stream / step:,.0f}x",
        flush=True)
  runs = {"small": [], "large": []}
  for r in range(2):
    for name in ("small", "large"):
      res = run_child(tok_path, args.seq_len, os.path.join(work, "cache-small"),
                      os.path.join(work, f"cache-{name}"), os.path.join(work, f"run-{name}-{r}"))
      runs[name].append(res)
      print(f"run on {name}: peak RSS {res['rss_mb']:.0f} MB, launch to exit {res['wall']:.1f} s", flush=True)
  rss = {n: max(x["rss_mb"] for x in v) for n, v in runs.items()}
  wall = {n: statistics.median(x["wall"] for x in v) for n, v in runs.items()}
  self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  lines = [
      "# Tokenize-once corpora: prepare, stream, run",
      "",
      f"`python benchmarks/data_throughput.py --small_mb {args.small_mb:g} --large_mb {args.large_mb:g} "
      f"--seq_len {args.seq_len}` on this machine ({cores} cores; {time.strftime('%Y-%m-%d')}). Real text (CPython "
      "source and docstrings, each document unique), a 32,000-token byte-level BPE (`tokenizers`), "
      f"`seq_len` {args.seq_len}. Timings are medians; compare ratios, not absolute times (a shared machine).",
      "",
      "| corpus | text MB | prepare MB/s | MB/s per core | tokens (M) | cache on disk MB |",
      "|---|---:|---:|---:|---:|---:|",
      *[f"| {n} | {r['mb']:.0f} | {r['mb_per_s']:.2f} | {r['mb_per_s'] / cores:.2f} | {r['tokens'] / 1e6:.1f} | "
        f"{r['disk_mb']:.0f} |" for n, r in rows.items()],
      "",
      f"Streaming (the run's batch path over the large cache, batch {args.batch} x {args.seq_len}): "
      f"**{stream:,.0f} tokens/s**, against the 125M preset's jitted train step at {step:,.0f} tokens/s: "
      f"**{stream / step:,.0f}x** what the step consumes (goal >= 20x).",
      "",
      "| run (general: small cache; domain: this cache) | peak RSS MB | launch to exit s (2+2 steps, median) |",
      "|---|---:|---:|",
      *[f"| {n} ({rows[n]['mb']:.0f} MB of text) | {rss[n]:.0f} | {wall[n]:.1f} |" for n in ("small", "large")],
      "",
      f"Peak RSS large / small: **{rss['large'] / rss['small']:.2f}x** (goal <= 1.2x); start-up large / small: "
      f"**{wall['large'] / wall['small']:.2f}x** (goal <= 1.5x). This benchmark process peaked at "
      f"{self_rss:.0f} MB (prepare of both corpora included).",
  ]
  from benchmarks.common import emit
  emit(lines, args.out)


if __name__ == "__main__":
  main()
