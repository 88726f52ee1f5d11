"""The LM evaluation engine: lm-eval-style requests scored by any model a run holds, jitted, in length buckets.

    m = cl_jax.lm.generation.load("path/to/hf_dir_or_lm_workdir")
    engine = Engine.from_model(m, batch_size=16)
    engine.loglikelihood([("Question: 2+2=", " 4"), ...])        # [(sum log p(continuation | context), greedy)]
    engine.loglikelihood_rolling(["a whole document ..."])       # [sum log p(document)]
    engine.generate_until([("Q: ...\\nA:", {"until": ["\\n"], "max_gen_toks": 32})])   # [text]

Three request types, those of EleutherAI's lm-evaluation-harness (Gao et al. 2023; `lm_eval.api.model.LM`), with
the conventions of its Hugging Face model (`lm_eval/models/huggingface.py`, 0.4.13) so that scores agree:

* Encoding. `tok_encode(s)` is the tokenizer's default encoding (a transformers tokenizer adds its special tokens,
  e.g. a Llama bos, unless `s` already starts with the prefix token's text; `add_bos_token` overrides). A pair
  (context, continuation) moves the context's trailing whitespace to the continuation, encodes context +
  continuation and the context alone, and takes the whole encoding's tokens past the context's as the
  continuation. An empty context is the prefix token (bos, else eos; or the continuation's own first token when it
  is that token).
* Log-likelihood. With x = (context + continuation)[-(max_len + 1):] (left truncation) and c = |continuation|,
  one forward pass over x[:-1] gives

      loglik = sum_{t = |x|-c}^{|x|-1} log softmax(logits_{t-1})[x_t],    greedy = AND_t argmax(logits_{t-1}) = x_t

  multiple choice is acc = [argmax_k loglik_k = gold], acc_norm the same with loglik_k / len(choice_k in bytes or
  chars) as the task's YAML says (lm-eval computes those; the engine gives the log-likelihoods).
* Rolling log-likelihood (perplexity, bits per byte). A document's tokens are cut into disjoint windows of max_len
  predictions (`lm_eval.utils.get_rolling_token_windows` with context_len 1, then `make_disjoint_window`): the
  first window conditions on the prefix token, each later window on the max_len - |window| tokens before it.
  log p(doc) is the sum over windows; perplexity = exp(-log p / tokens), bits per byte = -log p / (bytes ln 2).
* Generation. Contexts are left-truncated to max_len - max_gen_toks, continued through the KV-cache decoder
  (`cl_jax.models.decoding.generate_ids`, greedy or sampled), stopped at eos or at the first of `until` (plus the
  eos token's text, as lm-eval adds it) found in the new text; the text is cut before that stop string (lm-eval's
  `postprocess_generated_text`: the stop string itself is not returned).

Batching. Requests are sorted by length, longest first (lm-eval's order), cut into batches of `batch_size` rows
(rounded up to a multiple of the mesh's devices; a short last batch is filled with empty rows), each right-padded to
its length bucket (powers of two from MIN_BUCKET = 64, or `buckets`; `cl_jax.models.decoding.bucket_of`), so one
program is compiled per bucket: at most log2(max_len) - 5; padding never changes a score (causal attention: a row's padding lies after its last
scored position). Generation likewise: one decoding program per (prompt bucket, power-of-two new-token budget,
power-of-two number of stop strings, greedy or sampled).
The log-probabilities and the greedy test are computed on the device: one [B] float and one [B] bool come back per
batch. Results are returned in the requests' order. `stats` counts items, tokens and seconds per request type.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.errors import ConfigError
from cl_jax.models.decoding import bucket_of, generate_ids

# lm-eval's gen_kwargs aliases of the new-token budget, in its priority order (normalize_gen_kwargs).
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model's max_gen_toks
MIN_BUCKET = 64  # the shortest default length bucket
# gen_kwargs the engine understands (others are refused by name: a silently ignored setting changes the scores).
GEN_KEYS = set(MAX_TOKEN_KEYS) | {"until", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                  "seed"}


class _Message(NamedTuple):
  """A chat message as the templates of `cl_jax.lm.templates` read it (role, content)."""
  role: str
  content: str


class _Decoder(NamedTuple):
  """The fields `cl_jax.models.decoding.generate_ids` reads (those of `cl_jax.lm.generation.Model`)."""
  model: Any
  params: Any
  tokenizer: Any
  eos_ids: tuple
  pad_id: int
  max_len: int
  vocab_size: int


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _score_fn(apply: Callable):
  """(params, tokens [B, W+1], weights [B, W]) -> (sum of weighted target log-probs [B], all-greedy [B])."""

  def score(params, tokens, weights):
    logits = apply(params, tokens[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    hit = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(logp * weights, axis=-1), jnp.all(hit | (weights == 0), axis=-1)

  return score


class Engine:
  """Scores lm-eval-style requests for one model, jitted, batched into length buckets, on a mesh.

  apply(params, tokens int32 [B, L]) -> logits [B, L, V] (a run's learner.apply: LoRA / stacked layers work);
  model: the flax module with the KV cache (`cl_jax.models.sampling.decode`) for generate_until (None: refused);
  tokenizer: a cl_jax tokenizer (`encode`, `decode`, ids); max_len: the longest input (lm-eval's max_length);
  prefix_id: the token an empty context is (default: the tokenizer's bos id); eot_text: the end-of-text string
  lm-eval adds to every `until` (default: the eos id's text); add_bos_token: lm-eval's model argument of that name
  (None: the tokenizer's default); template: the chat template (`cl_jax.lm.templates`).
  """

  def __init__(self, apply, params, tokenizer, *, max_len: int, batch_size: int = 16, mesh=None, buckets=None,
               model=None, eos_ids=(), pad_id: int = 0, prefix_id: int | None = None, template=None,
               vocab_size: int | None = None, eot_text: str | None = None, add_bos_token: bool | None = None,
               name: str = "model", seed: int = 0):
    if not isinstance(max_len, int) or max_len < 2:
      raise ConfigError(f"max_len={max_len!r}: must be an integer >= 2")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ConfigError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if buckets is not None and any(not isinstance(b, int) or b < 1 for b in buckets):
      raise ConfigError(f"buckets={list(buckets)!r}: must be positive integers")
    self.apply, self.params, self.tokenizer = apply, params, tokenizer
    self.max_len, self.batch_size, self.mesh = int(max_len), int(batch_size), mesh
    # Default buckets: powers of two from MIN_BUCKET. Shorter ones would save little work and cost a compilation each.
    self.buckets = tuple(sorted(int(b) for b in buckets)) if buckets is not None else tuple(
        1 << k for k in range(MIN_BUCKET.bit_length() - 1, max(int(max_len), MIN_BUCKET).bit_length()))
    self.model, self.eos_ids, self.pad_id = model, tuple(int(e) for e in eos_ids), int(pad_id)
    self.prefix_id = int(tokenizer.bos_id if prefix_id is None else prefix_id)
    self.template, self.name, self.seed = template, name, int(seed)
    self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
    self.add_bos_token = add_bos_token
    self.eot_text = eot_text if eot_text is not None else self._token_text(self.eos_ids[0] if self.eos_ids
                                                                           else tokenizer.eos_id)
    self._prefix_text = self._token_text(self.prefix_id)
    if mesh is None:
      self._score = jax.jit(_score_fn(apply))
    else:
      from cl_jax import sharding
      self._score = jax.jit(_score_fn(apply), out_shardings=sharding.replicated(mesh))
    self.stats = self._fresh_stats()

  @staticmethod
  def _fresh_stats() -> dict:
    return {k: {"items": 0, "tokens": 0, "seconds": 0.0} for k in ("loglikelihood", "loglikelihood_rolling",
                                                                     "generate_until")}

  # ------------------------------------------------------------------------------------------- construction

  @classmethod
  def from_model(cls, m, **kw) -> "Engine":
    """An engine for `m = cl_jax.lm.generation.load(path)` (a Hugging Face directory or a cl_jax LM workdir).

    A Hugging Face directory's special tokens are read as transformers reads them (tokenizer_config.json /
    special_tokens_map.json): the prefix token is its bos token, else its eos token (lm-eval's prefix_token_id),
    and the end-of-text string is its eos token."""
    from cl_jax.models.hf_tokenizer import special_tokens
    tok = m.tokenizer
    defaults: dict[str, Any] = {}
    if m.path and os.path.isfile(os.path.join(m.path, "tokenizer_config.json")) and hasattr(tok, "token_id"):
      specials = special_tokens(m.path)

      def known(key):
        try:
          return tok.token_id(specials[key]) if specials.get(key) else None
        except ValueError:
          return None

      bos, eos = known("bos_token"), known("eos_token")
      if bos is not None or eos is not None:
        defaults["prefix_id"] = bos if bos is not None else eos
      if specials.get("eos_token"):
        defaults["eot_text"] = specials["eos_token"]
    model = m.model
    args = dict(max_len=m.max_len, model=model, eos_ids=m.eos_ids, pad_id=m.pad_id, template=m.template,
                vocab_size=m.vocab_size, name=os.path.basename(os.path.normpath(m.path or "model")))
    args.update(defaults)
    args.update(kw)
    return cls(lambda p, x: model.apply(p, x), m.params, tok, **args)

  def with_params(self, params) -> "Engine":
    """The same engine (same compiled programs) scoring other params; its `stats` start from zero."""
    other = copy.copy(self)
    other.params = params
    other.stats = self._fresh_stats()
    return other

  # ------------------------------------------------------------------------------------------- encoding

  def _token_text(self, ident: int) -> str:
    try:
      return self.tokenizer.decode([int(ident)], skip_special_tokens=False)
    except TypeError:  # a tokenizer without special-token text (bytes, SentencePiece): its plain decoding
      return self.tokenizer.decode([int(ident)])

  def tok_encode(self, text: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None) -> list[int]:
    """lm-eval's HFLM.tok_encode: the tokenizer's default special tokens (transformers adds them) unless told,
    none when the text already starts with the prefix token's text."""
    flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
    if add_special_tokens is None and self._prefix_text and text.startswith(self._prefix_text):
      flag = False
    if flag is None:
      flag = True
    try:
      ids = self.tokenizer.encode(text, add_special_tokens=bool(flag))
    except TypeError:  # cl_jax's own tokenizers add no special tokens
      ids = self.tokenizer.encode(text)
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's (context_enc, continuation_enc) of a request (LM.loglikelihood and LM._encode_pair)."""
    if context == "":
      cont = self.tok_encode(continuation, add_special_tokens=False)
      if not cont:
        raise ConfigError(f"loglikelihood request ('', {continuation!r}): the continuation encodes to no tokens")
      return ([self.prefix_id], cont) if cont[0] != self.prefix_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
      continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = self.tok_encode(context + continuation)
    ctx = self.tok_encode(context)
    return ctx, whole[len(ctx):]

  # ------------------------------------------------------------------------------------------- scoring

  def _rows(self) -> int:
    """Rows of every batch: batch_size, rounded up to a multiple of the mesh's devices."""
    if self.mesh is None:
      return self.batch_size
    from cl_jax.eval.evaluator import padded_size
    return padded_size(self.batch_size, self.mesh)

  def _width(self, n: int) -> int:
    return min(bucket_of(n, self.buckets), self.max_len)

  def _run(self, tokens: np.ndarray, weights: np.ndarray):
    if self.mesh is not None:
      from cl_jax import sharding
      batch = sharding.put_global_batch({"t": tokens, "w": weights}, self.mesh)
      tokens, weights = batch["t"], batch["w"]
    logp, greedy = jax.device_get(self._score(self.params, tokens, weights))
    return np.asarray(logp, np.float64), np.asarray(greedy, bool)

  def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                           _kind: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy) of token-id pairs (module docstring), in their order."""
    start = time.perf_counter()
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
      ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
      if not ctx or not cont:
        raise ConfigError(f"loglikelihood request {i}: empty {'context' if not ctx else 'continuation'} tokens")
      if len(cont) > self.max_len:
        raise ConfigError(f"loglikelihood request {i}: a continuation of {len(cont)} tokens exceeds max_len="
                          f"{self.max_len}")
      full = (ctx + cont)[-(self.max_len + 1):]
      rows.append((full, len(cont)))
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), tuple(rows[i][0])))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    tokens_done = 0
    for at in range(0, len(order), self.batch_size):
      chunk = order[at:at + self.batch_size]
      width = self._width(max(len(rows[i][0]) - 1 for i in chunk))
      n = self._rows()
      tokens = np.full((n, width + 1), self.pad_id, np.int32)
      weights = np.zeros((n, width), np.float32)
      for r, i in enumerate(chunk):
        full, c = rows[i]
        tokens[r, :len(full)] = full
        weights[r, len(full) - 1 - c:len(full) - 1] = 1.0
        tokens_done += len(full) - 1
      logp, greedy = self._run(tokens, weights)
      for r, i in enumerate(chunk):
        out[i] = (float(logp[r]), bool(greedy[r]))
    self._count(_kind, len(rows), tokens_done, start)
    return out

  def _count(self, kind: str, items: int, tokens: int, start: float) -> None:
    s = self.stats[kind]
    s["items"] += int(items)
    s["tokens"] += int(tokens)
    s["seconds"] += time.perf_counter() - start

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy) of (context, continuation) strings, encoded as lm-eval does."""
    return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (context, predicted) of a document (module docstring)."""
    tokens = self.tok_encode(text)
    windows, done, n = [], 0, len(tokens)
    while done < n:
      if done == 0:
        m = min(self.max_len, n)
        windows.append(([self.prefix_id] + tokens[:m - 1], tokens[:m]))
      else:
        m = min(n - done, self.max_len)
        end = done + m
        windows.append((tokens[max(0, end - self.max_len - 1):end - 1], tokens[end - m:end]))
      done += m
    # make_disjoint_window: the context loses the predicted tokens it overlaps (all but the first of them)
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """log p(document) of each text, summed over its rolling windows."""
    owner, pairs = [], []
    for i, text in enumerate(texts):
      for w in self.rolling_windows(text):
        owner.append(i)
        pairs.append(w)
    scores = self.loglikelihood_tokens(pairs, _kind="loglikelihood_rolling") if pairs else []
    total = np.zeros(len(texts), np.float64)
    for i, (lp, _) in zip(owner, scores):
      total[i] += lp
    # loglikelihood_tokens counted the windows' tokens and time; the items are the documents
    self.stats["loglikelihood_rolling"]["items"] += len(texts) - len(pairs)
    return [float(x) for x in total]

  # ------------------------------------------------------------------------------------------- generation

  def _generation_model(self) -> "_Decoder":
    if self.model is None:
      raise ConfigError("generate_until: this engine has no model with a KV cache (Engine(model=...)); "
                        "it scores log-likelihoods only")
    return _Decoder(self.model, self.params, self.tokenizer, self.eos_ids, self.pad_id, self.max_len,
                    self.vocab_size)

  def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
                   seed: int | None = None, ignore_eos: bool = False, stop_in_prompt: bool = False) -> list:
    """Token-level generation (`cl_jax.models.decoding.generate_ids` with this engine's model, params, batch size
    and buckets): one `Output(text, ids, stopped)` per prompt, in order."""
    return generate_ids(self._generation_model(), [np.asarray(p, np.int32) for p in prompts],
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, stop=stop, seed=self.seed if seed is None else seed,
                        batch_size=self._rows(), buckets=self.buckets, ignore_eos=ignore_eos,
                        stop_in_prompt=stop_in_prompt, fixed_rows=True)

  @staticmethod
  def gen_settings(gen_kwargs: dict, eot_text: str = "") -> dict:
    """lm-eval's gen_kwargs (normalize_gen_kwargs, handle_stop_sequences) as generate_ids settings:
    {'until', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'repetition_penalty', 'seed'}."""
    kw = dict(gen_kwargs or {})
    unknown = sorted(set(kw) - GEN_KEYS)
    if unknown:
      raise ConfigError(f"gen_kwargs {unknown}: not supported by the cl_jax engine; allowed: {sorted(GEN_KEYS)}")
    until = kw.get("until", [])
    if until is None:
      until = []
    elif isinstance(until, str):
      until = [until]
    elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
      raise ConfigError(f"gen_kwargs until={until!r}: expected a string or a list of strings")
    until = list(until)
    if eot_text and eot_text not in until:
      until.append(eot_text)
    budget = next((kw[k] for k in MAX_TOKEN_KEYS if kw.get(k) is not None), DEFAULT_MAX_GEN_TOKS)
    temperature = float(kw.get("temperature", 0.0) or 0.0)
    do_sample = kw.get("do_sample")
    sample = (temperature > 0) if do_sample is None else bool(do_sample) and temperature > 0
    return {"until": until, "max_new_tokens": int(budget), "temperature": temperature if sample else 0.0,
            "top_k": int(kw.get("top_k", 0) or 0), "top_p": float(kw.get("top_p", 1.0) or 1.0),
            "repetition_penalty": float(kw.get("repetition_penalty", 1.0) or 1.0), "seed": kw.get("seed")}

  @staticmethod
  def cut(text: str, until: Sequence[str]) -> str:
    """lm-eval's postprocess_generated_text: `text` before the first occurrence of any non-empty stop string."""
    for s in until:
      if s:
        text = text.split(s)[0]
    return text

  def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """The continuation of each context under its gen_kwargs (`until`, `max_gen_toks`, `do_sample`,
    `temperature`, ...), cut before the first stop string, in the requests' order."""
    start = time.perf_counter()
    self._generation_model()  # refuses before any work when there is no decoder
    groups: dict[str, list[int]] = {}
    for i, (_, kw) in enumerate(requests):
      groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
    out: list[str | None] = [None] * len(requests)
    new_tokens = 0
    for members in groups.values():
      s = self.gen_settings(requests[members[0]][1], self.eot_text)
      room = self.max_len - s["max_new_tokens"]
      if room <= 0:
        raise ConfigError(f"gen_kwargs max_gen_toks={s['max_new_tokens']}: must be less than the model's "
                          f"max_length={self.max_len}")
      prompts = [np.asarray(self.tok_encode(requests[i][0], left_truncate_len=room), np.int32) for i in members]
      for j, p in enumerate(prompts):
        if len(p) == 0:  # an empty context continues from the prefix token
          prompts[j] = np.asarray([self.prefix_id], np.int32)
      # Compilation is bounded as for the prompts' lengths: the decoder runs a power-of-two number of new tokens
      # (at least 16, within the positions) and tracks a power-of-two number of stop strings (the first repeated:
      # a duplicate stops nothing new); the ids past the request's own budget are dropped before decoding the text.
      # Greedy and sampled tokens alike are unchanged (row r's token i uses key fold_in(fold_in(seed, r), i)).
      stops = [u for u in s["until"] if u]
      stops += stops[:1] * (_next_pow2(len(stops)) - len(stops))
      budget = s["max_new_tokens"]
      longest = max(len(p) for p in prompts)
      steps = max(budget, min(max(16, _next_pow2(budget)), self.max_len - longest))
      results = self.generate_ids(prompts, max_new_tokens=steps, temperature=s["temperature"], top_k=s["top_k"],
                                  top_p=s["top_p"], repetition_penalty=s["repetition_penalty"], stop=stops,
                                  seed=None if s["seed"] is None else int(s["seed"]))
      for i, r in zip(members, results):
        ids = r.ids[:budget]
        out[i] = self.cut(self.tokenizer.decode(ids), s["until"])
        new_tokens += len(ids)
    self._count("generate_until", len(requests), new_tokens, start)
    return out

  # ------------------------------------------------------------------------------------------- chat template

  def apply_chat_template(self, chat_history: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The text of a conversation under the model's chat template (lm-eval's HFLM.apply_chat_template):
    with add_generation_prompt the assistant header follows; without, the text ends after the final message's
    content (transformers' continue_final_message)."""
    messages = [_Message(m["role"], m["content"]) if isinstance(m, dict) else _Message(*m) for m in chat_history]
    template = self.template
    if template is None:
      raise ConfigError("apply_chat_template: this engine has no chat template (Engine(template=...))")
    if hasattr(template, "render"):  # a checkpoint's Jinja template (cl_jax.lm.templates.HFChatTemplate)
      text = template.render(messages, add_generation_prompt=add_generation_prompt)
    else:  # cl_jax's plain template: its text pieces (its bos / eos are ids, not text)
      text = "".join(p.text or "" for p in template.pieces(messages, self.tokenizer, add_generation_prompt))
    if not add_generation_prompt:
      final = messages[-1].content.strip()
      at = text.rfind(final) if final else -1
      if at >= 0:
        text = text[:at + len(final)]
    return text

  @property
  def chat_template(self) -> str:
    """The Jinja source of the model's chat template ('' for cl_jax's plain template)."""
    return getattr(self.template, "source", "") or ""

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name", "tokenizer")).replace("/", "__")

  def speed(self) -> dict:
    """{kind: {'items_per_s', 'tokens_per_s'}} from `stats`."""
    return {k: {"items_per_s": v["items"] / v["seconds"] if v["seconds"] else math.nan,
                "tokens_per_s": v["tokens"] / v["seconds"] if v["seconds"] else math.nan}
            for k, v in self.stats.items()}


__all__ = ["Engine", "DEFAULT_MAX_GEN_TOKS", "GEN_KEYS"]
