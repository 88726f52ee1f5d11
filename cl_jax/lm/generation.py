"""Text in, text out: `generate(texts, ...)`, `chat`, and the `cl-jax generate` / `cl-jax chat` commands.

    model = generation.load("path/to/hf_dir_or_lm_workdir")
    generation.generate(["Once upon a time"], model, max_new_tokens=32, top_p=0.9, temperature=0.8,
                        stop=["\\n\\n"])

Decoding is `cl_jax.models.sampling.decode`: one jitted prefill + `lax.while_loop` over the new tokens, with the
logits processors transformers applies, in its order: repetition penalty (CTRL, Keskar et al. 2019), then greedy
argmax, or temperature, top-k, top-p (nucleus, Holtzman et al. 2020) and a draw.

Buckets. A prompt of n tokens is left-padded to its bucket: the smallest entry of `buckets` >= n (default: powers
of two from 16), and a batch of prompts to the next power of two rows (at most `batch_size`). The padding is hidden
from attention and every row keeps its own positions (the cache's `valid` / `offset`), so a padded prompt decodes
exactly as it would alone. A program is compiled per (bucket, rows, max_new_tokens, decoding mode), so a new prompt
length within a bucket reuses the compiled one (`sampling.compilations()` counts them).

Stop strings. Each stop string s is matched on the byte stream of the decoded tokens (the prompt's, then the new
ones) by a Knuth-Morris-Pratt automaton whose per-token transitions are tabulated on the host (`StopStrings`): a row
stops as soon as a token completes s (that token may run past the end of s). This is transformers' StopStringCriteria
rule: a match must overlap the last token, so a stop string inside the prompt stops nothing, but one that starts in
the prompt and ends in the new tokens does. As in transformers, the returned ids keep that last token; the returned
text is cut right after the stop string (the stop string is kept, what the last token adds beyond it is not). A row
also stops at an end-of-sequence id (the checkpoint's generation_config.json / config.json `eos_token_id`s).

Row r of a call draws token i with the key fold_in(fold_in(PRNGKey(seed), r), i): a prompt's sample depends on the
seed and its index, never on its batch mates, its bucket or the batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.errors import ConfigError

DEFAULT_BUCKET_MIN = 16


# ----------------------------------------------------------------------------- the model to generate with

class Model(NamedTuple):
  """What generation needs: the model, its params, tokenizer, chat template, stop ids and where it came from."""
  model: Any
  params: Any
  tokenizer: Any
  template: Any
  eos_ids: tuple
  pad_id: int
  path: str
  max_len: int
  vocab_size: int


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, list) else [value])]


def _read_json(file: str) -> dict:
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"--model: cannot read {file}: {e}") from None


def _from_hf(path: str) -> Model:
  from cl_jax.lm.templates import template_for
  from cl_jax.models import hf_checkpoint
  hf_checkpoint.check(path, "--model")
  loaded = hf_checkpoint.load(path)
  tok = loaded.tokenizer
  gen_file = os.path.join(path, "generation_config.json")
  gen = _read_json(gen_file) if os.path.exists(gen_file) else {}
  # generation_config.json's eos ids are the ones transformers' generate stops at; config.json's otherwise.
  eos = _ids(gen.get("eos_token_id", loaded.hf_config.get("eos_token_id"))) or [int(tok.eos_id)]
  pad = gen.get("pad_token_id", loaded.hf_config.get("pad_token_id"))
  pad = _ids(pad)[0] if _ids(pad) else eos[0]
  return Model(loaded.model, loaded.params, tok, template_for(tok, path), tuple(eos), int(pad), path,
               int(loaded.config.max_len), int(loaded.config.vocab_size))


def _from_workdir(path: str, run: dict) -> Model:
  """A finished cl_jax LM or CIT run: its HF export (`<workdir>/hf`: the kept model of an LM run, the final model
  of a CIT run, with the tokenizer and chat template it trained with) when there is one, else the params of its
  last task-boundary checkpoint: an LM run's with its tokenizer (`lm.tokenizer`), a CIT run's byte model with the
  plain template it trained with (its architecture from results.json's "model"); adapters folded in."""
  import ml_collections
  from cl_jax.lm.templates import PlainTemplate
  if os.path.isfile(os.path.join(path, "hf", "config.json")):
    return _from_hf(os.path.join(path, "hf"))
  kind = run.get("kind")
  if kind not in ("lm", "cit"):
    raise ConfigError(f"--model={path!r}: a cl_jax run of kind {kind!r}; generation reads LM and CIT runs "
                      "(kind 'lm' or 'cit') or Hugging Face checkpoint directories")
  c = ml_collections.ConfigDict(run)
  if c.lm.get("init_from"):
    raise ConfigError(f"--model={path!r}: this run imported {c.lm.init_from} but has no hf/ export; rerun it with "
                      "lm.export_hf=True, or pass its hf/ directory")
  if kind == "cit":
    from cl_jax.data.tokenizer import ByteTokenizer
    from cl_jax.lm import cit
    if "lora_per_task" in cit.strategy_names(c):
      raise ConfigError(f"--model={path!r}: a lora_per_task run keeps one adapter per task, chosen per prompt by "
                        "its router; generation needs a single model")
    record = _read_json(os.path.join(path, "results.json")) if os.path.isfile(
        os.path.join(path, "results.json")) else {}
    if "model" not in record:
      raise ConfigError(f"--model={path!r}: a CIT run with no model record in results.json (the run has not "
                        "finished, or finished before CIT runs recorded their model); run it to its end")
    cfg, tok = cit.model_config_of(record["model"]), ByteTokenizer()
    model, params = _boundary_params(path, cfg, c)
    return Model(model, params, tok, PlainTemplate(), (int(tok.eos_id),), int(tok.pad_id), path,
                 int(cfg.max_len), int(cfg.vocab_size))
  from cl_jax.data.tokenizer import load_tokenizer
  from cl_jax.lm.runner import model_config
  # The stages before adaptation change the tokenizer (vocab.extend) or the positions (long_context): their
  # models are not `model_config(c)`'s, so they are refused rather than loaded wrongly.
  if int(c.get("vocab", {}).get("extend", 0) or 0) or int(c.get("long_context", {}).get("seq_len", 0) or 0):
    raise ConfigError(f"--model={path!r}: a run with a vocab.extend / long_context stage; generation reads plain "
                      "LM runs and Hugging Face directories")
  tok = load_tokenizer(c.lm.tokenizer)
  cfg = model_config(c, tok.vocab_size)
  model, params = _boundary_params(path, cfg, c)
  return Model(model, params, tok, PlainTemplate(), (int(tok.eos_id),), int(tok.pad_id), path, int(cfg.max_len),
               int(cfg.vocab_size))


def _boundary_params(path: str, cfg, c):
  """(model, params) of `cfg` from a run's last task-boundary checkpoint, LoRA / O-LoRA adapters folded into the
  base (`c`: the run's config, for the adapters' scale); ConfigError when the shapes are another model's."""
  from cl_jax.checkpoint import boundary_params
  from cl_jax.models.transformer import abstract_lm
  try:
    params = boundary_params(path)
  except FileNotFoundError as e:
    raise ConfigError(f"--model={path!r}: {e}") from None
  if isinstance(params, dict) and "base" in params:  # base + LoRA adapter(s): folded into plain params
    from cl_jax.strategies.lora import merged_params
    params = merged_params(params, c)
  model, abstract = abstract_lm(cfg)
  try:
    same = jax.tree.map(lambda a, x: tuple(a.shape) == tuple(np.shape(x)), abstract, params)
  except ValueError as e:  # another tree structure
    raise ConfigError(f"--model={path!r}: its checkpoint does not hold the params of its config's model: {e}") from None
  if not all(jax.tree.leaves(same)):
    raise ConfigError(f"--model={path!r}: its checkpoint's param shapes differ from its config's model")
  return model, jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), abstract, params)


def load(path: str) -> Model:
  """A Hugging Face checkpoint directory (config.json with a `model_type`) or a finished cl_jax LM / CIT run's
  workdir."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.isfile(config_file):
    raise ConfigError(f"--model={path!r}: expected a Hugging Face checkpoint directory (config.json + safetensors) "
                      "or a cl_jax LM / CIT run directory (config.json + checkpoints/)")
  cfg = _read_json(config_file)
  if "model_type" in cfg:
    return _from_hf(path)
  return _from_workdir(path, cfg)


# ----------------------------------------------------------------------------- stop strings

def token_bytes(tokenizer, size: int) -> list[bytes]:
  """The bytes each id adds to the decoded text (b'' for specials and ids past the tokenizer), for `size` ids.

  Byte tokenizers: their bytes. A `tokenizers` file: byte-level BPE vocabularies through the GPT-2 byte alphabet;
  SentencePiece-style ones with U+2581 as a space and `<0xNN>` pieces as one byte (the decoder's strip of the very
  first space of a text is ignored: it only matters for a stop string at the very start)."""
  from cl_jax.data.tokenizer import ByteTokenizer
  from cl_jax.lm.vocab import BYTE_CHARS, ByteBPETokenizer
  out = [b""] * size
  if isinstance(tokenizer, ByteBPETokenizer):
    for i, b in enumerate(tokenizer.token_bytes[:size]):
      out[i] = bytes(b)
    return out
  if isinstance(tokenizer, ByteTokenizer):
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
  longest stop string's byte length + 1. Feeding token v in state q moves stop string s to next[s, v, q]; hit says
  whether s was completed on the way."""

  def __init__(self, strings: Sequence[str], tokenizer, vocab_size: int):
    self.strings = [s for s in strings]
    for s in self.strings:
      if not isinstance(s, str) or not s:
        raise ConfigError(f"stop={s!r}: stop strings must be non-empty strings")
    patterns = [s.encode("utf-8") for s in self.strings]
    width = max(len(p) for p in patterns) + 1
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


def generate_ids(m: Model, prompts: Sequence[np.ndarray], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
                 seed: int = 0, batch_size: int = 8, buckets: Sequence[int] | None = None,
                 ignore_eos: bool = False) -> list[Output]:
  """Continues token-id prompts (module docstring); one `Output` per prompt, in order."""
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
      rows = _rows(len(chunk), batch_size)
      index = chunk + [chunk[0]] * (rows - len(chunk))  # filler rows repeat the first prompt; their output is dropped
      tokens = np.full((rows, width), m.pad_id, np.int32)
      valid = np.zeros((rows, width), np.int32)
      for r, i in enumerate(index):
        tokens[r, width - len(prompts[i]):] = prompts[i]
        valid[r, width - len(prompts[i]):] = 1
      tables = None if stops is None else (stops.next, stops.hit, stops.initial([prompts[i] for i in index]))
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


def generate(texts: Sequence[str] | str, model: Model | str, **settings) -> list[str]:
  """Completions of `texts` (one string or a list): the text each continues with, cut after a stop string.

  model: a `Model` (`load`) or a path to load. settings: those of `generate_ids` (max_new_tokens, temperature,
  top_k, top_p, repetition_penalty, stop, seed, batch_size, buckets), plus add_bos=False (prefix the tokenizer's
  bos id, as transformers' tokenizers do for Llama-style models)."""
  m = load(model) if isinstance(model, str) else model
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  add_bos = bool(settings.pop("add_bos", False))
  prompts = [np.asarray(m.tokenizer.encode(t), np.int32) for t in texts]
  if add_bos:
    prompts = [np.concatenate([[int(m.tokenizer.bos_id)], p]).astype(np.int32) for p in prompts]
  out = [o.text for o in generate_ids(m, prompts, **settings)]
  return out[0] if single else out


# ----------------------------------------------------------------------------- chat

def end_of_turn(m: Model) -> str:
  """The text the model's chat template puts after an assistant answer ('' when that is a token, e.g. eos)."""
  from cl_jax.lm.templates import PlainTemplate, as_messages
  if isinstance(m.template, PlainTemplate):
    return ""
  pieces = m.template.pieces(as_messages([("user", "q"), ("assistant", "ANSWER")]), m.tokenizer)
  trained = "".join(p.text or "" for p in pieces if p.train)
  return trained.split("ANSWER", 1)[-1].strip()


def chat_reply(m: Model, conversation, **settings) -> str:
  """The assistant's next turn after `conversation` (messages as in `cl_jax.lm.templates`), rendered with the
  model's chat template; stops at eos or the template's end-of-turn text (cut from the reply)."""
  from cl_jax.lm.templates import encode_prompt
  prompt = encode_prompt(conversation, m.tokenizer, m.template)
  end = end_of_turn(m)
  stop = list(settings.pop("stop", ()) or ()) + ([end] if end else [])
  text = generate_ids(m, [prompt], stop=stop, **settings)[0].text
  return text[:-len(end)] if end and text.endswith(end) else text


# ----------------------------------------------------------------------------- command line

def _parser(command: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"cl-jax {command}", description=(
      "Continue a prompt with a model" if command == "generate" else
      "Chat with a model on stdin (one user turn per line; '/reset' clears the conversation; end with Ctrl-D)"))
  p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory or a cl_jax LM / CIT run directory")
  if command == "generate":
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--add_bos", action="store_true", help="prefix the tokenizer's bos token")
  else:
    p.add_argument("--system", default="", help="a system message opening the conversation")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="0 = off")
  p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
  p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--seed", type=int, default=0)
  return p


def _settings(args) -> dict:
  return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)


def main(argv: Sequence[str], stdin=None, stdout=None) -> int:
  """`cl-jax generate ...` / `cl-jax chat ...` (argv[0] names the command); bad input raises ConfigError."""
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  command, rest = argv[0], list(argv[1:])
  parser = _parser(command)
  try:
    args = parser.parse_args(rest)
  except SystemExit as e:  # argparse printed its message (or --help): its own exit code
    return int(e.code or 0)
  settings = _settings(args)
  check_settings(settings["max_new_tokens"], settings["temperature"], settings["top_k"], settings["top_p"],
                 settings["repetition_penalty"], 8, None)
  for s in args.stop:
    if not s:
      raise ConfigError("--stop '': stop strings must be non-empty")
  m = load(args.model)
  if command == "generate":
    for text in generate(args.prompt, m, add_bos=args.add_bos, **settings):
      print(text, file=stdout, flush=True)
    return 0
  conversation = [("system", args.system)] if args.system else []
  for line in stdin:
    line = line.rstrip("\n")
    if line.strip() == "/reset":
      conversation = conversation[:1] if args.system else []
      continue
    if not line.strip():
      continue
    conversation.append(("user", line))
    try:
      reply = chat_reply(m, conversation, **settings)
    except ConfigError as e:  # the conversation outgrew the model's positions: say so, keep the session
      conversation.pop()
      print(f"error: {e} ('/reset' starts a new conversation)", file=sys.stderr, flush=True)
      continue
    conversation.append(("assistant", reply))
    print(reply, file=stdout, flush=True)
  return 0


__all__ = ["Model", "Output", "StopStrings", "bucket_of", "chat_reply", "end_of_turn", "generate", "generate_ids",
           "load", "main", "token_bytes"]
