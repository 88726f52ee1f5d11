"""Chat templates: a conversation (system / user / assistant turns) -> token ids and a loss mask.

A conversation is a sequence of `Message(role, content)` with role in {'system', 'user', 'assistant'}. A template
renders it as a list of pieces, each a string or a special token id, with a flag saying whether the piece is a
training target. `encode_chat` tokenizes them (below: one by one, or the whole text for a Jinja template) and returns

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
* `HFChatTemplate`: a checkpoint's own Jinja chat template, found where transformers looks for it
  (`chat_template.jinja`, the file transformers >= 5 writes, else tokenizer_config.json's `chat_template`) and
  rendered the way `tokenizer.apply_chat_template` renders it (`_jinja_environment`: sandboxed, trim_blocks /
  lstrip_blocks, `raise_exception`, `strftime_now`, transformers' `tojson`; the tokenizer's special-token strings
  `bos_token`, `eos_token`, ... as variables; `add_generation_prompt`). The rendered text is then encoded as a
  whole with no special tokens added (the template writes its own bos), which is what transformers does: the ids
  equal `apply_chat_template(..., tokenize=True)`'s (tests/test_hf_templates.py checks three templates against
  ids transformers produced). The assistant spans are found by rendering prefixes: for assistant turn i,
  `render(messages[:i], add_generation_prompt=True)` must be a prefix of `render(messages[:i+1])`, and the text
  between the two ends is that turn's content and end-of-turn marker (e.g. Qwen's "...<|im_end|>\n"); a token
  is a target when its characters overlap such a span. Templates that rewrite earlier turns (and so break the
  prefix property) are refused with a clear error (`ChatTemplateError`), as is a conversation the template itself
  refuses (its `raise_exception`).

`template_for(tokenizer, path=None)` picks the checkpoint's own template when its directory has one, else the
plain one, with a one-line notice on stderr naming the directory (never a silent stand-in). An exported model
carries its template in both places (`cl_jax.models.hf_checkpoint.export(..., chat_template=...)`).
"""
from __future__ import annotations

import datetime
import json
import sys
from typing import Mapping, NamedTuple, Sequence

import numpy as np

# The files a checkpoint keeps its template in, and their readers, live with the tokenizer below the models (the
# Hugging Face export writes them too); re-exported here.
from cl_jax.models.hf_tokenizer import (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, chat_template_source,
                                        special_tokens)

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


class ChatTemplateError(ValueError):
  """A chat template refused a conversation (its `raise_exception(...)`) or could not be rendered."""


def _jinja_environment():
  """The environment transformers' `apply_chat_template` compiles a template in (transformers >= 4.43,
  `utils/chat_template_utils.py`), rebuilt here so a template renders to the same text:

    * `ImmutableSandboxedEnvironment` (templates come from the Hub: untrusted code) with trim_blocks and
      lstrip_blocks (a block tag eats the newline after it and the indentation before it), and the
      `loopcontrols` extension ({% break %} / {% continue %});
    * globals `raise_exception(msg)` (a template's refusal, here `ChatTemplateError`), `strftime_now(fmt)`
      (today's date, e.g. Llama 3.1's "Today Date"), `dict` and `namespace`;
    * a `tojson` filter that is `json.dumps` (ensure_ascii off, indent / separators / sort_keys passed on),
      not jinja's, which escapes <, >, & and ' as \\u003c...: tool schemas render as transformers renders them.

  The `{% generation %}` tag of transformers' assistant-mask tracker is not supported (a template using it fails
  to compile with a clear error); the assistant spans are found by prefix rendering instead (module docstring).
  """
  try:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError("rendering a checkpoint's chat_template needs the `jinja2` package, which is not installed: "
                      "`pip install jinja2` (or use the plain template)") from e

  def raise_exception(message):
    raise ChatTemplateError(f"chat_template refused the conversation: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=dict,
                     namespace=jinja2.utils.Namespace)
  return env


class HFChatTemplate:
  """A Jinja `chat_template` string (see the module docstring).

  special_tokens: the tokenizer's special-token strings by attribute name ({'bos_token': '<s>', 'eos_token':
    '</s>', 'pad_token': ...}): transformers hands the template its `special_tokens_map`, so templates read
    `bos_token` / `eos_token` (and any other) as variables; an unset one is left undefined, as there.
  variables: further template variables for every rendering (e.g. `date_string`, `tools`, `enable_thinking`);
    `with_variables` returns a copy with more.
  """

  name = "chat_template"

  def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None,
               variables: Mapping | None = None):
    if not isinstance(source, str) or not source.strip():
      raise ValueError("chat_template: expected a non-empty Jinja template string")
    self.source = source
    try:
      self.template = _jinja_environment().from_string(source)
    except Exception as e:  # a jinja2 TemplateSyntaxError: name it and its line, not a traceback into jinja
      raise ChatTemplateError(f"chat_template does not compile ({type(e).__name__}: {e})") from None
    self.special_tokens = {k: v for k, v in dict(special_tokens or {}).items() if isinstance(v, str) and v}
    self.variables = dict(variables or {})

  @property
  def bos_token(self) -> str:
    return self.special_tokens.get("bos_token", "")

  @property
  def eos_token(self) -> str:
    return self.special_tokens.get("eos_token", "")

  def with_variables(self, **variables) -> "HFChatTemplate":
    return HFChatTemplate(self.source, self.special_tokens, {**self.variables, **variables})

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False, **variables) -> str:
    """The template's text for `messages`, as `tokenizer.apply_chat_template(..., tokenize=False)` renders it."""
    context = {**self.special_tokens, **self.variables, **variables}
    try:
      return self.template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                  add_generation_prompt=add_generation_prompt, **context)
    except ChatTemplateError:
      raise
    except Exception as e:  # an undefined variable, a type error inside the template, a sandbox refusal
      raise ChatTemplateError(f"chat_template failed to render ({type(e).__name__}: {e})") from None

  def spans(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[str, list]:
    """(the rendered text, [(start, end) character span of every assistant turn's trained text]): for assistant
    turn i, the text `render(messages[:i+1])` adds to `render(messages[:i], add_generation_prompt=True)`."""
    full = self.render(messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
      if m.role != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      through = self.render(messages[:i + 1])
      if not through.startswith(before) or not full.startswith(through):
        raise ChatTemplateError(f"chat_template: rendering is not prefix-stable at message {i} (the template "
                                "rewrites earlier turns), so the assistant tokens cannot be located")
      spans.append((len(before), len(through)))
    return full, spans

  def pieces(self, messages: Sequence[Message], tokenizer, add_generation_prompt: bool = False) -> list[Piece]:
    del tokenizer
    full, spans = self.spans(messages, add_generation_prompt)
    out, pos = [], 0
    for start, end in spans:
      if full[pos:start]:
        out.append(Piece(full[pos:start], None, False))
      out.append(Piece(full[start:end], None, True))
      pos = end
    if full[pos:]:
      out.append(Piece(full[pos:], None, False))
    return out


def load_chat_template(path: str) -> HFChatTemplate | None:
  """The chat template of a checkpoint directory (`chat_template_source`) with its special tokens; None when
  it has none."""
  source, file = chat_template_source(path)
  if source is None:
    return None
  try:
    return HFChatTemplate(source, special_tokens(path))
  except ChatTemplateError as e:
    raise ChatTemplateError(f"{file}: {e}") from None


def template_for(tokenizer, path: str | None = None, *, notice: bool = True):
  """The checkpoint's own chat template when `path` (its directory) has one, else `PlainTemplate()` -- with a
  one-line notice on stderr when a checkpoint directory has none (the plain template is cl_jax's own format,
  which that model has never seen)."""
  del tokenizer
  if path:
    t = load_chat_template(path)
    if t is not None:
      return t
    if notice:
      print(f"notice: {path} has no chat template ({CHAT_TEMPLATE_FILE} or {TOKENIZER_CONFIG_FILE}"
            "['chat_template']); conversations use cl_jax's plain template (<|user|> / <|assistant|> headers, "
            "eos ends a turn)", file=sys.stderr)
  return PlainTemplate()


def _span_mask(offsets, spans) -> np.ndarray:
  """1 on tokens whose characters [start, end) overlap a span (an empty-width token: whose start lies in one)."""
  mask = np.zeros(len(offsets), np.int32)
  for t, (a, b) in enumerate(offsets):
    for s, e in spans:
      if (a < e and b > s) if b > a else s <= a < e:
        mask[t] = 1
        break
  return mask


def encode_chat(conversation, tokenizer, template=None, add_generation_prompt: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n], mask int32 [n]) of a conversation (module docstring); mask 1 on assistant targets only.

  A Jinja template with a tokenizer that reports character offsets (`HFTokenizer.encode_with_offsets`) is encoded
  as transformers' `apply_chat_template` encodes it: the whole rendered text at once, no special tokens added (the
  template writes its own bos), so the ids are the model's own; the mask marks the tokens that overlap the
  assistant spans. Otherwise the pieces are tokenized one by one (a token never straddles a mask boundary).
  """
  template = template or PlainTemplate()
  messages = as_messages(conversation)
  if isinstance(template, HFChatTemplate) and hasattr(tokenizer, "encode_with_offsets"):
    text, spans = template.spans(messages, add_generation_prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return np.asarray(ids, np.int32), _span_mask(offsets, spans)
  ids, mask = [], []
  for p in template.pieces(messages, tokenizer, add_generation_prompt):
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


__all__ = ["Message", "Piece", "ROLES", "as_messages", "PlainTemplate", "HFChatTemplate", "ChatTemplateError",
           "CHAT_TEMPLATE_FILE", "chat_template_source", "special_tokens", "load_chat_template", "template_for",
           "encode_chat", "encode_prompt"]
