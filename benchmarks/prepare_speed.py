"""Where `cl-jax prepare`'s time goes: prepare against its tokenizer's bare encoding, per CPU-second.

  python benchmarks/prepare_speed.py --corpus_mb 20                  # this checkout's prepare
  git archive <commit> cl_jax | tar -x -C /tmp/old && \\
    python benchmarks/prepare_speed.py --corpus_mb 20 --code /tmp/old  # another commit's prepare, same corpus

On a shared machine the wall time of a job says more about the other jobs than about it, so every figure here is
also given per CPU-second of this process (`time.process_time`, which counts the tokenizer's Rust threads too): MB of
input per CPU-second is what one otherwise idle core would do, and it is the figure the issue's goal "MB/s per core"
means. Measured on the same corpus and tokenizer as `data_throughput.py` (CPython text as JSON lines, a 32,000-token
byte-level BPE trained here):

  prepare         `cl_jax.data.prepare.prepare` of the corpus (MB of the .jsonl files)
  encode_batch    `tokenizers.Tokenizer.encode_batch` alone on the same texts, in batches of 512 (MB of UTF-8 text)
  encode_fast     `encode_batch_fast` alone (no character offsets): the ceiling of this tokenizer library
  tiktoken        (when `tiktoken` is importable) the same vocabulary and GPT-2 pattern in tiktoken, one thread,
                  with the count of documents whose ids equal `tokenizers`' ids
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(fn):
  t, c = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t, time.process_time() - c


def _tiktoken_encoding(tok):
  """tiktoken over a byte-level BPE's vocabulary: GPT-2's byte <-> character table read backwards, ranks = ids."""
  import tiktoken
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = 0
  byte_of = {chr(b): b for b in printable}
  for b in range(256):
    if b not in printable:
      byte_of[chr(256 + extra)] = b
      extra += 1
  added = {t.content for t in tok.get_added_tokens_decoder().values()}
  vocab = tok.get_vocab(with_added_tokens=True)
  ranks = {bytes(byte_of[ch] for ch in t): i for t, i in vocab.items() if t not in added}
  pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
  return tiktoken.Encoding("bench", pat_str=pattern, mergeable_ranks=ranks,
                           special_tokens={t: vocab[t] for t in added})


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--corpus_mb", type=float, default=20)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--code", default=None, help="a directory holding another commit's cl_jax/ to time its prepare "
                 "(the script re-runs itself with that directory first on PYTHONPATH)")
  p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
  args = p.parse_args(argv)
  code = os.path.abspath(args.code) if args.code else None
  if code and os.environ.get("CL_JAX_PREPARE_SPEED_CODE") != code:
    # Another commit's cl_jax goes first on the import path of a child process: nothing edits sys.path here.
    env = dict(os.environ, CL_JAX_PREPARE_SPEED_CODE=code,
               PYTHONPATH=os.pathsep.join([code, ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    return subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                          env=env).returncode
  from benchmarks.data_throughput import train_tokenizer, write_corpus
  from cl_jax.data import prepare
  from cl_jax.data.tokenizer import load_tokenizer
  from tokenizers import Tokenizer
  work = args.work or tempfile.mkdtemp(prefix="prepare_speed-")
  corpus = os.path.join(work, "corpus")
  if not os.path.isdir(corpus):
    write_corpus(corpus, args.corpus_mb)
  tok_path = os.path.join(work, "tokenizer.json")
  if not os.path.exists(tok_path):
    train_tokenizer(work, corpus)
  files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
  file_mb = sum(os.path.getsize(f) for f in files) / 1e6
  texts = [json.loads(line)["text"] for f in files for line in open(f)]
  text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
  print(f"{len(texts)} documents, {file_mb:.1f} MB of .jsonl ({text_mb:.1f} MB of text); code: "
        f"{os.path.dirname(os.path.dirname(prepare.__file__))}; load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores", flush=True)

  def report(name, mb, wall, cpu, extra=""):
    print(f"{name:13s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  {mb / wall:5.2f} MB/s  {mb / cpu:5.2f} MB/cpu-s{extra}",
          flush=True)

  out = os.path.join(work, "cache")
  shutil.rmtree(out, ignore_errors=True)
  tok = load_tokenizer(tok_path)
  _, wall, cpu = _timed(lambda: prepare.prepare([f"dir:{corpus}"], tok, out, seq_len=args.seq_len,
                                                tokenizer_spec=tok_path, progress=False))
  report("prepare", file_mb, wall, cpu)
  raw = Tokenizer.from_file(tok_path)
  batches = [texts[i:i + 512] for i in range(0, len(texts), 512)]
  for name, fn in (("encode_batch", raw.encode_batch), ("encode_fast", getattr(raw, "encode_batch_fast", None))):
    if fn is not None:
      ids, wall, cpu = _timed(lambda: [e.ids for b in batches for e in fn(b, add_special_tokens=False)])
      report(name, text_mb, wall, cpu)
  try:
    enc = _tiktoken_encoding(raw)
  except ImportError:
    print("tiktoken   not installed")
  else:
    got, wall, cpu = _timed(lambda: [enc.encode_ordinary(t) for t in texts])
    report("tiktoken", text_mb, wall, cpu, f"  identical ids in {sum(a == b for a, b in zip(got, ids))}/{len(ids)} "
                                           "documents")
  if not args.work:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
