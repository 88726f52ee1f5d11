"""Chat templates: a conversation (system / user / assistant turns) -> token ids and a loss mask.

A conversation is a sequence of `Message(role, content)` with role in {'system', 'user', 'assistant'}. A template
renders it as a list of pieces, each a string or a special token id, with a flag saying whether the piece is a
training target. `encode_chat` tokenizes the pieces one by one and returns

  ids   int32 [n]   the rendered conversation
  mask  int32 [n]   1 exactly on the tokens of every assistant turn's content and its end-of-turn marker, 0 on
                    the system and user turns, the role headers and the begin-of-sequence token

so supervised fine-tuning trains the model to answer, never to imitate the user (the loss mask of InstructGPT,
Ouyang et al. 2022, and most SFT recipes since).

Two templates:

* `PlainTemplate` (the byte-level model, `cl_jax.data.tokenizer.ByteTokenizer`, or any tokenizer without a chat
  template). With B = bos id and E = eos id, a conversation renders as

      B "<|system|>\\n" system "\\n" "<|user|>\\n" user "\\n" "<|assistant|>\\n" answer E ...

  (the system turn is optional; `E`, the eos token, is the assistant's end-of-turn marker). Greedy decoding stops
  at E.
* `HFChatTemplate`: the `chat_template` of an imported checkpoint's tokenizer_config.json (a Jinja template,
  rendered with `jinja2` in a sandbox as `transformers` does, with `messages`, `bos_token`, `eos_token` and
  `add_generation_prompt`). The assistant spans are found by rendering prefixes: for assistant turn i,
  `render(messages[:i], add_generation_prompt=True)` must be a prefix of `render(messages[:i+1])`, and the text
  between the two ends is that turn's content and end-of-turn marker (e.g. Qwen's "...<|im_end|>\\n"). Templates
  that rewrite earlier turns (and so break the prefix property) are refused with a clear error.

`template_for(tokenizer, path=None)` picks the checkpoint's own template when its directory has one, else the
plain one. Pieces are tokenized separately, so a token never straddles a mask boundary.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


class Message(NamedTuple):
  role: str
  content: str


class Piece(NamedTuple):
  """A rendered piece: text to tokenize, or one special token id; `train` marks loss targets."""
  text: str | None
  token: int | None
  train: bool


def as_messages(conversation) -> list[Message]:
  """Messages from `Message`s, (role, content) pairs or {'role', 'content'} dicts; checks roles and order."""
  out = []
  for i, m in enumerate(conversation):
    if isinstance(m, dict):
      m = Message(m["role"], m["content"])
    role, content = m
    if role not in ROLES:
      raise ValueError(f"message {i}: role={role!r}; expected one of {ROLES}")
    if not isinstance(content, str):
      raise ValueError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
    if role == "system" and i != 0:
      raise ValueError(f"message {i}: a system message may only come first")
    out.append(Message(role, content))
  if not out:
    raise ValueError("a conversation needs at least one message")
  return out


class PlainTemplate:
  """The plain template of the module docstring (needs only `bos_id` / `eos_id` from the tokenizer)."""

  name = "plain"

  @staticmethod
  def header(role: str) -> str:
    return f"<|{role}|>\n"

  def pieces(self, messages: Sequence[Message], tokenizer, add_generation_prompt: bool = False) -> list[Piece]:
    out = [Piece(None, int(tokenizer.bos_id), False)]
    for m in messages:
      out.append(Piece(self.header(m.role), None, False))
      if m.role == "assistant":
        out += [Piece(m.content, None, True), Piece(None, int(tokenizer.eos_id), True)]
      else:
        out.append(Piece(m.content + "\n", None, False))
    if add_generation_prompt:
      out.append(Piece(self.header("assistant"), None, False))
    return out


def _jinja_environment():
  try:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError("rendering a checkpoint's chat_template needs the `jinja2` package, which is not installed: "
                      "`pip install jinja2` (or use the plain template)") from e

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env


class HFChatTemplate:
  """A Jinja `chat_template` string (see the module docstring); `special` holds bos_token / eos_token strings."""

  name = "chat_template"

  def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
    self.source = source
    self.template = _jinja_environment().from_string(source)
    self.bos_token, self.eos_token = bos_token, eos_token

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    return self.template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                bos_token=self.bos_token, eos_token=self.eos_token,
                                add_generation_prompt=add_generation_prompt)

  def pieces(self, messages: Sequence[Message], tokenizer, add_generation_prompt: bool = False) -> list[Piece]:
    del tokenizer
    full = self.render(messages, add_generation_prompt)
    out, pos = [], 0
    for i, m in enumerate(messages):
      if m.role != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      through = self.render(messages[:i + 1])
      if not through.startswith(before) or not full.startswith(through):
        raise ValueError(f"chat_template: rendering is not prefix-stable at message {i} (the template rewrites "
                         "earlier turns), so the assistant tokens cannot be located; use the plain template")
      if before[pos:]:
        out.append(Piece(before[pos:], None, False))
      out.append(Piece(through[len(before):], None, True))
      pos = len(through)
    if full[pos:]:
      out.append(Piece(full[pos:], None, False))
    return out


def load_chat_template(path: str) -> HFChatTemplate | None:
  """The chat template of a checkpoint directory's tokenizer_config.json (None when it has none)."""
  file = os.path.join(path, "tokenizer_config.json")
  if not os.path.exists(file):
    return None
  with open(file) as f:
    cfg = json.load(f)
  source = cfg.get("chat_template")
  if isinstance(source, list):  # several named templates: the default one
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    source = named.get("default")
  if not source:
    return None

  def token_text(value):
    return value.get("content", "") if isinstance(value, dict) else (value or "")

  return HFChatTemplate(source, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))


def template_for(tokenizer, path: str | None = None):
  """The checkpoint's own chat template when `path` (its directory) has one, else `PlainTemplate()`."""
  if path:
    t = load_chat_template(path)
    if t is not None:
      return t
  return PlainTemplate()


def encode_chat(conversation, tokenizer, template=None, add_generation_prompt: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n], mask int32 [n]) of a conversation (module docstring); mask 1 on assistant targets only."""
  template = template or PlainTemplate()
  ids, mask = [], []
  for p in template.pieces(as_messages(conversation), tokenizer, add_generation_prompt):
    toks = np.asarray([p.token], np.int32) if p.token is not None else np.asarray(tokenizer.encode(p.text), np.int32)
    ids.append(toks)
    mask.append(np.full(len(toks), int(p.train), np.int32))
  return np.concatenate(ids), np.concatenate(mask)


def encode_prompt(conversation, tokenizer, template=None) -> np.ndarray:
  """The ids of a conversation without its final assistant turn, ending with the assistant header (the prompt
  greedy decoding continues)."""
  messages = as_messages(conversation)
  if messages[-1].role == "assistant":
    messages = messages[:-1]
  return encode_chat(messages, tokenizer, template, add_generation_prompt=True)[0]


__all__ = ["Message", "Piece", "ROLES", "as_messages", "PlainTemplate", "HFChatTemplate", "load_chat_template",
           "template_for", "encode_chat", "encode_prompt"]
