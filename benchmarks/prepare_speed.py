"""Where `cl-jax prepare`'s time goes: prepare against its tokenizer's bare encoding, per CPU-second.

  python benchmarks/prepare_speed.py --corpus_mb 20                  # this checkout's prepare
  git archive <commit> cl_jax | tar -x -C /tmp/old && \\
    python benchmarks/prepare_speed.py --corpus_mb 20 --code /tmp/old  # another commit's prepare, same corpus

On a shared machine the wall time of a job says more about the other jobs than about it, so every figure here is
also given per CPU-second of this process (`time.process_time`, which counts the tokenizer's Rust threads too): MB of
input per CPU-second is what one otherwise idle core would do, and it is the figure the issue's goal "MB/s per core"
means. Measured on the same corpus and tokenizer as `data_throughput.py` (CPython text as JSON lines, a 32,000-token
byte-level BPE trained here):

  prepare/B       `cl_jax.data.prepare.prepare` of the corpus (MB of the .jsonl files) with tokenizer_backend B
                  (tokenizers, then tiktoken, whose shards must equal the first's byte for byte)
  encode_batch    `tokenizers.Tokenizer.encode_batch` alone on the same texts, in batches of 512 (MB of UTF-8 text)
  encode_fast     `encode_batch_fast` alone (no character offsets): the ceiling of this tokenizer library
  tiktoken        `cl_jax.data.tokenizer.tiktoken_encoder` alone, one thread, with the count of documents whose
                  ids equal `tokenizers`' ids
"""
from __future__ import annotations

import argparse
import inspect
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


def _same_files(a: str, b: str) -> bool:
  """Two cache directories hold the same shards and indexes, byte for byte (the manifests name their encoder)."""
  names = sorted(n for n in os.listdir(a) if n != "manifest.json")
  return names == sorted(n for n in os.listdir(b) if n != "manifest.json") and all(
    open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


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

  tok = load_tokenizer(tok_path)
  outs = []
  for backend in ("tokenizers", "tiktoken") if "tokenizer_backend" in inspect.signature(prepare.prepare).parameters \
      else (None,):
    out = os.path.join(work, f"cache-{backend or 'default'}")
    shutil.rmtree(out, ignore_errors=True)
    kw = {"tokenizer_backend": backend} if backend else {}
    _, wall, cpu = _timed(lambda: prepare.prepare([f"dir:{corpus}"], tok, out, seq_len=args.seq_len,
                                                  tokenizer_spec=tok_path, progress=False, **kw))
    outs.append(out)
    report(f"prepare{'/' + backend if backend else ''}", file_mb, wall, cpu,
           f"  shards identical to prepare/tokenizers: {_same_files(outs[0], out)}" if len(outs) > 1 else "")
  raw = Tokenizer.from_file(tok_path)
  batches = [texts[i:i + 512] for i in range(0, len(texts), 512)]
  for name, fn in (("encode_batch", raw.encode_batch), ("encode_fast", getattr(raw, "encode_batch_fast", None))):
    if fn is not None:
      ids, wall, cpu = _timed(lambda: [e.ids for b in batches for e in fn(b, add_special_tokens=False)])
      report(name, text_mb, wall, cpu)
  try:
    from cl_jax.data.tokenizer import tiktoken_encoder
    enc = tiktoken_encoder(tok, threads=1)
  except ImportError:
    print("tiktoken   not installed (or this commit has no fast path)")
  else:
    got, wall, cpu = _timed(lambda: [enc.encode(t).tolist() for t in texts])
    report("tiktoken", text_mb, wall, cpu, f"  identical ids in {sum(a == b for a, b in zip(got, ids))}/{len(ids)} "
                                           "documents")
  if not args.work:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
