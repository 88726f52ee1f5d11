"""A Hugging Face `tokenizers` JSON file as a cl_jax tokenizer (`encode`, `decode`, `vocab_size`, pad / bos / eos).

It lives with the models because a Hugging Face checkpoint carries its tokenizer.json beside its weights:
`cl_jax.models.hf_checkpoint` loads both, and `cl_jax.data.tokenizer` offers this class for a bare .json file.
The `tokenizers` package is imported only when a file is opened, so it is no dependency of the rest.
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def require_package(module: str, package: str, path: str):
  """`module`, imported now; ImportError naming the pip package (and the file that needed it) when missing."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"tokenizer={path!r} needs the `{package}` package, which is not installed: "
                      f"`pip install {package}` (or use tokenizer='byte', which needs nothing)") from e


def _special_id(lookup, names: Sequence[str], what: str, path: str, default: int | None = None) -> int:
  for n in names:
    i = lookup(n)
    if i is not None and i >= 0:
      return int(i)
  if default is not None:
    return default
  raise ValueError(f"tokenizer={path!r} has no {what} token (looked for {list(names)})")


# End-of-text spellings, in the order they are looked for: the token a family's pre-training corpus puts between
# documents (GPT-2 / Qwen <|endoftext|>, Llama 3 <|end_of_text|>, Llama 2 / Mistral </s>, Gemma <eos>).
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _byte_chars() -> list[str]:
  """The byte-level alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other bytes for the
  code points 256, 257, ... in byte order, so every byte string is a printable string without spaces."""
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  out, extra = [], 0
  for b in range(256):
    if b in printable:
      out.append(chr(b))
    else:
      out.append(chr(256 + extra))
      extra += 1
  return out


# Byte-level BPE files (GPT-2, Llama 3, Qwen) spell every byte with this alphabet: `tokenizer.json`'s vocabulary
# strings decode to bytes through it (`cl_jax.models.decoding.token_bytes`, `cl_jax.lm.vocab`).
BYTE_CHARS = _byte_chars()


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file. Specials are found by their usual spellings unless given: a
  checkpoint's config.json names its eos / bos / pad ids (`cl_jax.models.hf_checkpoint` passes them).

  `separator_id` is the token packed between documents of a corpus (`cl_jax.data.text.pack`): the family's
  end-of-text token (`END_OF_TEXT`) when the vocabulary has one, else eos. An instruct model's config.json often
  names its chat end-of-turn token as eos (Qwen2.5-Instruct: <|im_end|>; Llama-3-Instruct lists <|eot_id|> too),
  which is what generation stops at but not what its pre-training put between documents; `separator` (a token
  string, the `lm.doc_separator` key) overrides the choice."""

  def __init__(self, path: str, *, eos_id: int | None = None, bos_id: int | None = None,
               pad_id: int | None = None, separator: str | None = None, tokenizer=None):
    tokenizers = require_package("tokenizers", "tokenizers", path)
    self.path = path
    self.name = os.path.basename(path)
    # `tokenizer`: an in-memory `tokenizers.Tokenizer` (e.g. converted from a SentencePiece model); `path` then
    # names where it came from.
    self._tok = tokenizer if tokenizer is not None else tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    lookup = self._tok.token_to_id
    self.eos_id = int(eos_id) if eos_id is not None else _special_id(
        lookup, ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]"), "end-of-text", path)
    self.bos_id = int(bos_id) if bos_id is not None else _special_id(
        lookup, ("<s>", "<|startoftext|>", "<|begin_of_text|>", "<bos>", "[CLS]"), "bos", path,
        default=self.eos_id)
    # Padding positions are masked out of every loss, so reusing eos as pad is harmless.
    self.pad_id = int(pad_id) if pad_id is not None else _special_id(lookup, ("<pad>", "[PAD]"), "pad", path,
                                                                      default=self.eos_id)
    self.separator_id = self.token_id(separator, "separator") if separator else _special_id(
        lookup, END_OF_TEXT, "end-of-text", path, default=self.eos_id)

  def save(self, file: str) -> None:
    """Writes the tokenizer as a `tokenizers` JSON file (a converted SentencePiece model's tokenizer.json)."""
    self._tok.save(file)

  def token_id(self, token: str, what: str = "token") -> int:
    """The id of a token string; ValueError naming the tokenizer when its vocabulary has no such token."""
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"{what}={token!r}: tokenizer {self.path!r} has no such token")
    return int(i)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(`encode(text)`, each token's [start, end) character span in `text`): what a chat template's loss mask is
    read from (`cl_jax.lm.templates.encode_chat`)."""
    e = self._tok.encode(text, add_special_tokens=False)
    return np.asarray(e.ids, dtype=np.int32), [tuple(o) for o in e.offsets]

  def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
    """The ids of `text`; `add_special_tokens=True` applies the file's post-processor (e.g. a Llama bos), as a
    transformers tokenizer's default `encode` does (lm-eval's HF model encodes so: `cl_jax.eval.lm_engine`)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=bool(add_special_tokens)).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of many texts at once (the Rust tokenizer runs them in parallel, without the GIL).
    `encode_batch_fast` (tokenizers >= 0.20) gives the same ids without computing each token's character offsets,
    about 20% of `encode_batch`'s CPU time (`results/data_throughput.md`)."""
    batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
    return [np.asarray(e.ids, dtype=np.int32) for e in batch(list(texts), add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------- chat templates
# Where a checkpoint directory keeps its chat template and special-token strings (rendered by cl_jax.lm.templates).

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {'content': ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def special_tokens(path: str) -> dict[str, str]:
  """{'bos_token': ..., 'eos_token': ..., ...}: the `*_token` strings of a checkpoint directory's
  tokenizer_config.json, over those of its special_tokens_map.json (transformers' `special_tokens_map`)."""
  out: dict[str, str] = {}
  for name in (SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE):
    cfg = read_json_object(os.path.join(path, name))
    for key, value in cfg.items():
      if key.endswith("_token") and _token_text(value):
        out[key] = _token_text(value)
  return out


def read_json_object(file: str) -> dict:
  """A JSON object file ({} when it does not exist); ValueError naming the file when it is not one."""
  if not os.path.exists(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{file}: not readable JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
  return cfg


def chat_template_source(path: str) -> tuple[str | None, str | None]:
  """(template source, the file it came from) of a checkpoint directory, or (None, None).

  Where transformers looks: `chat_template.jinja` (written by transformers >= 4.50 / 5), else
  tokenizer_config.json's `chat_template` (a string, or a list of named templates: the one named 'default').
  """
  jinja = os.path.join(path, CHAT_TEMPLATE_FILE)
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read(), jinja
  config = os.path.join(path, TOKENIZER_CONFIG_FILE)
  source = read_json_object(config).get("chat_template")
  if isinstance(source, list):  # several named templates: the default one
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    source = named.get("default")
  if isinstance(source, str) and source.strip():
    return source, config
  return None, None


# ----------------------------------------------------------------------------------------------- SentencePiece
# A checkpoint without tokenizer.json (Llama 2, Mistral v0.1, ...) ships a SentencePiece `tokenizer.model` (Kudo &
# Richardson 2018). It is converted here to a `tokenizers` pipeline with no `sentencepiece` / `protobuf` package:
# the file is a protobuf `ModelProto`, of which a few fields are read by hand from the wire format
#   ModelProto: 1 pieces (repeated SentencePiece: 1 piece str, 2 score float, 3 type enum), 2 trainer_spec,
#               3 normalizer_spec
#   TrainerSpec: 3 model_type (1 unigram, 2 bpe), 35 byte_fallback, 40 unk_id
#   NormalizerSpec: 2 precompiled_charsmap, 3 add_dummy_prefix
# (sentencepiece_model.proto). Piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.

SPM_FILE = "tokenizer.model"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    b = buf[i]
    value |= (b & 0x7F) << shift
    i += 1
    if not b & 0x80:
      return value, i
    shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
  """(field number, wire type, value) of a protobuf message: ints for varints, bytes for length-delimited
  fields, raw 4 / 8 bytes for fixed-width ones."""
  out, i = [], 0
  while i < len(buf):
    key, i = _varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 2:
      n, i = _varint(buf, i)
      if i + n > len(buf):
        raise ValueError(f"field {field} is truncated")
      value, i = buf[i:i + n], i + n
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    out.append((field, wire, value))
  return out


def read_sentencepiece(path: str) -> dict:
  """The parts of a SentencePiece model file a tokenizer needs: pieces [(piece, score, type)], model_type
  ('unigram' | 'bpe'), byte_fallback, unk_id, precompiled_charsmap, add_dummy_prefix."""
  import struct
  with open(path, "rb") as f:
    data = f.read()
  try:
    pieces, trainer, normalizer = [], {}, {}
    for field, _, value in _fields(data):
      if field == 1:
        piece = {1: b"", 2: struct.pack("<f", 0.0), 3: 1}
        piece.update({f: v for f, _, v in _fields(value)})
        pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], int(piece[3])))
      elif field == 2:
        trainer = {f: v for f, _, v in _fields(value)}
      elif field == 3:
        normalizer = {f: v for f, _, v in _fields(value)}
  except (IndexError, ValueError, UnicodeDecodeError, struct.error) as e:
    raise ValueError(f"{path}: not a SentencePiece model file ({e})") from None
  kind = {1: "unigram", 2: "bpe"}.get(int(trainer.get(3, 1)))
  if kind is None or not pieces:
    raise ValueError(f"{path}: a SentencePiece model of type {trainer.get(3)} with {len(pieces)} pieces; "
                     "unigram and bpe models are supported")
  return {"pieces": pieces, "model_type": kind, "byte_fallback": bool(trainer.get(35, 0)),
          "unk_id": int(trainer.get(40, 0)), "precompiled_charsmap": normalizer.get(2, b""),
          "add_dummy_prefix": bool(normalizer.get(3, 1))}


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
  """BPE merges from a SentencePiece BPE vocabulary, ranked as transformers ranks them when it converts such a
  model: every split of a piece into two vocabulary pieces, ordered by the merged piece's id (SentencePiece
  lists pieces in merge order), then by the lengths of the two halves."""
  merges = []
  for piece, ident in vocab.items():
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    merges += [(ident, left, right) for left, right in local]
  merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
  return [(left, right) for _, left, right in merges]


def sentencepiece_tokenizer(path: str, *, legacy: bool = False, add_prefix_space: bool = True):
  """A `tokenizers.Tokenizer` equivalent to a SentencePiece `tokenizer.model`.

  bpe (Llama 2, Mistral): the pipeline transformers 5's LlamaTokenizer builds from such a file -- BPE over the
    pieces (merges from `_bpe_merges`, unknown characters as <0xXX> byte pieces when the model has byte_fallback),
    a Metaspace pre-tokenizer replacing spaces by U+2581 and prepending one to the first piece (`legacy=True`:
    to every piece split off by special tokens; `add_prefix_space=False`: none), no normalizer.
  unigram (T5-style): the `tokenizers` package's SentencePiece recipe -- the model's precompiled normalizer,
    runs of spaces collapsed, Metaspace with the prefix.
  Control and unknown pieces become special added tokens, user-defined pieces plain added ones (they are matched
  in text before the model runs, as SentencePiece does)."""
  tokenizers = require_package("tokenizers", "tokenizers", path)
  from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
  spm = read_sentencepiece(path)
  pieces = spm["pieces"]
  prepend = "never" if not (add_prefix_space and spm["add_dummy_prefix"]) else "always" if legacy else "first"
  if spm["model_type"] == "bpe":
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, _bpe_merges(vocab), unk_token=pieces[spm["unk_id"]][0],
                                          fuse_unk=True, byte_fallback=spm["byte_fallback"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend != "never":
      steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
  else:
    tok = tokenizers.Tokenizer(models.Unigram([(p, s) for p, s, _ in pieces], spm["unk_id"], spm["byte_fallback"]))
    steps = [normalizers.Precompiled(spm["precompiled_charsmap"])] if spm["precompiled_charsmap"] else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend)
  tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, _, t in pieces if t in (2, 3)])
  tok.add_tokens([AddedToken(p, normalized=False, special=False) for p, _, t in pieces if t == 4])
  return tok


__all__ = ["BYTE_CHARS", "CHAT_TEMPLATE_FILE", "HFTokenizer", "SPECIAL_TOKENS_MAP_FILE", "TOKENIZER_CONFIG_FILE",
           "SPM_FILE", "chat_template_source", "read_json_object", "read_sentencepiece", "require_package",
           "sentencepiece_tokenizer", "special_tokens"]
