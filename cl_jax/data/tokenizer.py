"""Tokenizers for the LM experiments: byte-level by default, a user-supplied file otherwise.

The byte-level tokenizer needs no download and no training: ids 0..255 are the UTF-8 bytes of the
text and three specials follow them (`pad`, `bos`, `eos`). It is the tokenizer of ByT5 (Xue et al. 2022,
"ByT5: Towards a token-free future with pre-trained byte-to-byte models") without its sentinel ids.

A trained tokenizer a user brings is loaded from its file:
  * `*.json`  - a Hugging Face `tokenizers` file (`HFTokenizer`, from `cl_jax.models.hf_tokenizer`),
  * `*.model` - a SentencePiece model (Kudo & Richardson 2018),
  * a Hugging Face checkpoint directory - its `tokenizer.json` (`cl_jax.models.hf_checkpoint.load_tokenizer`).
Both packages are imported only when such a file is asked for, so neither is a dependency of the rest.

Every tokenizer has the same small surface: `encode(text) -> np.int32 [n]`, `decode(ids) -> str`,
`vocab_size`, `pad_id`, `bos_id`, `eos_id`, `name`.

`tiktoken_encoder` builds a second, faster encoder for a byte-level BPE `tokenizers` file (GPT-2, Llama 3, Qwen2,
SmolLM): the same vocabulary in tiktoken, from the file alone (nothing is downloaded), for `cl-jax prepare`, which
checks it against `tokenizers` on a sample of the corpus (`cl_jax.data.prepare`).
"""
from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from typing import Protocol

import numpy as np

# The `tokenizers` file class lives with the HF checkpoints that carry such files (models may not import data).
from cl_jax.models.hf_tokenizer import BYTE_CHARS, HFTokenizer, require_package


class Tokenizer(Protocol):
  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then `pad`=256, `bos`=257, `eos`=258 (vocab_size 259)."""

  name = "byte"
  num_bytes = 256
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    # Specials and out-of-range ids (a model may sample them) carry no bytes; invalid UTF-8 sequences
    # (a byte model can emit half a character) decode to U+FFFD instead of raising.
    data = ids[(ids >= 0) & (ids < self.num_bytes)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece `.model` file."""

  def __init__(self, path: str):
    spm = require_package("sentencepiece", "sentencepiece", path)
    self.name = os.path.basename(path)
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(f"tokenizer={path!r} has no eos piece; train it with --eos_id >= 0")
    self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else self.eos_id
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def load_tokenizer(spec: str = "byte") -> Tokenizer:
  """`'byte'` (default), the path of a `tokenizers` `.json` / SentencePiece `.model` file, or a Hugging Face
  checkpoint directory (its tokenizer.json, with the eos / bos ids its config.json names)."""
  if spec in ("byte", "", None):
    return ByteTokenizer()
  if not isinstance(spec, str):
    raise TypeError(f"tokenizer={spec!r}: expected 'byte' or a file path")
  if os.path.isdir(spec):
    from cl_jax.models import hf_checkpoint
    tok = hf_checkpoint.load_tokenizer(spec, hf_checkpoint.read_config(spec)
                                       if os.path.exists(os.path.join(spec, "config.json")) else None)
    if tok is None:
      raise FileNotFoundError(f"tokenizer={spec!r}: the directory has no tokenizer.json")
    return tok
  if not os.path.exists(spec):
    raise FileNotFoundError(f"tokenizer={spec!r}: no such file (use 'byte', a tokenizers .json file "
                            "or a sentencepiece .model file)")
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  raise ValueError(f"tokenizer={spec!r}: unknown file type; expected a `.json` (tokenizers) or "
                   "`.model` (sentencepiece) file, or 'byte'")


# ----------------------------------------------------------------------------- tiktoken fast path
#
# Byte-level BPE (Radford et al. 2019; Sennrich et al. 2016) as `tokenizers` runs it: the text is cut at added tokens,
# each piece is split by a regex, each split's UTF-8 bytes are spelled in the byte alphabet (`BYTE_CHARS`), and within
# a split the adjacent pair (a, b) with the lowest index in the file's merge list is merged, leftmost first, until no
# listed pair is left. tiktoken runs the same loop with another pair score: the rank of the merged byte string
# a + b in its table, for any two adjacent parts whose concatenation is in the table, and it returns a split that is
# itself in the table as one token without merging. The two agree when
#   (1) the table's ranks are the token ids and the ids of the merge results never decrease along the merge list
#       (then "lowest merge index" and "lowest rank of the result" order the listed pairs alike),
#   (2) the table holds only tokens `tokenizers` can produce: single bytes, and merge results that the merge list
#       builds from their own bytes (unless the file sets `ignore_merges`, which makes `tokenizers` take a split that
#       is a vocabulary token whole, as tiktoken does -- then every vocabulary token must be a merge result),
#   (3) no pair outside the merge list concatenates to a table token while it is the best pair -- not decidable from
#       the file alone; a vocabulary trained by BPE satisfies it on its own training text, not provably elsewhere.
# (1) and (2) are checked here and a file that fails them is refused; (3) is why `cl-jax prepare` encodes a sample
# of its documents with both and refuses to write a cache when they differ.

BACKENDS = ("auto", "tokenizers", "tiktoken")
# The split pattern of the ByteLevel pre-tokenizer with use_regex=true (GPT-2's, Radford et al. 2019).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# A text the built encoder must reproduce exactly (a split pattern that skips characters fails it).
_ROUND_TRIP = "Hello, world! x=1_000; 日本語 Ünïcödé 🙂\n\n\tcode  ()  {}\r\n  end"


class FastPathUnavailable(ValueError):
  """The tokenizer cannot be run by tiktoken with guaranteed-equal structure; the message says why."""


class TiktokenBPE:
  """A byte-level BPE `tokenizers` file run by tiktoken: `encode(text)`, `encode_batch(texts)` -> np.int32 ids, the
  same as `HFTokenizer.encode` (without a post-processor) wherever the three conditions above hold.
  `dropped`: vocabulary entries left out of tiktoken's table because `tokenizers` never produces them from text."""

  backend = "tiktoken"

  def __init__(self, encoding, *, nfc: bool, dropped: int, threads: int | None = None):
    self._enc = encoding
    self._nfc = nfc
    self.dropped = dropped
    self.threads = threads or min(8, os.cpu_count() or 1)
    # Added tokens are cut out of the text before the regex runs, as `tokenizers` cuts them (prepare encodes plain
    # documents; a special-token string inside one becomes that token in both).
    self._allowed = "all" if encoding.special_tokens_set else set()

  def _prepare(self, text: str) -> str:
    return unicodedata.normalize("NFC", text) if self._nfc else text

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._enc.encode(self._prepare(text), allowed_special=self._allowed,
                                       disallowed_special=()), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids = self._enc.encode_batch([self._prepare(t) for t in texts], num_threads=self.threads,
                                 allowed_special=self._allowed, disallowed_special=())
    return [np.asarray(i, dtype=np.int32) for i in ids]


def _split_pattern(pre: dict | None) -> str:
  """The regex of a byte-level pre-tokenizer: ByteLevel(use_regex) alone, or Split(regex, isolated) then
  ByteLevel(use_regex=false)."""
  def byte_level(p, use_regex):
    return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)
            and bool(p.get("use_regex", True)) == use_regex)
  steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
  if len(steps) == 1 and byte_level(steps[0], True):
    return GPT2_PATTERN
  if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
    split = steps[0]
    pattern = (split.get("pattern") or {}).get("Regex")
    if pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
      return pattern
  raise FastPathUnavailable(f"pre-tokenizer {json.dumps(pre)[:200]}: not a byte-level one tiktoken can run "
                            "(ByteLevel without add_prefix_space, or an isolating Split regex then ByteLevel)")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
  out = []
  for m in merges:
    pair = m.split(" ") if isinstance(m, str) else m
    if len(pair) != 2:
      raise FastPathUnavailable(f"merge {m!r}: not a pair of byte-level tokens")
    out.append((pair[0], pair[1]))
  return out


def _added_tokens(spec: dict, nfc: bool, encode_special: bool) -> dict[str, int]:
  """The added tokens tiktoken cuts out of the text (its `special_tokens`), refused where `tokenizers` would match
  them differently: stripping or whole-word options, a token that is a prefix of another (`tokenizers` takes the
  longest match, tiktoken's alternation the first), or normalised and raw tokens that overlap (`tokenizers` matches
  the raw ones in a first pass)."""
  tokens = []
  for t in spec.get("added_tokens") or []:
    if encode_special and t.get("special"):
      continue  # `encode_special_tokens`: special tokens are encoded as text
    content = t.get("content") or ""
    if not content or t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
      raise FastPathUnavailable(f"added token {content!r}: empty, single_word, lstrip or rstrip")
    if nfc and t.get("normalized") and unicodedata.normalize("NFC", content) != content:
      raise FastPathUnavailable(f"added token {content!r} changes under the NFC normalizer")
    tokens.append((content, int(t["id"]), bool(t.get("normalized"))))
  for a, _, na in tokens:
    for b, _, nb in tokens:
      if a != b and b.startswith(a):
        raise FastPathUnavailable(f"added token {a!r} is a prefix of {b!r}")
      if a != b and na != nb and (a in b or any(a.endswith(b[:k]) for k in range(1, len(b)))):
        raise FastPathUnavailable(f"added tokens {a!r} and {b!r} overlap (one normalized, one not)")
  return {c: i for c, i, _ in tokens}


def tiktoken_encoder(tokenizer, *, threads: int | None = None) -> TiktokenBPE:
  """A tiktoken encoder equivalent in structure to `tokenizer` (an `HFTokenizer`), built from its tokenizer.json
  alone; FastPathUnavailable (or ImportError without tiktoken) saying why not."""
  if not isinstance(tokenizer, HFTokenizer):
    raise FastPathUnavailable(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} is not a tokenizers file")
  tiktoken = require_package("tiktoken", "tiktoken", tokenizer.path)
  spec = json.loads(tokenizer._tok.to_str())
  model = spec.get("model") or {}
  if model.get("type") != "BPE":
    raise FastPathUnavailable(f"model type {model.get('type')!r}, not BPE")
  if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
    raise FastPathUnavailable("BPE with dropout, a continuing-subword prefix or an end-of-word suffix")
  if spec.get("truncation") or spec.get("padding"):
    raise FastPathUnavailable("the file enables truncation or padding")
  norm = spec.get("normalizer")
  if norm and norm.get("type") == "Sequence" and not norm.get("normalizers"):
    norm = None
  if norm and norm.get("type") != "NFC":
    raise FastPathUnavailable(f"normalizer {norm.get('type')!r} (only none or NFC is run outside tokenizers)")
  nfc = norm is not None
  pattern = _split_pattern(spec.get("pre_tokenizer"))
  specials = _added_tokens(spec, nfc, bool(getattr(tokenizer._tok, "encode_special_tokens", False)))
  vocab: dict[str, int] = model.get("vocab") or {}
  if any(ch not in vocab for ch in BYTE_CHARS):
    raise FastPathUnavailable("the vocabulary lacks some of the 256 byte-level characters: not a byte-level BPE")
  if len(set(vocab.values())) != len(vocab):
    raise FastPathUnavailable("two vocabulary entries share an id")
  byte_of = {ch: b for b, ch in enumerate(BYTE_CHARS)}
  pairs = _merge_pairs(model.get("merges") or [])
  made, last = set(), -1
  for k, (a, b) in enumerate(pairs):
    t = vocab.get(a + b)
    if a not in vocab or b not in vocab or t is None:
      raise FastPathUnavailable(f"merge {k} ({a!r}, {b!r}) joins or makes a token outside the vocabulary")
    if t < last:  # condition (1): merge priority = rank of the result = its id
      raise FastPathUnavailable(f"merge {k} ({a!r}, {b!r}) makes id {t}, lower than the id {last} made before "
                                "it: merge order and token ids disagree")
    made.add(a + b)
    last = t
  ignore_merges = bool(model.get("ignore_merges"))
  added = set(specials)
  table = {w: i for w, i in vocab.items() if len(w) == 1 and w in byte_of}
  candidates = [w for w in vocab if len(w) > 1 and all(ch in byte_of for ch in w) and w not in added]
  if ignore_merges:
    orphans = [w for w in candidates if w not in made]
    if orphans:
      raise FastPathUnavailable(f"{len(orphans)} vocabulary tokens (e.g. {orphans[0]!r}) are made by no merge, "
                                "which tiktoken could form inside a word and tokenizers cannot")
    table.update({w: vocab[w] for w in candidates})
  else:
    # Condition (2): tiktoken returns a split found in its table whole; `tokenizers` only if its merges build it
    # from that split's bytes. A bare BPE over the byte alphabet (no pre-tokenizer) encodes each token's own
    # spelling: the tokens it does not give back whole are left out of the table.
    tokenizers = require_package("tokenizers", "tokenizers", tokenizer.path)
    bare = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, pairs, ignore_merges=False))
    words = [w for w in candidates if w in made]
    enc = getattr(bare, "encode_batch_fast", bare.encode_batch)(words, add_special_tokens=False)
    table.update({w: vocab[w] for w, e in zip(words, enc) if e.ids == [vocab[w]]})
  ranks = {bytes(byte_of[ch] for ch in w): i for w, i in table.items()}
  dropped = len(vocab) - len(table) - len(added & set(vocab))
  try:
    encoding = tiktoken.Encoding(f"cl_jax:{tokenizer.name}", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
  except Exception as e:  # noqa: BLE001 -- a pattern tiktoken's regex engine rejects, whatever it raises
    raise FastPathUnavailable(f"tiktoken refuses the split pattern {pattern!r}: {e}") from None
  fast = TiktokenBPE(encoding, nfc=nfc, dropped=dropped, threads=threads)
  if fast._enc.decode(fast.encode(_ROUND_TRIP).tolist()) != _ROUND_TRIP:
    raise FastPathUnavailable(f"the split pattern {pattern!r} does not cover every character")
  return fast


def backend_name(tokenizer) -> str:
  """The encoder a tokenizer's own `encode` runs: `tokenizers` for a tokenizer.json, else its kind."""
  if isinstance(tokenizer, HFTokenizer):
    return "tokenizers"
  return {ByteTokenizer: "byte", SentencePieceTokenizer: "sentencepiece"}.get(type(tokenizer),
                                                                              type(tokenizer).__name__)


__all__ = ["BACKENDS", "ByteTokenizer", "FastPathUnavailable", "HFTokenizer", "SentencePieceTokenizer",
           "TiktokenBPE", "Tokenizer", "backend_name", "load_tokenizer", "tiktoken_encoder"]
