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
# The decoding core (stop-string automata, length buckets, batched KV-cache decoding of token ids) lives with the
# models, below the evaluation engine that also decodes with it (`cl_jax.eval.lm_engine`); re-exported here.
from cl_jax.models.decoding import (DEFAULT_BUCKET_MIN, Output, StopStrings, bucket_of, check_settings,
                                    generate_ids, token_bytes)



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
  """A finished cl_jax LM run: its HF export (`<workdir>/hf`, the kept model of a run that imported a checkpoint)
  when there is one, else the params of its last task-boundary checkpoint with the run's tokenizer."""
  import ml_collections
  from cl_jax.checkpoint import boundary_params
  from cl_jax.data.tokenizer import load_tokenizer
  from cl_jax.lm.runner import model_config
  from cl_jax.lm.templates import PlainTemplate
  from cl_jax.models.transformer import abstract_lm
  if os.path.isfile(os.path.join(path, "hf", "config.json")):
    return _from_hf(os.path.join(path, "hf"))
  if run.get("kind") != "lm":
    raise ConfigError(f"--model={path!r}: a cl_jax run of kind {run.get('kind')!r}; generation reads LM runs "
                      "(kind 'lm') or Hugging Face checkpoint directories")
  c = ml_collections.ConfigDict(run)
  if c.lm.get("init_from"):
    raise ConfigError(f"--model={path!r}: this run imported {c.lm.init_from} but has no hf/ export; rerun it with "
                      "lm.export_hf=True, or pass its hf/ directory")
  # The stages before adaptation change the tokenizer (vocab.extend) or the positions (long_context): their
  # models are not `model_config(c)`'s, so they are refused rather than loaded wrongly.
  if int(c.get("vocab", {}).get("extend", 0) or 0) or int(c.get("long_context", {}).get("seq_len", 0) or 0):
    raise ConfigError(f"--model={path!r}: a run with a vocab.extend / long_context stage; generation reads plain "
                      "LM runs and Hugging Face directories")
  tok = load_tokenizer(c.lm.tokenizer)
  try:
    params = boundary_params(path)
  except FileNotFoundError as e:
    raise ConfigError(f"--model={path!r}: {e}") from None
  if isinstance(params, dict) and "base" in params:  # base + LoRA adapter(s): folded into plain params
    from cl_jax.strategies.lora import merged_params
    params = merged_params(params, c)
  cfg = model_config(c, tok.vocab_size)
  model, abstract = abstract_lm(cfg)
  try:
    same = jax.tree.map(lambda a, x: tuple(a.shape) == tuple(np.shape(x)), abstract, params)
  except ValueError as e:  # another tree structure
    raise ConfigError(f"--model={path!r}: its checkpoint does not hold the params of its config's model: {e}") from None
  if not all(jax.tree.leaves(same)):
    raise ConfigError(f"--model={path!r}: its checkpoint's param shapes differ from its config's model")
  params = jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), abstract, params)
  return Model(model, params, tok, PlainTemplate(), (int(tok.eos_id),), int(tok.pad_id), path, int(cfg.max_len),
               int(cfg.vocab_size))


def load(path: str) -> Model:
  """A Hugging Face checkpoint directory (config.json with a `model_type`) or a finished cl_jax LM run's workdir."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.isfile(config_file):
    raise ConfigError(f"--model={path!r}: expected a Hugging Face checkpoint directory (config.json + safetensors) "
                      "or a cl_jax LM run directory (config.json + checkpoints/)")
  cfg = _read_json(config_file)
  if "model_type" in cfg:
    return _from_hf(path)
  return _from_workdir(path, cfg)


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
  p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory or a cl_jax LM run directory")
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


__all__ = ["DEFAULT_BUCKET_MIN", "Model", "Output", "StopStrings", "bucket_of", "chat_reply", "end_of_turn",
           "generate", "generate_ids", "load", "main", "token_bytes"]
