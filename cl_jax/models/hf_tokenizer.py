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

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of many texts at once (the Rust tokenizer runs them in parallel)."""
    return [np.asarray(e.ids, dtype=np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


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


__all__ = ["CHAT_TEMPLATE_FILE", "HFTokenizer", "SPECIAL_TOKENS_MAP_FILE", "TOKENIZER_CONFIG_FILE",
           "chat_template_source", "read_json_object", "require_package", "special_tokens"]
