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
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

# The `tokenizers` file class lives with the HF checkpoints that carry such files (models may not import data).
from cl_jax.models.hf_tokenizer import HFTokenizer, require_package


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


__all__ = ["ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
