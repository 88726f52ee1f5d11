"""Decoding token ids: stop-string automata, length buckets and batched KV-cache decoding (`sampling.decode`).

The rules (buckets, left padding, stop strings matched on the byte stream, per-row keys) are described in
`cl_jax.lm.generation`, which re-exports everything here and adds text in / text out, chat and the commands. This
part lives with the models so that the evaluation engine (`cl_jax.eval.lm_engine`, a layer below `cl_jax.lm`)
decodes with the very same code.
"""
from __future__ import annotations

import json
from typing import NamedTuple, Sequence

import jax
import numpy as np

from cl_jax.errors import ConfigError
from cl_jax.models.hf_tokenizer import BYTE_CHARS

DEFAULT_BUCKET_MIN = 16


# ----------------------------------------------------------------------------- stop strings

def token_bytes(tokenizer, size: int) -> list[bytes]:
  """The bytes each id adds to the decoded text (b'' for specials and ids past the tokenizer), for `size` ids.

  Byte tokenizers: their bytes. A `tokenizers` file: byte-level BPE vocabularies through the GPT-2 byte alphabet;
  SentencePiece-style ones with U+2581 as a space and `<0xNN>` pieces as one byte (the decoder's strip of the very
  first space of a text is ignored: it only matters for a stop string at the very start)."""
  out = [b""] * size
  # Duck-typed (the tokenizer classes live in layers above): a byte-level BPE (`cl_jax.lm.vocab.ByteBPETokenizer`)
  # lists its tokens' bytes; the byte tokenizer (`cl_jax.data.tokenizer.ByteTokenizer`) has num_bytes = 256.
  if isinstance(getattr(tokenizer, "token_bytes", None), list):
    for i, b in enumerate(tokenizer.token_bytes[:size]):
      out[i] = bytes(b)
    return out
  if getattr(tokenizer, "name", None) == "byte" and getattr(tokenizer, "num_bytes", None) == 256:
    for i in range(min(size, 256)):
      out[i] = bytes([i])
    return out
  path = getattr(tokenizer, "path", None)
  if path is None or not path.endswith(".json"):
    # Any other tokenizer: each id decoded alone (exact unless a character spans several ids).
    for i in range(min(size, tokenizer.vocab_size)):
      out[i] = tokenizer.decode([i]).encode("utf-8")
    return out
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
  char_byte = {ch: b for b, ch in enumerate(BYTE_CHARS)}
  for s, i in spec["model"]["vocab"].items():
    if i >= size:
      continue
    if byte_level:
      out[i] = bytes(char_byte[ch] if ch in char_byte else 0 for ch in s) if all(ch in char_byte for ch in s) \
          else s.encode("utf-8")
    elif s.startswith("<0x") and s.endswith(">") and len(s) == 6:
      out[i] = bytes([int(s[3:5], 16)])
    else:
      out[i] = s.replace("\u2581", " ").encode("utf-8")
  for t in spec.get("added_tokens", []):
    if int(t["id"]) < size:
      out[int(t["id"])] = b"" if t.get("special", True) else t["content"].encode("utf-8")
  return out


def _automaton(pattern: bytes) -> np.ndarray:
  """The Knuth-Morris-Pratt automaton of `pattern` (m bytes): delta [m + 1, 256], state q = length of the longest
  suffix of the stream that is a prefix of the pattern; reaching q = m is a match (state m then behaves as its
  longest proper border, so overlapping matches are found too)."""
  m = len(pattern)
  delta = np.zeros((m + 1, 256), np.int32)
  delta[0, pattern[0]] = 1
  border = 0  # the state the automaton would be in after pattern[1:q]
  for q in range(1, m + 1):
    delta[q] = delta[border]
    if q < m:
      delta[q, pattern[q]] = q + 1
      border = delta[border, pattern[q]]
  return delta


class StopStrings:
  """Stop strings as per-token automaton tables (module docstring): next [S, V, M] and hit [S, V, M], M = the
  longest stop string's byte length + 1, rounded up to a power of two (at least 16). Feeding token v in state q
  moves stop string s to next[s, v, q]; hit says whether s was completed on the way."""

  def __init__(self, strings: Sequence[str], tokenizer, vocab_size: int):
    self.strings = [s for s in strings]
    for s in self.strings:
      if not isinstance(s, str) or not s:
        raise ConfigError(f"stop={s!r}: stop strings must be non-empty strings")
    patterns = [s.encode("utf-8") for s in self.strings]
    # M rounded up to a power of two (at least 16): the tables' shape is part of the decoding program, so stop
    # strings of other lengths reuse it (the states past a pattern's own length are never reached).
    width = max(16, 1 << max(len(p) for p in patterns).bit_length())
    toks = token_bytes(tokenizer, vocab_size)
    longest = max(1, max(len(b) for b in toks))
    data = np.zeros((vocab_size, longest), np.int32)
    lengths = np.asarray([len(b) for b in toks])
    for i, b in enumerate(toks):
      data[i, :len(b)] = np.frombuffer(b, np.uint8)
    self.next = np.zeros((len(patterns), vocab_size, width), np.int32)
    self.hit = np.zeros((len(patterns), vocab_size, width), bool)
    for j, p in enumerate(patterns):
      delta = _automaton(p)
      m = len(p)
      # Every token from every state at once, one byte position at a time (tokens shorter than it stand still).
      state = np.broadcast_to(np.arange(m + 1), (vocab_size, m + 1)).copy()
      hit = np.zeros((vocab_size, m + 1), bool)
      for k in range(longest):
        live = (lengths > k)[:, None]
        moved = delta[state, data[:, k:k + 1]]
        state = np.where(live, moved, state)
        hit |= live & (moved == m)
      self.next[j, :, :m + 1] = state
      self.hit[j, :, :m + 1] = hit

  def initial(self, prompts: Sequence[np.ndarray]) -> np.ndarray:
    """int32 [B, S]: each stop string's automaton state after a row's prompt (matches inside it do not count)."""
    out = np.zeros((len(prompts), len(self.strings)), np.int32)
    which = np.arange(len(self.strings))
    for r, ids in enumerate(prompts):
      for t in np.asarray(ids).reshape(-1):
        out[r] = self.next[which, int(t), out[r]]
    return out

  def cut(self, text: str) -> str:
    """`text` up to and including the first stop string in it (unchanged when there is none)."""
    ends = [text.find(s) + len(s) for s in self.strings if s in text]
    return text[:min(ends)] if ends else text


# ----------------------------------------------------------------------------- batching

def bucket_of(n: int, buckets: Sequence[int] | None = None) -> int:
  """The padded length of an n-token prompt: the smallest of `buckets` >= n, else the next power of two (at least
  DEFAULT_BUCKET_MIN)."""
  for b in sorted(buckets or ()):
    if b >= n:
      return int(b)
  return max(DEFAULT_BUCKET_MIN, 1 << max(0, int(n) - 1).bit_length())


def _rows(n: int, batch_size: int) -> int:
  """Rows a batch of n prompts is padded to: the next power of two, at most batch_size."""
  return min(int(batch_size), 1 << max(0, n - 1).bit_length())


def check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, batch_size, buckets) -> None:
  """ConfigError naming the first bad setting (before any work)."""
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
  if not np.isfinite(temperature) or temperature < 0:
    raise ConfigError(f"temperature={temperature!r}: must be >= 0 (0 = greedy)")
  if not isinstance(top_k, int) or top_k < 0:
    raise ConfigError(f"top_k={top_k!r}: must be an integer >= 0 (0 = off)")
  if not 0 < top_p <= 1:
    raise ConfigError(f"top_p={top_p!r}: must be in (0, 1] (1 = off)")
  if not np.isfinite(repetition_penalty) or repetition_penalty <= 0:
    raise ConfigError(f"repetition_penalty={repetition_penalty!r}: must be > 0 (1 = off)")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f"batch_size={batch_size!r}: must be an integer >= 1")
  if buckets is not None and any(not isinstance(b, int) or b < 1 for b in buckets):
    raise ConfigError(f"buckets={list(buckets)!r}: must be positive integers")


class Output(NamedTuple):
  text: str          # the completion, cut after a stop string
  ids: np.ndarray    # its token ids, up to and including the one that stopped it (eos or a stop string's last)
  stopped: str       # 'eos', 'stop' or 'length'


def generate_ids(m, prompts: Sequence[np.ndarray], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
                 seed: int = 0, batch_size: int = 8, buckets: Sequence[int] | None = None,
                 ignore_eos: bool = False, stop_in_prompt: bool = True, fixed_rows: bool = False) -> list[Output]:
  """Continues token-id prompts (`cl_jax.lm.generation`'s docstring); one `Output` per prompt, in order.

  m: a `cl_jax.lm.generation.Model` (or anything with its fields model, params, tokenizer, eos_ids, pad_id,
  max_len, vocab_size).

  stop_in_prompt=False: a stop string must lie wholly in the new tokens (lm-eval's rule: its stop criterion and its
  cut read only the generated text), not start in the prompt as transformers' StopStringCriteria allows."""
  from cl_jax.models.sampling import decode
  check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, batch_size, buckets)
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  vocab = m.vocab_size
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ConfigError(f"prompt {i}: empty (nothing to continue)")
    if len(p) + max_new_tokens > m.max_len:
      raise ConfigError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceed the model's "
                        f"{m.max_len} positions")
    if p.min() < 0 or p.max() >= vocab:
      raise ConfigError(f"prompt {i}: token ids must be in [0, {vocab})")
  stops = StopStrings(stop, m.tokenizer, vocab) if stop else None
  eos = () if ignore_eos else m.eos_ids
  key = jax.random.PRNGKey(int(seed))
  groups: dict[int, list[int]] = {}
  for i, p in enumerate(prompts):
    groups.setdefault(bucket_of(len(p), buckets), []).append(i)
  results: list[Output | None] = [None] * len(prompts)
  for width, members in sorted(groups.items()):
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      rows = batch_size if fixed_rows else _rows(len(chunk), batch_size)
      index = chunk + [chunk[0]] * (rows - len(chunk))  # filler rows repeat the first prompt; their output is dropped
      tokens = np.full((rows, width), m.pad_id, np.int32)
      valid = np.zeros((rows, width), np.int32)
      for r, i in enumerate(index):
        tokens[r, width - len(prompts[i]):] = prompts[i]
        valid[r, width - len(prompts[i]):] = 1
      tables = None if stops is None else (
          stops.next, stops.hit, stops.initial([prompts[i] for i in index]) if stop_in_prompt
          else np.zeros((rows, len(stops.strings)), np.int32))
      new, lengths = decode(m.model, m.params, tokens, valid, key, np.asarray(index), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, eos_ids=eos, pad_id=m.pad_id, stops=tables)
      new, lengths = np.asarray(new), np.asarray(lengths)
      for r, i in enumerate(chunk):
        ids = new[r, :lengths[r]]
        text = m.tokenizer.decode(ids)
        if len(ids) and int(ids[-1]) in eos:
          why = "eos"
        elif stops is not None and (len(ids) < max_new_tokens or any(s in text for s in stops.strings)):
          why = "stop"
        else:
          why = "length"
        results[i] = Output(stops.cut(text) if stops is not None else text, ids, why)
  return results


__all__ = ["DEFAULT_BUCKET_MIN", "Output", "StopStrings", "bucket_of", "check_settings", "generate_ids",
           "token_bytes"]
