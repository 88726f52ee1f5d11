"""Text corpora for LM continual pre-training, built from what ships with CPython (no download).

Domains:
  * `general` - English prose: the `pydoc_data.topics` reference pages plus the docstrings of standard
    library modules, classes and functions (read with `ast`, so nothing is imported or executed).
  * `code` (alias `python`, `domain`) - Python source: standard-library `.py` files.
  * `files:<glob>` - any local files: a text file is one document, a record file one document per record.
  * `dir:<directory>` - a local corpus: every text or source file under the directory (recursively; `TEXT_SUFFIXES`)
    is one document, and every line of every `.jsonl` / `.jsonl.gz` / `.jsonl.zst` file and every row of every
    `.parquet` file is one document (its "text" field); any other file is named in a warning, never dropped
    silently. This is how a user's own domain (medical notes, contracts, a code base) is named in a config.
  * `cache:<directory>` - a corpus tokenized once by `cl-jax prepare` (`cl_jax.data.prepare`), read on demand.
  * `tfds:<name>[:<split>[:<feature>]]` - a tensorflow-datasets text dataset read through
    `tfds.data_source` (imported lazily; the dataset must already be prepared in the tfds data dir).

The standard-library files are partitioned once, by a hash of their path, into a half whose docstrings
feed `general` and a half whose source feeds `code`; no text is in both domains, so training on code
cannot leak general test prose (a docstring sits inside its source file).

Every domain is deduplicated exactly (on whitespace-normalised text) and split into train / validation /
test **by document group** (a source file, a pydoc topic): a group's hash with the seed picks its split,
so all docstrings of one module fall in one split, the split of a document never changes when the
corpus grows, and no document is in two splits. Each split is then tokenized and packed GPT-style
(Radford et al. 2019): documents are concatenated with an `eos` between them and cut into fixed
`seq_len` windows; `doc_index[i]` names the document that sequence `i` starts in (difficulty-aware
ordering ranks documents by the base model's per-document perplexity).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from typing import NamedTuple, Sequence

import numpy as np

from cl_jax.errors import ConfigError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  group: str  # split unit: the file or topic the text comes from


class PackedSplit(NamedTuple):
  tokens: np.ndarray     # int32 [N, seq_len]
  doc_index: np.ndarray  # int32 [N]: index into the split's documents of the doc sequence i starts in


class TextDomain(NamedTuple):
  name: str
  documents: dict        # split -> list[Document] (a prepared cache: the decoded evaluation sequences only)
  splits: dict           # split -> PackedSplit (a prepared cache: tokens read on demand, `prepare.CachedRows`)
  num_documents: dict | None = None  # split -> documents, where `documents` does not hold them all

  def count(self, split: str) -> int:
    return self.num_documents[split] if self.num_documents is not None else len(self.documents[split])


def _unit_hash(*parts) -> float:
  """A uniform number in [0, 1) from the parts (blake2b: stable across runs, platforms and processes)."""
  digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


# ----------------------------------------------------------------------------- CPython corpora

_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data",
                  "encodings"}  # pydoc_data is the prose itself; encodings are generated tables


@functools.lru_cache(maxsize=None)
def _stdlib_files() -> tuple[str, ...]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
    # _sysconfigdata* is a machine-generated dict of build flags: neither code style nor portable.
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if f.endswith(".py") and not f.startswith("_sysconfigdata"))
  return tuple(sorted(os.path.relpath(p, root) for p in out))


def _stdlib_share(relpath: str, code_share: float) -> str:
  return "code" if _unit_hash("stdlib-partition", relpath) < code_share else "general"


def _read(path: str) -> str | None:
  """A standard-library file's text, or None when it cannot be read (CPython ships a few non-UTF-8 test inputs:
  skipping them loses nothing). A user's corpus file is read by `_read_corpus_file`, which refuses instead."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (UnicodeDecodeError, OSError):
    return None


@functools.lru_cache(maxsize=None)
def _docstrings(relpath: str, min_chars: int) -> tuple[str, ...]:
  text = _read(os.path.join(sysconfig.get_paths()["stdlib"], relpath))
  if text is None:
    return ()
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return ()
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc and len(doc) >= min_chars:
        out.append(doc)
  return tuple(out)


def general_documents(*, code_share: float = 0.5, min_chars: int = 64,
                      max_files: int | None = None) -> list[Document]:
  """English prose: every pydoc topic, and the docstrings of the `general` half of the stdlib files."""
  from pydoc_data.topics import topics
  docs = [Document(topics[k], f"pydoc:{k}") for k in sorted(topics) if len(topics[k]) >= min_chars]
  files = [f for f in _stdlib_files() if _stdlib_share(f, code_share) == "general"][:max_files]
  for f in files:
    docs.extend(Document(d, f"stdlib:{f}") for d in _docstrings(f, min_chars))
  return docs


def code_documents(*, code_share: float = 0.5, min_chars: int = 64,
                   max_files: int | None = None) -> list[Document]:
  """Python source: the `code` half of the standard library's `.py` files, one document per file."""
  root = sysconfig.get_paths()["stdlib"]
  docs = []
  for f in [f for f in _stdlib_files() if _stdlib_share(f, code_share) == "code"][:max_files]:
    text = _read(os.path.join(root, f))
    if text is not None and len(text) >= min_chars:
      docs.append(Document(text, f"stdlib:{f}"))
  return docs


# ----------------------------------------------------------------------------- local corpora

# What a `dir:` corpus reads: these files whole (prose, markup, source code), and these as one document per record
# (a .jsonl line's or a .parquet row's text field). Anything else under the directory is named in a warning.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java",
                 ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".sql", ".html", ".css", ".yaml", ".yml", ".toml")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
DIRECTORY_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
_DIRECTORY_FORMS = "text or source files, .jsonl(.gz/.zst) or .parquet files"
# The domain specs (module docstring): names of the built-in corpora, and the forms a spec may take.
_ALIASES = {"python": "code", "domain": "code", "prose": "general"}
_SPEC_FORMS = ("expected 'general', 'code' (alias 'python'/'domain'), 'files:<glob>', 'dir:<directory>', "
               "'cache:<prepared directory>' or 'tfds:<name>[:<split>[:<feature>]]'")


def _glob_files(pattern: str, key: str) -> list[str]:
  """The files `files:<pattern>` names, sorted (directories the glob matches are not documents)."""
  paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not paths:
    raise ConfigError(f"{key}='files:{pattern}': no file matches the glob (expected 'files:<glob>' matching at "
                      "least one UTF-8 text file; '**' recurses)")
  return paths


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _directory_files(directory: str, key: str, warn=None) -> list[str]:
  """The corpus files under `dir:<directory>`, sorted (hidden ones excepted); every other file is named in one
  `warn` line (None: not reported, as when a config is only validated)."""
  spec = f"dir:{directory}"
  root = os.path.expanduser(directory)
  if not os.path.exists(root):
    raise ConfigError(f"{key}={spec!r}: no such directory (expected a directory of {_DIRECTORY_FORMS})")
  if not os.path.isdir(root):
    raise ConfigError(f"{key}={spec!r}: not a directory (expected a directory of {_DIRECTORY_FORMS})")
  paths, skipped = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in sorted(filenames):
      if not f.startswith("."):
        (paths if f.endswith(DIRECTORY_SUFFIXES) else skipped).append(os.path.join(dirpath, f))
  if not paths:
    raise ConfigError(f"{key}={spec!r}: no corpus file under {root} ({_DIRECTORY_FORMS}: each text file is one "
                      "document, each record one document)")
  if skipped and warn is not None:
    shown = ", ".join(os.path.relpath(p, root) for p in skipped[:8])
    more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
    warn(f"{spec}: skipping {len(skipped)} file(s) of no known text format: {shown}{more} (read: "
         f"{' '.join(DIRECTORY_SUFFIXES)})")
  return sorted(paths)


def check_spec(spec: str, key: str = "domain") -> None:
  """Validates a domain spec without reading any document (a config's validation step, before anything is
  written): its form, and for `files:` / `dir:` that the glob or directory names at least one corpus file (the
  files are listed, not read). Raises ConfigError starting with `key='spec':`. A `tfds:` dataset is not looked up
  here (that imports tensorflow-datasets); its reader names it when it is missing."""
  kind = _ALIASES.get(spec, spec)
  if kind in ("general", "code"):
    return
  if spec.startswith("files:"):
    _glob_files(spec[len("files:"):], key)
  elif spec.startswith("dir:"):
    _directory_files(spec[len("dir:"):], key)
  elif spec.startswith("tfds:"):
    if not spec.split(":")[1]:
      raise ConfigError(f"{key}={spec!r}: expected 'tfds:<name>[:<split>[:<feature>]]'")
  else:
    raise ConfigError(f"{key}={spec!r}: {_SPEC_FORMS}")


def _not_utf8(path: str, offset: int, byte: bytes) -> ConfigError:
  return ConfigError(f"{path}: not UTF-8 (byte 0x{byte.hex()} at offset {offset}); a corpus file must be UTF-8 "
                     "text: re-encode it, e.g. iconv -f latin1 -t utf-8")


def _read_corpus_file(path: str) -> str:
  """A user's corpus file as text; a ConfigError naming the file and the first bad byte when it is not UTF-8
  (skipping it would leave "no documents", or silently a smaller corpus)."""
  try:
    with open(path, "rb") as fh:
      data = fh.read()
  except OSError as e:
    raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); a corpus file must be a readable UTF-8 text "
                      "file") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e.start, data[e.start:e.start + 1]) from None


def _open_records(path: str):
  """A binary file object over a (possibly gzip- or zstandard-compressed) JSON-lines file."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".zst"):
    try:
      import zstandard
    except ImportError:
      raise ConfigError(f"{path}: a .zst file needs the zstandard package (pip install zstandard)") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
  return open(path, "rb")


def _jsonl_lines(path: str):
  """(line number, text) of each line of a `.jsonl` file (decompressed), streamed; ConfigError naming the file and
  the byte offset of the first byte that is not UTF-8."""
  offset = 0
  with _open_records(path) as fh:
    for line_no, raw in enumerate(fh, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _not_utf8(path, offset + e.start, raw[e.start:e.start + 1]) from None
      offset += len(raw)
      yield line_no, line


def jsonl_records(path: str):
  """(line number, decoded JSON value) of each non-blank line of a `.jsonl(.gz/.zst)` file, streamed; one
  ConfigError naming the file and line for a line that is not JSON (or not UTF-8)."""
  for line_no, line in _jsonl_lines(path):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None


def _records(path: str, field: str):
  """(record number, text) of a `.jsonl(.gz/.zst)` file's lines or a `.parquet` file's rows, streamed."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise ConfigError(f"{path}: a .parquet file needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
      raise ConfigError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
      for value in batch.column(0).to_pylist():
        row += 1
        if isinstance(value, str):
          yield row, value
    return
  for line_no, record in jsonl_records(path):
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
      raise ConfigError(f"{path}:{line_no} has no string {field!r} field (each line must be an object with the "
                        "document's text under it)")
    yield line_no, record[field]


def path_documents(path: str, group: str, field: str = "text"):
  """The documents of one corpus file, streamed: a text file whole, a record file's records (group `group:N`)."""
  if path.endswith(RECORD_SUFFIXES):
    for n, value in _records(path, field):
      yield Document(value, f"{group}:{n}")
  else:
    yield Document(_read_corpus_file(path), group)


def iter_directory_documents(directory: str, *, field: str = "text", warn=_warn):
  """The documents of `dir:<directory>`, one file at a time, in sorted path order."""
  root = os.path.expanduser(directory)
  for path in _directory_files(directory, "domain", warn):
    yield from path_documents(path, f"dir:{os.path.relpath(path, root)}", field)


def file_documents(pattern: str, *, min_chars: int = 1, max_docs: int | None = None) -> list[Document]:
  """The documents of the local files matching `pattern` (a glob; `**` recurses): a text file whole, a record file
  (.jsonl(.gz/.zst), .parquet) one document per record."""
  docs = []
  for p in _glob_files(pattern, "domain"):
    docs.extend(d for d in path_documents(p, f"file:{p}") if len(d.text) >= min_chars)
    if max_docs is not None and len(docs) >= max_docs:
      break
  return docs[:max_docs]


def directory_documents(directory: str, *, field: str = "text", min_chars: int = 1,
                        max_docs: int | None = None) -> list[Document]:
  """Documents of a local corpus directory: text and source files whole, each `.jsonl(.gz/.zst)` line's and
  `.parquet` row's `field`; other files are named in a warning.

  Files are visited in sorted path order, so the corpus (and with it every split) is the same on every
  machine. Each document is its own split unit (its group names the file, and the record for record files), so
  train / validation / test are split by document.
  """
  docs = []
  for d in iter_directory_documents(directory, field=field):
    if len(d.text) >= min_chars:
      docs.append(d)
      if max_docs is not None and len(docs) >= max_docs:
        break
  return docs


def tfds_documents(name: str, split: str = "train", feature: str = "text", *,
                   max_docs: int | None = None, data_dir: str | None = None) -> list[Document]:
  """Documents from a prepared tfds text dataset, random-access through `tfds.data_source`."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"domain 'tfds:{name}' needs tensorflow-datasets: pip install tensorflow-datasets") from e
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  n = len(source) if max_docs is None else min(len(source), max_docs)
  docs = []
  for i in range(n):
    record = source[i]
    if feature not in record:
      raise KeyError(f"domain 'tfds:{name}': records have no feature {feature!r}; "
                     f"features: {sorted(record)}")
    value = record[feature]
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    # tfds examples carry no source file, so the example itself is the split unit.
    docs.append(Document(text, f"tfds:{name}:{split}:{i}"))
  return docs


# ----------------------------------------------------------------------------- dedup, split, pack

def _normalise(text: str) -> str:
  return " ".join(text.split())


def deduplicate(docs: Sequence[Document]) -> list[Document]:
  """Drops exact duplicates (after whitespace normalisation), keeping each text's first occurrence."""
  seen, out = set(), []
  for d in docs:
    key = hashlib.blake2b(_normalise(d.text).encode("utf-8"), digest_size=16).digest()
    if key not in seen:
      seen.add(key)
      out.append(d)
  return out


def split_documents(docs: Sequence[Document], *, seed: int = 0, validation: float = 0.05,
                    test: float = 0.05) -> dict[str, list[Document]]:
  """Assigns each document group to one split with probability (1-v-t, v, t), by hash(seed, group).

  Splitting by group rather than by document keeps near-duplicate siblings (the docstrings of one module,
  the overloads of one class) on the same side of the train/test boundary.
  """
  if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
    raise ValueError(f"split fractions validation={validation}, test={test}: each must be in [0, 1) "
                     "and their sum below 1")
  out = {s: [] for s in SPLITS}
  for d in docs:
    u = _unit_hash("split", seed, d.group)
    split = "test" if u < test else "validation" if u < test + validation else "train"
    out[split].append(d)
  return out


def pack(token_lists: Sequence[np.ndarray], seq_len: int, eos_id: int) -> PackedSplit:
  """Concatenates documents, each followed by `eos`, and cuts the stream into `seq_len` windows.

  The tail shorter than `seq_len` is dropped. A sequence that spans a boundary is left as it is: the
  model sees `eos` and learns that what follows is unrelated text (GPT-2 style packing).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len}: a sequence needs at least 2 tokens (input and next token)")
  if not token_lists:
    return PackedSplit(np.zeros((0, seq_len), np.int32), np.zeros((0,), np.int32))
  lengths = np.array([len(t) + 1 for t in token_lists], dtype=np.int64)
  stream = np.empty(int(lengths.sum()), dtype=np.int32)
  owner = np.repeat(np.arange(len(token_lists), dtype=np.int32), lengths)
  offset = 0
  for t, n in zip(token_lists, lengths):
    stream[offset:offset + n - 1] = t
    stream[offset + n - 1] = eos_id
    offset += n
  num = len(stream) // seq_len
  return PackedSplit(stream[:num * seq_len].reshape(num, seq_len), owner[:num * seq_len:seq_len].copy())


# ----------------------------------------------------------------------------- domains

def domain_documents(spec: str, *, max_docs: int | None = None, code_share: float = 0.5) -> list[Document]:
  """The raw documents of a domain spec (see the module docstring)."""
  kind = _ALIASES.get(spec, spec)
  if kind == "general":
    docs = general_documents(code_share=code_share)
  elif kind == "code":
    docs = code_documents(code_share=code_share)
  elif spec.startswith("files:"):
    docs = file_documents(spec[len("files:"):])
  elif spec.startswith("dir:"):
    docs = directory_documents(spec[len("dir:"):], max_docs=max_docs)
  elif spec.startswith("tfds:"):
    parts = spec.split(":")[1:]
    if not parts[0]:
      raise ValueError(f"domain {spec!r}: expected 'tfds:<name>[:<split>[:<feature>]]'")
    docs = tfds_documents(*parts[:3], max_docs=max_docs)
  else:
    raise ValueError(f"domain {spec!r}: {_SPEC_FORMS}")
  return docs[:max_docs]


def encode_all(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  """Token ids of each text, with the tokenizer's batch encoder when it has one (HF tokenizers: parallel)."""
  if hasattr(tokenizer, "encode_batch"):
    return list(tokenizer.encode_batch(list(texts))) if texts else []
  return [tokenizer.encode(t) for t in texts]


def load_domain(spec: str, tokenizer, seq_len: int, *, seed: int = 0, validation: float = 0.05,
                test: float = 0.05, max_docs: int | None = None, name: str | None = None,
                code_share: float = 0.5) -> TextDomain:
  """Documents -> dedup -> split by group -> tokenize -> pack, for one domain (a prepared cache instead:
  `prepare.load_domain`)."""
  docs = deduplicate(domain_documents(spec, max_docs=max_docs, code_share=code_share))
  if not docs:
    raise ValueError(f"domain {spec!r}: no documents")
  by_split = split_documents(docs, seed=seed, validation=validation, test=test)
  # Between documents: the tokenizer's document separator (an HF tokenizer's end-of-text token, which an instruct
  # model's eos need not be), else its eos.
  separator = int(getattr(tokenizer, "separator_id", tokenizer.eos_id))
  packed = {s: pack(encode_all(tokenizer, [d.text for d in by_split[s]]), seq_len, separator) for s in SPLITS}
  for s in SPLITS:
    want = {"train": 1.0, "validation": validation, "test": test}[s]
    if want > 0 and len(packed[s].tokens) == 0:
      raise ValueError(f"domain {spec!r}: the {s} split has no full sequence of seq_len={seq_len} "
                       f"({len(by_split[s])} documents); add documents or lower seq_len")
  return TextDomain(name or spec, by_split, packed)


# ----------------------------------------------------------------------------- cloze items

class ClozeItems(NamedTuple):
  """Multiple-choice next-word items: score each choice by its log-likelihood after the context."""
  context: np.ndarray      # int32 [n, C]: the last C tokens before the word
  choices: np.ndarray      # int32 [n, K, W]: " word" candidates, right-padded
  choice_mask: np.ndarray  # bool  [n, K, W]: True on a candidate's real tokens
  answer: np.ndarray       # int32 [n]: index of the true word among the K choices


_WORD = re.compile(r"(?<= )[A-Za-z]{%d,%d}\b")


def make_cloze_items(docs: Sequence[Document], tokenizer, *, num_items: int, context_tokens: int,
                     num_choices: int = 4, min_word_chars: int = 5, max_word_chars: int = 12,
                     seed: int = 0) -> ClozeItems:
  """Cloze items from held-out prose: which of K words (one true, K-1 distractors) comes next?

  A word of `min_word_chars..max_word_chars` letters that follows a space is blanked; the context is the
  `context_tokens` tokens before it. Distractors are other words of the same prose with the same token
  length as the answer, so comparing summed log-likelihoods needs no length normalisation. Chance is
  1/K. The format is that of LAMBADA-style / multiple-choice cloze evaluations (Paperno et al. 2016;
  Hill et al. 2016, "The Goldilocks principle"), built here from text we have.
  """
  if num_choices < 2:
    raise ValueError(f"num_choices={num_choices}: a cloze item needs at least 2 choices")
  rng = np.random.default_rng(seed)
  pattern = re.compile(_WORD.pattern % (min_word_chars, max_word_chars))
  # Candidate words, bucketed by their token length, for distractors.
  occurrences, by_len = [], {}
  for di, d in enumerate(docs):
    for m in pattern.finditer(d.text):
      occurrences.append((di, m.start(), m.group(0)))
  vocab = sorted({w for _, _, w in occurrences})
  encoded = {w: tokenizer.encode(" " + w) for w in vocab}
  for w, ids in encoded.items():
    by_len.setdefault(len(ids), []).append(w)
  order = rng.permutation(len(occurrences))
  ctx, chs, answers = [], [], []
  for oi in order:
    if len(ctx) == num_items:
      break
    di, start, word = occurrences[oi]
    pool = by_len[len(encoded[word])]
    if len(pool) < num_choices:
      continue
    context = tokenizer.encode(docs[di].text[:start - 1])  # up to, not including, the space
    if len(context) < context_tokens:
      continue
    distractors = []
    while len(distractors) < num_choices - 1:
      w = pool[rng.integers(len(pool))]
      if w != word and w not in distractors:
        distractors.append(w)
    answer = int(rng.integers(num_choices))
    words = distractors[:answer] + [word] + distractors[answer:]
    ctx.append(context[-context_tokens:])
    chs.append([encoded[w] for w in words])
    answers.append(answer)
  if len(ctx) < num_items:
    raise ValueError(f"make_cloze_items: only {len(ctx)} items of the {num_items} asked for could be "
                     f"built from {len(docs)} documents with context_tokens={context_tokens}")
  width = max(len(c) for item in chs for c in item)
  choices = np.full((num_items, num_choices, width), tokenizer.pad_id, np.int32)
  mask = np.zeros((num_items, num_choices, width), bool)
  for i, item in enumerate(chs):
    for k, c in enumerate(item):
      choices[i, k, :len(c)] = c
      mask[i, k, :len(c)] = True
  return ClozeItems(np.stack(ctx).astype(np.int32), choices, mask, np.asarray(answers, np.int32))


__all__ = ["Document", "PackedSplit", "TextDomain", "ClozeItems", "SPLITS", "check_spec", "general_documents",
           "code_documents", "file_documents", "directory_documents", "tfds_documents", "deduplicate",
           "split_documents", "pack", "encode_all", "domain_documents", "load_domain", "make_cloze_items"]
