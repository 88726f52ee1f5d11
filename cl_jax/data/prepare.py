"""Tokenize a corpus once into a cache of shards; read it back lazily (`cache:<dir>` sources of LM runs).

    cl-jax prepare dir:~/corpora/code files:'notes/**/*.md' --tokenizer hf:~/models/SmolLM2-135M \\
        --seq_len 2048 --out caches/code

A *prepared cache* is a directory:

  manifest.json                      written last: its presence means the cache is complete (see `Manifest`)
  <split>-00000.array_record, ...    packed sequences, one record each, `shard_sequences` records per shard
  <split>.doc_index.npy              int32 [N]: the split-local document each sequence starts in (curricula)

Record layout: `[2, seq_len]` little-endian integers -- uint16 when the vocabulary and `seq_len` fit in 16 bits
(most tokenizers up to 65,536 ids: half the disk and read bandwidth), else int32 (the manifest's `record.dtype`) -- row 0 the tokens, row 1 the segment ids (1, 2, ... for the
documents the sequence holds, in order; a document continued from the previous sequence is segment 1). Documents
are packed GPT-style (Radford et al. 2019) exactly as `cl_jax.data.text.pack` packs them in memory -- each followed
by `eos`, the stream cut into `seq_len` windows -- so a run on the cache trains on the sequences a run on the raw
text would; the segment ids let an attention mask keep documents apart where a model wants that (Krell et al. 2021,
"Efficient sequence packing without cross-contamination").

Why ArrayRecord: grain reads it natively (`grain.sources.ArrayRecordDataSource`) with random access by record
index, which is what the mixture sampler needs (it draws example indices from a step number, so a resumed run
re-derives its position from the step and no iterator state has to be saved), and each host reads only the
records of its own rows.

The pipeline streams: documents are read one source file at a time, deduplicated exactly (whitespace-normalised,
128-bit blake2b; only the hashes are kept), assigned to train / validation / test by the hash of their group as in
`text.split_documents`, tokenized in batches of `batch_documents` and written as soon as a shard is full. Memory
is two tokenization batches plus one shard per split, whatever the corpus size. The same inputs give the same bytes:
nothing depends on time, host or thread timing.

Where the time goes (`results/data_throughput.md`, a 32k byte-level BPE from `tokenizers` on CPython text): the BPE
encoding itself, about 90% of the CPU time before this layout; reading JSON, dedup hashing, packing and ArrayRecord
writing share the rest. So (1) a batch is encoded with `encode_batch_fast` where `tokenizers` has it (the same ids
without each token's character offsets, about 20% of `encode_batch`'s CPU time), inside Rust threads over
every core with the GIL released; (2) that runs in a worker thread while this one reads, hashes and splits the next
batch and packs and writes the previous one, so the Python work overlaps the encoding instead of leaving the cores
idle. Processes instead of threads would not help: the encoding is already parallel, and per CPU-second prepare now
runs as fast as `encode_batch_fast` alone on the same text (within the noise of a loaded machine), the ceiling of
this tokenizer library. Past it, tiktoken's BPE loaded with the same vocabulary encoded the benchmark text about 5x
faster per CPU-second with identical ids, but it is not used: its rank-ordered merging equals `tokenizers`' merge-list BPE only for some vocabularies,
and it treats added tokens inside the text differently, so the bytes could change for other tokenizers.

An interrupted prepare resumes: after each shard the consumed document count and the partly filled shards are saved atomically
(`.progress/`); a rerun re-reads (but does not tokenize) the consumed documents to restore the dedup set, then goes
on. A shard takes whole `seq_len` windows from the head of its split's stream and the rest waits for the next, so
the shards of a split, read in order, are exactly `text.pack` of the split's documents (the tail shorter than
`seq_len` dropped), the same sequences a run reading the raw text builds in memory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from cl_jax.data import text as textdata
from cl_jax.errors import ConfigError

FORMAT = "cl_jax.prepared/1"
MANIFEST = "manifest.json"
_PROBE = ("The quick brown fox jumps over the lazy dog. def f(x):\n    return x ** 2  # 0123456789\n"
          "Ünïcödé, 日本語, emoji 🙂, tabs\tand  spaces.\n")


# ----------------------------------------------------------------------------- documents, streamed

def iter_documents(spec: str, *, field: str = "text", warn: Callable[[str], None] = print
                   ) -> Iterator[textdata.Document]:
  """The documents of one source spec, one file at a time. Specs: the built-in `general` / `code`,
  `files:<glob>`, `dir:<directory>` (text and code files whole; .jsonl / .jsonl.gz / .jsonl.zst lines and
  .parquet rows by their `field`), `hf:<directory>` (a `datasets` dataset saved with `save_to_disk`, column
  `field`) and `tfds:<name>[:<split>[:<feature>]]`."""
  if spec in ("general", "code", "python", "domain", "prose") or spec.startswith("tfds:"):
    yield from textdata.domain_documents(spec)
  elif spec.startswith("files:"):
    for path in textdata._glob_files(spec[len("files:"):], "source"):
      yield from textdata.path_documents(path, f"file:{path}", field)
  elif spec.startswith("dir:"):
    yield from textdata.iter_directory_documents(spec[len("dir:"):], field=field, warn=warn)
  elif spec.startswith("hf:"):
    try:
      import datasets
    except ImportError:
      raise ConfigError(f"source {spec!r} needs the datasets package (pip install datasets)") from None
    ds = datasets.load_from_disk(os.path.expanduser(spec[3:]))
    if isinstance(ds, datasets.DatasetDict):
      ds = ds[sorted(ds)[0]] if "train" not in ds else ds["train"]
    if field not in ds.column_names:
      raise ConfigError(f"source {spec!r}: no column {field!r} (columns: {ds.column_names})")
    row = 0
    for batch in ds.iter(batch_size=1024):
      for value in batch[field]:
        row += 1
        if isinstance(value, str):
          yield textdata.Document(value, f"hf:{row}")
  else:
    raise ConfigError(f"source {spec!r}: expected 'general', 'code', 'files:<glob>', 'dir:<directory>', "
                      "'hf:<saved datasets directory>' or 'tfds:<name>[:<split>[:<feature>]]'")


def check_source(spec: str) -> None:
  """A source spec's form, and that its files exist (listed, not read): ConfigError naming it otherwise."""
  if spec.startswith("dir:"):
    root = os.path.expanduser(spec[len("dir:"):])
    if not os.path.isdir(root):
      raise ConfigError(f"source {spec!r}: no such directory")
  elif spec.startswith("hf:"):
    if not os.path.isdir(os.path.expanduser(spec[3:])):
      raise ConfigError(f"source {spec!r}: no such directory (a dataset saved with `save_to_disk`)")
  else:
    textdata.check_spec(spec, "source")


# ----------------------------------------------------------------------------- tokenizer identity

def separator_id(tokenizer) -> int:
  """The token packed between documents: the tokenizer's document separator (an HF tokenizer's end-of-text token,
  `lm.doc_separator`), else its eos -- as `text.load_domain` packs."""
  return int(getattr(tokenizer, "separator_id", tokenizer.eos_id))


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of what the tokenizer does (ids of a fixed multilingual probe text, vocabulary size, eos): two
  tokenizers with equal fingerprints tokenize the probe alike, whatever files they were loaded from."""
  ids = np.asarray(tokenizer.encode(_PROBE), np.int64)
  h = hashlib.sha256(ids.tobytes())
  h.update(f"|{tokenizer.vocab_size}|{tokenizer.eos_id}|{separator_id(tokenizer)}".encode())
  return h.hexdigest()[:32]


def load_any_tokenizer(spec: str):
  """`byte`, a `tokenizers` .json / SentencePiece .model file, or `hf:<dir>` / a Hugging Face checkpoint directory
  (`cl_jax.data.tokenizer.load_tokenizer`); a ConfigError naming the spec when it cannot be loaded."""
  from cl_jax.data.tokenizer import load_tokenizer
  path = os.path.expanduser(spec[3:] if spec.startswith("hf:") else spec)
  try:
    return load_tokenizer(path)
  except (OSError, ValueError, TypeError) as e:
    raise ConfigError(f"--tokenizer {spec!r}: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------------- writing

def record_dtype(vocab_size: int, seq_len: int) -> str:
  """The narrowest record integer that holds every token id and segment id."""
  return "<u2" if vocab_size <= 2 ** 16 and seq_len < 2 ** 16 else "<i4"


def _pack_rows(tokens: np.ndarray, owner: np.ndarray, seq_len: int):
  """Full `seq_len` rows of a token stream: (tokens [n, L], segment ids [n, L], first owner [n])."""
  n = len(tokens) // seq_len
  tok = tokens[:n * seq_len].reshape(n, seq_len)
  own = owner[:n * seq_len].reshape(n, seq_len)
  seg = (own - own[:, :1] + 1).astype(np.int32)
  return tok, seg, own[:, 0].copy()


class _SplitWriter:
  """The packed stream of one split: tokens (with eos after each document) waiting for a full shard."""

  def __init__(self, out: str, split: str, seq_len: int, shard_sequences: int, dtype: str):
    self.out, self.split, self.seq_len, self.per_shard, self.dtype = out, split, seq_len, shard_sequences, dtype
    self.tokens = np.zeros((0,), np.int32)
    self.owner = np.zeros((0,), np.int32)   # split-local document index of each token
    self.documents = 0
    self.shards: list[dict] = []
    self.doc_index: list[np.ndarray] = []

  def add(self, token_lists: Sequence[np.ndarray], eos: int) -> None:
    if not token_lists:
      return
    lengths = np.array([len(t) + 1 for t in token_lists], np.int64)
    stream = np.empty(int(lengths.sum()), np.int32)
    ends = np.cumsum(lengths)
    stream[ends - 1] = eos
    starts = ends - lengths
    for t, s in zip(token_lists, starts):
      stream[s:s + len(t)] = t
    owner = np.repeat(np.arange(self.documents, self.documents + len(token_lists), dtype=np.int32), lengths)
    self.documents += len(token_lists)
    self.tokens = np.concatenate([self.tokens, stream])
    self.owner = np.concatenate([self.owner, owner])

  def full_shards(self) -> bool:
    return len(self.tokens) >= self.per_shard * self.seq_len

  def write_shard(self, final: bool = False) -> None:
    """Writes the next shard from the head of the stream (the last, partial one when `final`)."""
    take = self.per_shard * self.seq_len
    if not final and len(self.tokens) < take:
      return
    tok, seg, first = _pack_rows(self.tokens[:take], self.owner[:take], self.seq_len)
    self.tokens, self.owner = self.tokens[len(tok) * self.seq_len:], self.owner[len(tok) * self.seq_len:]
    if final:
      self.tokens, self.owner = self.tokens[:0], self.owner[:0]
    if not len(tok):
      return
    from array_record.python.array_record_module import ArrayRecordWriter
    name = f"{self.split}-{len(self.shards):05d}.array_record"
    tmp = os.path.join(self.out, name + ".tmp")
    writer = ArrayRecordWriter(tmp, "group_size:1")
    records = np.stack([tok, seg], axis=1).astype(self.dtype)
    for r in records:
      writer.write(r.tobytes())
    writer.close()
    os.replace(tmp, os.path.join(self.out, name))
    self.shards.append({"file": name, "sequences": int(len(tok)), "bytes": os.path.getsize(os.path.join(self.out,
                                                                                                         name))})
    self.doc_index.append(first)

  def state(self) -> dict:
    return {"documents": self.documents, "shards": self.shards}

  def restore(self, state: dict, carry: dict) -> None:
    self.documents, self.shards = state["documents"], state["shards"]
    self.tokens, self.owner = carry[f"{self.split}/tokens"], carry[f"{self.split}/owner"]
    self.doc_index = [carry[f"{self.split}/doc_index/{i}"] for i in range(len(self.shards))]


def _save_progress(out: str, consumed: int, counters: dict, writers: dict) -> None:
  """The resume point, written atomically (a new directory renamed over the old one)."""
  tmp, final = os.path.join(out, ".progress.tmp"), os.path.join(out, ".progress")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  carry = {}
  for s, w in writers.items():
    carry[f"{s}/tokens"], carry[f"{s}/owner"] = w.tokens, w.owner
    for i, d in enumerate(w.doc_index):
      carry[f"{s}/doc_index/{i}"] = d
  np.savez(os.path.join(tmp, "carry.npz"), **carry)
  with open(os.path.join(tmp, "state.json"), "w") as f:
    json.dump({"consumed": consumed, "counters": counters,
               "splits": {s: w.state() for s, w in writers.items()}}, f)
  old = final + ".old"
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)


class Manifest(NamedTuple):
  path: str
  data: dict

  @property
  def seq_len(self) -> int:
    return int(self.data["seq_len"])

  def splits(self) -> dict:
    return self.data["splits"]


class _Mismatch(Exception):
  """The fast encoder gave other ids than the tokenizer's own on a verified document."""


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  diff = np.flatnonzero(a[:n] != b[:n])
  return int(diff[0]) if len(diff) else n


def select_encoder(tokenizer, backend: str, *, threads: int | None = None):
  """(the fast encoder or None, why not): `backend` 'tokenizers' never uses one, 'tiktoken' insists on it (a
  ConfigError naming the reason when the tokenizer is not eligible or tiktoken is missing), 'auto' uses it when
  tiktoken is installed and the tokenizer eligible (`cl_jax.data.tokenizer.tiktoken_encoder`)."""
  from cl_jax.data.tokenizer import BACKENDS, FastPathUnavailable, tiktoken_encoder
  if backend not in BACKENDS:
    raise ConfigError(f"tokenizer_backend={backend!r}: expected one of {', '.join(BACKENDS)}")
  if backend == "tokenizers":
    return None, "tokenizer_backend=tokenizers"
  try:
    return tiktoken_encoder(tokenizer, threads=threads), ""
  except (FastPathUnavailable, ImportError) as e:
    if backend == "tiktoken":
      raise ConfigError(f"tokenizer_backend=tiktoken: {' '.join(str(e).split())}; use tokenizer_backend=auto or "
                        "tokenizers") from None
    return None, " ".join(str(e).split())


def _discard(out: str) -> None:
  """Removes what an unfinished prepare wrote at `out` (shards, doc indexes, the resume point) and nothing else."""
  for name in os.listdir(out):
    split = name.split("-")[0].split(".")[0]
    if name.startswith(".progress"):
      shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    elif split in textdata.SPLITS and (name.endswith((".array_record", ".array_record.tmp"))
                                       or name == f"{split}.doc_index.npy"):
      os.remove(os.path.join(out, name))


def prepare(sources: Sequence[str], tokenizer, out: str, *, seq_len: int, seed: int = 0, validation: float = 0.05,
            test: float = 0.05, shard_sequences: int = 8192, batch_documents: int = 512, field: str = "text",
            tokenizer_spec: str = "", tokenizer_backend: str = "auto", verify_first: int = 100,
            verify_every: int = 100, progress: bool = True, warn: Callable[[str], None] | None = None,
            _stop_after_shards: int | None = None, _fast_encoder=None) -> Manifest:
  """Tokenizes `sources` (specs, see `iter_documents`) into a cache at `out`; returns its manifest.

  A complete cache at `out` made from the same inputs and settings is returned as it is; one made otherwise is
  refused (pass another `out`). `_stop_after_shards` (tests) simulates an interruption after that many shards.

  `tokenizer_backend`: 'auto' (tiktoken where `select_encoder` allows it, else the tokenizer's own encoder),
  'tokenizers' or 'tiktoken'. With tiktoken, the first `verify_first` documents (after dedup) and every
  `verify_every`-th one after them are also encoded by the tokenizer itself and must get the same ids; on the
  first that does not, what was written is discarded and 'auto' starts again with the tokenizer's own encoder
  (a warning says so), 'tiktoken' stops with a ConfigError. Either way the cache holds the ids the tokenizer gives:
  it is byte-identical to the one `tokenizer_backend='tokenizers'` writes. `_fast_encoder` (tests) replaces the
  tiktoken encoder `select_encoder` would build.
  """
  warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
  if seq_len < 2:
    raise ConfigError(f"seq_len={seq_len}: a sequence needs at least 2 tokens")
  if shard_sequences < 1:
    raise ConfigError(f"shard_sequences={shard_sequences}: must be at least 1")
  if not sources:
    raise ConfigError("prepare: name at least one source")
  if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
    raise ConfigError(f"validation={validation}, test={test}: each in [0, 1), their sum below 1")
  if verify_first < 0 or verify_every < 1:
    raise ConfigError(f"verify_first={verify_first}, verify_every={verify_every}: verify_first >= 0 and "
                      "verify_every >= 1 (1 checks every document)")
  for spec in sources:
    check_source(spec)
  settings = {"sources": list(sources), "seq_len": int(seq_len), "seed": int(seed), "validation": validation,
              "test": test, "shard_sequences": int(shard_sequences), "field": field,
              "tokenizer": {"spec": tokenizer_spec, "fingerprint": tokenizer_fingerprint(tokenizer),
                            "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id),
                            "separator_id": separator_id(tokenizer)}}
  manifest_path = os.path.join(out, MANIFEST)
  if os.path.exists(manifest_path):
    existing = open_prepared(out)
    same = {k: existing.data.get(k) for k in settings} == json.loads(json.dumps(settings))
    if not same:
      raise ConfigError(f"{out}: holds a prepared cache made from other sources or settings; choose another --out")
    return existing
  from cl_jax.data.tokenizer import backend_name
  if _fast_encoder is not None:
    fast, why = _fast_encoder, ""
  else:
    fast, why = select_encoder(tokenizer, tokenizer_backend)
  if progress:
    print(f"prepare: encoding with {'tiktoken' if fast is not None else backend_name(tokenizer)}"
          + (f" (tiktoken not used: {why})" if why and tokenizer_backend == "auto" else ""), file=sys.stderr)
  run = dict(sources=sources, tokenizer=tokenizer, out=out, seq_len=seq_len, seed=seed, validation=validation,
             test=test, shard_sequences=shard_sequences, batch_documents=batch_documents, field=field,
             settings=settings, verify_first=verify_first, verify_every=verify_every, progress=progress, warn=warn,
             _stop_after_shards=_stop_after_shards)
  try:
    return _prepare(fast=fast, note=why, **run)
  except _Mismatch as e:
    _discard(out)
    if tokenizer_backend == "tiktoken":
      raise ConfigError(f"tokenizer_backend=tiktoken: {e}; nothing kept -- use tokenizer_backend=tokenizers "
                        "for this tokenizer") from None
    # 'auto' promises a correct cache as fast as it can be trusted, so it falls back rather than fail: the
    # mismatch shows the fast path is wrong for this tokenizer, and the tokenizer's own encoder is always right.
    warn(f"{e}; discarding what was written and starting again with {backend_name(tokenizer)}")
    mismatch = str(e)
  return _prepare(fast=None, note=f"tiktoken refused by the check: {mismatch}", **run)


def _prepare(*, sources, tokenizer, out, seq_len, seed, validation, test, shard_sequences, batch_documents, field,
             settings, fast, note, verify_first, verify_every, progress, warn, _stop_after_shards) -> Manifest:
  """`prepare` with a chosen encoder (`fast`, else the tokenizer's own); raises `_Mismatch` when a verified
  document's ids differ, before anything of its batch is packed."""
  from cl_jax.data.tokenizer import backend_name
  backend = "tiktoken" if fast is not None else backend_name(tokenizer)
  manifest_path = os.path.join(out, MANIFEST)
  os.makedirs(out, exist_ok=True)
  dtype = record_dtype(tokenizer.vocab_size, seq_len)
  separator = separator_id(tokenizer)
  writers = {s: _SplitWriter(out, s, seq_len, shard_sequences, dtype) for s in textdata.SPLITS}
  counters = {"documents": 0, "duplicates": 0, "characters": 0, "digest": "", "verified": 0, "backends": []}
  consumed = 0
  progress_dir = os.path.join(out, ".progress")
  if os.path.isdir(progress_dir):  # an interrupted prepare: go on from its last shard
    with open(os.path.join(progress_dir, "state.json")) as f:
      state = json.load(f)
    with np.load(os.path.join(progress_dir, "carry.npz")) as carry:
      for s, w in writers.items():
        w.restore(state["splits"][s], carry)
    consumed, counters = state["consumed"], dict({"verified": 0, "backends": []}, **state["counters"])
    if progress:
      print(f"prepare: resuming after {consumed} documents", file=sys.stderr)
  if backend not in counters["backends"]:
    counters["backends"] = counters["backends"] + [backend]
  seen: set = set()
  digest = hashlib.blake2b(digest_size=16)
  pending: dict = {s: [] for s in textdata.SPLITS}
  checked: dict = {s: [] for s in textdata.SPLITS}   # (position in pending, document number) to verify
  written = sum(len(w.shards) for w in writers.values())
  start, index = time.time(), 0
  # One batch is tokenized in a worker thread while this thread reads, deduplicates and splits the next one and
  # packs and writes the previous one: `tokenizers` and tiktoken release the GIL while they encode, so the Python
  # work no longer leaves the cores idle. Batches are handed to the writers strictly in the order they were cut, so
  # the bytes do not depend on thread timing.
  pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-encode")
  inflight: list = []   # [(future of {split: token arrays}, the resume point as of the end of that batch)]

  def encode(texts: dict, verify: dict) -> dict:
    if fast is None:
      return {s: textdata.encode_all(tokenizer, t) for s, t in texts.items() if t}
    ids = {s: fast.encode_batch(t) for s, t in texts.items() if t}
    for s, picks in verify.items():
      if picks:
        reference = textdata.encode_all(tokenizer, [texts[s][i] for i, _ in picks])
        for (i, number), want in zip(picks, reference):
          got = ids[s][i]
          if len(got) != len(want) or not np.array_equal(got, want):
            k = _first_difference(got, want)
            raise _Mismatch(f"tiktoken and {backend_name(tokenizer)} disagree on document {number} (after "
                            f"dedup) at token {k}: {got[k:k + 5].tolist()} vs {want[k:k + 5].tolist()}")
    return ids

  def drain() -> bool:
    """Packs the oldest in-flight batch; writes full shards; saves the resume point after each shard (as of the
    end of that batch: later documents, already read, are tokenized again on resume)."""
    nonlocal written
    future, (consumed_at, counters_at) = inflight.pop(0)
    for s, token_lists in future.result().items():
      writers[s].add(token_lists, separator)
    for w in writers.values():
      while w.full_shards():
        w.write_shard()
        written += 1
        _save_progress(out, consumed_at, counters_at, writers)
        if _stop_after_shards is not None and written >= _stop_after_shards:
          return True
    return False

  def flush(final: bool = False) -> bool:
    """Starts tokenizing the pending documents; packs the batch before them meanwhile (all of them when `final`)."""
    texts = {s: [d.text for d in docs] for s, docs in pending.items()}
    verify = {s: list(c) for s, c in checked.items()}
    for s in pending:
      pending[s], checked[s] = [], []
    # A batch reaches the writers only after its verified documents matched, so the count saved with it is true.
    inflight.append((pool.submit(encode, texts, verify),
                     (index, dict(counters, digest=digest.hexdigest()))))
    while len(inflight) > (0 if final else 1):
      if drain():
        return True
    if final:
      for w in writers.values():
        w.write_shard(final=True)
    return False

  try:
    for spec in sources:
      for doc in iter_documents(spec, field=field, warn=warn):
        index += 1
        key = hashlib.blake2b(textdata._normalise(doc.text).encode("utf-8"), digest_size=16).digest()
        if key in seen:
          if index > consumed:
            counters["duplicates"] += 1
          continue
        seen.add(key)
        digest.update(key)
        if index <= consumed:
          continue  # tokenized before the interruption: only its dedup key was needed
        counters["documents"] += 1
        counters["characters"] += len(doc.text)
        u = textdata._unit_hash("split", seed, doc.group)
        split = "test" if u < test else "validation" if u < test + validation else "train"
        number = counters["documents"]  # the sample depends on the documents only, not on batches or resumes
        if fast is not None and (number <= verify_first or number % verify_every == 0):
          checked[split].append((len(pending[split]), number))
          counters["verified"] += 1
        pending[split].append(doc)
        if sum(len(p) for p in pending.values()) >= batch_documents:
          if flush():
            return Manifest(out, {})
          if progress:
            mb = counters["characters"] / 1e6
            print(f"\rprepare: {counters['documents']} documents, {mb:.1f} MB, {written} shards, "
                  f"{mb / max(time.time() - start, 1e-9):.2f} MB/s", end="", file=sys.stderr, flush=True)
    if flush(final=True):
      return Manifest(out, {})
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  if progress:
    print(file=sys.stderr)
  if counters["documents"] == 0:
    raise ConfigError(f"prepare: the sources {list(sources)} hold no document")
  splits = {}
  for s, w in writers.items():
    first = np.concatenate(w.doc_index) if w.doc_index else np.zeros((0,), np.int32)
    np.save(os.path.join(out, f"{s}.doc_index.npy"), first.astype(np.int32))
    n = sum(sh["sequences"] for sh in w.shards)
    splits[s] = {"shards": w.shards, "sequences": n, "tokens": n * seq_len, "documents": w.documents}
  encoder = {"backend": "+".join(counters["backends"]), "verified_documents": counters["verified"],
             "verify_first": verify_first, "verify_every": verify_every}
  if fast is not None:
    import tiktoken
    encoder["tiktoken"] = tiktoken.__version__
  if note:
    encoder["note"] = note
  data = dict(settings, format=FORMAT, record={"dtype": dtype, "shape": [2, seq_len],
                                               "rows": ["tokens", "segment_ids"]},
              documents=counters["documents"], duplicates=counters["duplicates"],
              characters=counters["characters"], content_digest=digest.hexdigest(), splits=splits, encoder=encoder,
              policy={"dedup": "exact, on whitespace-normalised text (blake2b-128); first occurrence kept",
                      "split": "by document group: hash(seed, group) against the validation / test fractions",
                      "packing": "eos after each document; the split's stream cut into seq_len windows"})
  tmp = manifest_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, manifest_path)
  shutil.rmtree(progress_dir, ignore_errors=True)
  return Manifest(out, data)


# ----------------------------------------------------------------------------- reading

def open_prepared(path: str, tokenizer=None, *, seq_len: int | None = None) -> Manifest:
  """The manifest of a complete cache, checked against the files on disk (and against `tokenizer` /
  `seq_len` when given) before any training starts: a ConfigError naming what does not match."""
  path = os.path.expanduser(path)
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    what = "an unfinished prepare (rerun it to finish)" if os.path.isdir(os.path.join(path, ".progress")) else \
        "not a prepared cache"
    raise ConfigError(f"cache:{path}: no {MANIFEST} -- {what}; make one with `cl-jax prepare ... --out {path}`")
  try:
    with open(manifest_path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cache:{path}: {MANIFEST} is unreadable ({e}); prepare the cache again") from None
  if data.get("format") != FORMAT:
    raise ConfigError(f"cache:{path}: format {data.get('format')!r}, expected {FORMAT!r}; prepare it again")
  for split, info in data["splits"].items():
    for shard in info["shards"]:
      p = os.path.join(path, shard["file"])
      size = os.path.getsize(p) if os.path.isfile(p) else None
      if size != shard["bytes"]:
        found = "missing" if size is None else f"{size} bytes, the manifest says {shard['bytes']}"
        raise ConfigError(f"cache:{path}: shard {shard['file']} is {found} (truncated or replaced); prepare the "
                          "cache again")
  if tokenizer is not None:
    fp = tokenizer_fingerprint(tokenizer)
    if fp != data["tokenizer"]["fingerprint"]:
      raise ConfigError(f"cache:{path}: prepared with another tokenizer ({data['tokenizer']['spec'] or 'unnamed'}, "
                        f"vocab {data['tokenizer']['vocab_size']}) than this run's (vocab {tokenizer.vocab_size}); "
                        "prepare it with the run's tokenizer")
  if seq_len is not None and seq_len != data["seq_len"]:
    raise ConfigError(f"cache:{path}: sequences of {data['seq_len']} tokens, the run's lm.seq_len is {seq_len}; "
                      "prepare it with --seq_len to match")
  return Manifest(path, data)


class CachedRows:
  """The packed sequences of one split of a cache, read on demand: `len`, `shape`, `dtype`, and
  `rows[index_array]` -> int32 [k, seq_len] (only those records are read). `view(indices)` is a lazy subset.
  `part` picks the record row: 0 tokens, 1 segment ids."""

  def __init__(self, path: str, files: Sequence[str], seq_len: int, indices: np.ndarray | None = None,
               part: int = 0, source=None, record_dtype: str = "<i4"):
    self.path, self.files, self.seq_len, self.part = path, tuple(files), int(seq_len), part
    self.record_dtype = record_dtype
    if source is None:
      from grain.sources import ArrayRecordDataSource
      source = ArrayRecordDataSource([os.path.join(path, f) for f in files]) if files else ()
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices) if self._indices is not None else len(self._source)

  @property
  def shape(self) -> tuple:
    return (len(self), self.seq_len)

  dtype = np.dtype(np.int32)
  ndim = 2

  def view(self, indices) -> "CachedRows":
    indices = np.asarray(indices, np.int64)
    base = indices if self._indices is None else self._indices[indices]
    return CachedRows(self.path, self.files, self.seq_len, base, self.part, self._source, self.record_dtype)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    scalar = np.ndim(index) == 0
    idx = np.atleast_1d(np.asarray(index, np.int64))
    if idx.dtype == bool:
      idx = np.flatnonzero(idx)
    if self._indices is not None:
      idx = self._indices[idx]
    out = np.empty((len(idx), self.seq_len), np.int32)
    for k, i in enumerate(idx.tolist()):
      out[k] = np.frombuffer(self._source[int(i)], self.record_dtype).reshape(2, self.seq_len)[self.part]
    return out[0] if scalar else out

  def __array__(self, dtype=None, copy=None):  # a whole split in memory: only when asked for explicitly
    out = self[np.arange(len(self))]
    return out if dtype is None else out.astype(dtype)


def cached_split(manifest: Manifest, split: str) -> textdata.PackedSplit:
  """One split of a cache as a `PackedSplit` whose `tokens` are `CachedRows` (lazy) and `doc_index` an array
  memory-mapped from disk."""
  info = manifest.data["splits"][split]
  rows = CachedRows(manifest.path, [s["file"] for s in info["shards"]], manifest.seq_len,
                    record_dtype=manifest.data["record"]["dtype"])
  doc_index = np.load(os.path.join(manifest.path, f"{split}.doc_index.npy"), mmap_mode="r")
  return textdata.PackedSplit(rows, doc_index)


# Evaluation documents decoded from a prepared cache (cloze items are built from text): a fixed number of its first
# validation / test sequences, enough for the cloze items a run asks for (`text.cloze_items`, 100s) many times over.
CACHED_EVAL_DOCUMENT_SEQUENCES = 512


def cached_domain(path: str, tokenizer, seq_len: int, *, seed: int, validation: float, test: float,
                  name: str | None = None) -> textdata.TextDomain:
  """A prepared cache as a `TextDomain`: its splits read on demand, checked against the run's tokenizer,
  `seq_len` and split policy (a mismatch is a ConfigError before training starts). `documents` holds the segments
  of the first validation / test sequences decoded back to text (for cloze items); the train documents are
  counted, not held."""
  m = open_prepared(path, tokenizer, seq_len=seq_len)
  policy = {"seed": seed, "validation": validation, "test": test}
  made = {k: m.data[k] for k in policy}
  if made != policy:
    raise ConfigError(f"cache:{path}: split with {made}, the run asks for {policy} (text.split_seed / "
                      "text.validation / text.test); prepare it with the run's split or set those to match")
  splits = {s: cached_split(m, s) for s in textdata.SPLITS}
  documents = {"train": []}
  for s in ("validation", "test"):
    rows = splits[s].tokens
    k = min(len(rows), CACHED_EVAL_DOCUMENT_SEQUENCES)
    tokens = rows[np.arange(k)]
    segments = CachedRows(m.path, rows.files, seq_len, part=1, record_dtype=rows.record_dtype)[np.arange(k)]
    docs = []
    for i in range(k):
      for seg in np.unique(segments[i]):
        ids = tokens[i][(segments[i] == seg) & (tokens[i] != separator_id(tokenizer))]
        if len(ids):
          docs.append(textdata.Document(tokenizer.decode(ids), f"cache:{s}:{i}:{seg}"))
    documents[s] = docs
  return textdata.TextDomain(name or f"cache:{path}", documents, splits,
                    {s: int(m.data["splits"][s]["documents"]) for s in textdata.SPLITS})


def check_spec(spec: str, key: str) -> None:
  """`text.check_spec`, and for `cache:<dir>` that the cache is complete and intact (a run's validation)."""
  if spec.startswith("cache:"):
    try:
      open_prepared(spec[len("cache:"):])
    except ConfigError as e:
      raise ConfigError(f"{key}={spec!r}: {e}") from None
  else:
    textdata.check_spec(spec, key)


def load_domain(spec: str, tokenizer, seq_len: int, *, seed: int = 0, validation: float = 0.05, test: float = 0.05,
                name: str | None = None) -> textdata.TextDomain:
  """`text.load_domain`, or `cached_domain` for a `cache:<dir>` spec."""
  if spec.startswith("cache:"):
    return cached_domain(spec[len("cache:"):], tokenizer, seq_len, seed=seed, validation=validation, test=test,
                         name=name)
  return textdata.load_domain(spec, tokenizer, seq_len, seed=seed, validation=validation, test=test, name=name)


# ----------------------------------------------------------------------------- command line

def _encoder_summary(encoder: dict | None) -> str:
  if not encoder:
    return ""
  checked = encoder["verified_documents"]
  return f"; encoded by {encoder['backend']}" + (f", {checked} documents checked against tokenizers" if checked
                                                 else "")


def main(argv: Sequence[str]) -> int:
  """`cl-jax prepare SOURCE [SOURCE ...] --tokenizer T --seq_len L --out DIR`: see the module docstring."""
  p = argparse.ArgumentParser(prog="cl-jax prepare", description=__doc__.split("\n\n")[0])
  p.add_argument("sources", nargs="+", help="source specs: dir:<d>, files:<glob>, hf:<saved dataset>, tfds:<name>, "
                                            "general, code")
  p.add_argument("--tokenizer", required=True, help="byte, sp:<model>, or hf:<checkpoint dir> / a directory")
  p.add_argument("--seq_len", type=int, required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0, help="the split seed (the same as text.split_seed of a run)")
  p.add_argument("--validation", type=float, default=0.05)
  p.add_argument("--test", type=float, default=0.05)
  p.add_argument("--shard_sequences", type=int, default=8192)
  p.add_argument("--field", default="text", help="the text field of .jsonl / .parquet / hf: records")
  p.add_argument("--tokenizer_backend", default="auto", choices=("auto", "tokenizers", "tiktoken"),
                 help="who encodes a tokenizer.json: tiktoken (about 4x faster per CPU-second, checked against "
                      "tokenizers on a sample; auto: when installed and the file is eligible) or tokenizers")
  p.add_argument("--verify_first", type=int, default=100, help="with tiktoken: the first documents checked")
  p.add_argument("--verify_every", type=int, default=100, help="with tiktoken: then every k-th document checked")
  args = p.parse_args(list(argv))
  try:
    tok = load_any_tokenizer(args.tokenizer)
    m = prepare(args.sources, tok, args.out, seq_len=args.seq_len, seed=args.seed, validation=args.validation,
                test=args.test, shard_sequences=args.shard_sequences, field=args.field,
                tokenizer_spec=args.tokenizer, tokenizer_backend=args.tokenizer_backend,
                verify_first=args.verify_first, verify_every=args.verify_every)
  except ConfigError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  sp = m.data["splits"]
  print(f"{m.path}: {m.data['documents']} documents ({m.data['duplicates']} duplicates dropped); "
        + ", ".join(f"{s} {sp[s]['sequences']} x {m.seq_len} tokens in {len(sp[s]['shards'])} shards" for s in sp)
        + _encoder_summary(m.data.get("encoder")))
  return 0


__all__ = ["prepare", "open_prepared", "cached_split", "cached_domain", "check_spec", "load_domain", "CachedRows",
           "Manifest", "iter_documents", "tokenizer_fingerprint", "load_any_tokenizer", "main", "FORMAT",
           "select_encoder"]
