"""A Hugging Face `tokenizers` JSON file as a cl_jax tokenizer (`encode`, `decode`, `vocab_size`, pad / bos / eos).

It lives with the models because a Hugging Face checkpoint carries its tokenizer.json beside its weights:
`cl_jax.models.hf_checkpoint` loads both, and `cl_jax.data.tokenizer` offers this class for a bare .json file.
The `tokenizers` package is imported only when a file is opened, so it is no dependency of the rest.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

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


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file. Specials are found by their usual spellings unless given: a
  checkpoint's config.json names its eos / bos / pad ids (`cl_jax.models.hf_checkpoint` passes them)."""

  def __init__(self, path: str, *, eos_id: int | None = None, bos_id: int | None = None,
               pad_id: int | None = None):
    tokenizers = require_package("tokenizers", "tokenizers", path)
    self.path = path
    self.name = os.path.basename(path)
    self._tok = tokenizers.Tokenizer.from_file(path)
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

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of many texts at once (the Rust tokenizer runs them in parallel)."""
    return [np.asarray(e.ids, dtype=np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


__all__ = ["HFTokenizer", "require_package"]
