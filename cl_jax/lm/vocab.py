"""Vocabulary extension for a trained `TransformerLM` (new domain / language tokens).

`extend_vocab` appends N rows to the embedding (and N columns to an untied output layer), initialised
as the mean of the existing rows plus small seeded Gaussian noise,

    e_new = mean_v(e_v) + noise_scale * std_v(e_v) * z,   z ~ N(0, I)   (per dimension)

the recipe of Hewitt (2021), "Initializing New Word Embeddings for Pretrained Language Models": the
mean keeps the new tokens' logits near the average logit rather than at an arbitrary (possibly huge)
value, and the noise breaks the symmetry between the new rows.

The invariant at the moment of extension: for inputs made only of old tokens, the logits of the old
vocabulary, `logits[..., :V_old]`, are identical to the old model's. (Probabilities over the old
vocabulary do change: the new logits join the softmax normaliser. That is inherent to adding tokens.)

`vocab_extension_optimizer` trains the old rows with a lower learning rate (or frozen) and the new
rows at the full rate. optax partitions by leaf, but old and new rows share one embedding matrix, so
the row-wise rate is a per-row multiplier applied to the *updates* after the base optimizer: with
Adam, scaling the update of row r by s_r is exactly training row r at learning rate s_r * lr (scaling
the gradient instead would be undone by Adam's normalisation). `optax.multi_transform` routes the
vocabulary leaves (`embed.embedding`, `lm_head.kernel`) through `chain(base, scale_rows)` and the
body through `base` or `set_to_zero()` (freeze the body while the new embeddings settle).

Learning the new tokens (issue 10 item 4, continual pre-training with `vocab.extend=N`): byte-pair encoding
(Sennrich et al. 2016, "Neural machine translation of rare words with subword units") *continued* from the model's
own tokenization of the domain corpus. Each pre-tokenized word of the domain's training documents starts as its
current token sequence (bytes for the byte-level model, the tokenizer file's BPE tokens for an imported checkpoint);
`learn_merges` then repeats N times: merge the most frequent adjacent pair (ties: the smallest pair of ids) into a
new token. Appended after the existing merges, the new merges have the lowest rank, so text the old tokenizer split
one way is split the same way and then merged further: the extension refines, never reshuffles, the old
segmentation. A pair whose concatenation is already a token is skipped (a second path to an existing string is no
new token). Encoding runs in the `tokenizers` package (Rust) for both kinds:
  * byte model: `ByteBPETokenizer`, ids 0..255 bytes, 256..258 pad / bos / eos, 259.. the new multi-byte tokens;
  * tokenizer files (imported Hugging Face checkpoints): the file's BPE model with the merges and vocabulary
    entries appended, new ids starting at the model's embedding rows.
`extend_for_run` writes the tokenizer into `<workdir>/vocab/` (tokenizer.json + extension.json) and reads it back
on every later start of the same run, so a resume, an evaluation and a Hugging Face export all see one tokenizer.

Fertility (tokens per byte of text) and bits per byte, `bpb = sum NLL / (ln 2 * bytes)`, compare models across
vocabularies (per-token perplexity does not: a longer token carries more information).
"""
from __future__ import annotations

import collections
import heapq
import json
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cl_jax.models import FunctionalModel, functional
from cl_jax.models.hf_tokenizer import BYTE_CHARS  # GPT-2's byte alphabet (re-exported)
from cl_jax.models.transformer import TransformerConfig, TransformerLM

# Vocabulary-indexed leaves and the axis that indexes the vocabulary in each.
VOCAB_LEAVES: dict[tuple[str, ...], int] = {("embed", "embedding"): 0, ("lm_head", "kernel"): 1}


def _config_of(model: FunctionalModel, params) -> TransformerConfig:
  return nnx.merge(model.graphdef, params).config


def _extend_rows(table: jax.Array, axis: int, num_new: int, key: jax.Array, noise_scale: float):
  rows = jnp.moveaxis(table, axis, 0)  # [V, D]
  mean = jnp.mean(rows, axis=0)
  std = jnp.std(rows, axis=0)
  noise = jax.random.normal(key, (num_new, rows.shape[1]), rows.dtype)
  new = mean[None] + noise_scale * std[None] * noise
  return jnp.moveaxis(jnp.concatenate([rows, new.astype(rows.dtype)], axis=0), 0, axis)


def extend_vocab(model: FunctionalModel, params, num_new_tokens: int, *, seed: int = 0,
                 noise_scale: float = 0.01) -> tuple[FunctionalModel, Any]:
  """Adds `num_new_tokens` tokens (ids V_old .. V_old+N-1). Returns (new FunctionalModel, new params).

  Every parameter except the vocabulary leaves is passed through unchanged (the same arrays).
  """
  if not isinstance(num_new_tokens, (int, np.integer)) or num_new_tokens < 1:
    raise ValueError(f"extend_vocab: num_new_tokens={num_new_tokens!r} must be a positive integer")
  if noise_scale < 0:
    raise ValueError(f"extend_vocab: noise_scale={noise_scale} must be >= 0")
  cfg = _config_of(model, params)
  new_cfg = cfg.replace(vocab_size=cfg.vocab_size + int(num_new_tokens))
  key = jax.random.key(seed)
  new_params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for i, (path, axis) in enumerate(VOCAB_LEAVES.items()):
    if path[0] not in params:
      continue
    table = params[path[0]][path[1]]
    new_params[path[0]] = {**params[path[0]], path[1]: _extend_rows(
      table, axis, int(num_new_tokens), jax.random.fold_in(key, i), noise_scale)}
  # Only the graph is needed: build the module abstractly so no throw-away weights are initialised.
  abstract = nnx.eval_shape(lambda: TransformerLM(new_cfg, rngs=nnx.Rngs(0)))
  new_model, _ = functional(abstract)
  return new_model, new_params


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def vocab_labels(params) -> Any:
  """'vocab' for the vocabulary-indexed leaves, 'body' for all others (labels for multi_transform)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: "vocab" if _path_names(p)[-2:] in VOCAB_LEAVES else "body", params)


def scale_vocab_rows(old_vocab_size: int, old_row_scale: float,
                     new_row_scale: float = 1.0) -> optax.GradientTransformation:
  """Multiplies the updates of vocabulary rows < `old_vocab_size` by `old_row_scale`, the others (the new rows) by
  `new_row_scale` (with Adam: those rows train at that multiple of the learning rate).

  Leaves are recognised by their path (`embed.embedding` rows on axis 0, `lm_head.kernel` on axis 1),
  so this works on the full params tree and on the vocabulary subtree inside `multi_transform`.
  """

  def scale(path, update):
    names = _path_names(path)[-2:]
    if names not in VOCAB_LEAVES or update is None:
      return update
    axis = VOCAB_LEAVES[names]
    rows = jnp.arange(update.shape[axis])
    factor = jnp.where(rows < old_vocab_size, jnp.float32(old_row_scale), jnp.float32(new_row_scale))
    shape = [1] * update.ndim
    shape[axis] = update.shape[axis]
    return update * factor.reshape(shape).astype(update.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def vocab_extension_optimizer(base: optax.GradientTransformation, params, old_vocab_size: int, *,
                              old_row_lr_scale: float = 0.0,
                              train_body: bool = True) -> optax.GradientTransformation:
  """`optax.multi_transform` for training after `extend_vocab`.

  vocab leaves: `chain(base, scale_vocab_rows(old_vocab_size, old_row_lr_scale))`, i.e. old rows at
                 `old_row_lr_scale * lr` (0 = frozen: their value never changes), new rows at `lr`;
  body leaves:   `base` if `train_body` else `optax.set_to_zero()` (frozen, no optimizer state).
  With `old_row_lr_scale=0` Adam still keeps moments for the frozen rows (they share a leaf with the
  trained rows); that is memory, not a change to their values.
  """
  if not 0.0 <= old_row_lr_scale <= 1.0:
    raise ValueError(f"vocab_extension_optimizer: old_row_lr_scale={old_row_lr_scale} must be in [0, 1]")
  vocab_size = None
  for path, axis in VOCAB_LEAVES.items():
    if path[0] in params:
      vocab_size = params[path[0]][path[1]].shape[axis]
  if vocab_size is None:
    raise ValueError("vocab_extension_optimizer: params have no 'embed.embedding' leaf")
  if not 0 < old_vocab_size <= vocab_size:
    raise ValueError(f"vocab_extension_optimizer: old_vocab_size={old_vocab_size} must be in "
                     f"[1, {vocab_size}] (the extended vocabulary size)")
  transforms = {"vocab": optax.chain(base, scale_vocab_rows(old_vocab_size, old_row_lr_scale)),
                "body": base if train_body else optax.set_to_zero()}
  return optax.multi_transform(transforms, vocab_labels(params))


# ----------------------------------------------------------------------------- learning new tokens (BPE, continued)

def learn_merges(words: Sequence[Sequence[int]], counts: Sequence[int], num_merges: int, first_id: int, *,
                 allowed: Callable[[int, int], bool] | None = None, min_frequency: int = 2) -> list[tuple]:
  """`num_merges` BPE merges `(a, b, new_id)` over `words` (token id sequences) weighted by `counts`.

  Each step merges the most frequent adjacent pair (ties: the smallest `(a, b)`, so the result is a function of
  the data alone) into id `first_id + k`. Pair counts are updated incrementally: only the words that hold the
  merged pair are re-counted. `allowed(a, b)` False skips a pair for good. Stops early when the best pair occurs
  fewer than `min_frequency` times; the caller decides whether fewer merges is an error.
  """
  words = [list(w) for w in words]
  counts = [int(n) for n in counts]
  pair_count: dict = collections.defaultdict(int)
  where: dict = collections.defaultdict(set)
  for i, w in enumerate(words):
    for p in zip(w, w[1:]):
      pair_count[p] += counts[i]
      where[p].add(i)
  heap = [(-n, p) for p, n in pair_count.items()]
  heapq.heapify(heap)
  merges, banned = [], set()
  while len(merges) < num_merges and heap:
    neg, pair = heapq.heappop(heap)
    current = pair_count.get(pair, 0)
    if pair in banned or current <= 0:
      continue
    if -neg != current:  # a stale entry: requeue at its current count
      heapq.heappush(heap, (-current, pair))
      continue
    if current < min_frequency:
      break
    if allowed is not None and not allowed(*pair):
      banned.add(pair)
      continue
    new = first_id + len(merges)
    merges.append((pair[0], pair[1], new))
    touched = collections.Counter()
    for i in sorted(where.pop(pair, ())):
      w, n = words[i], counts[i]
      for p in zip(w, w[1:]):
        pair_count[p] -= n
        touched[p] += 1
      merged, j = [], 0
      while j < len(w):
        if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
          merged.append(new)
          j += 2
        else:
          merged.append(w[j])
          j += 1
      words[i] = merged
      for p in zip(merged, merged[1:]):
        pair_count[p] += n
        where[p].add(i)
        touched[p] += 1
    pair_count.pop(pair, None)
    for p in touched:
      if pair_count.get(p, 0) > 0:
        heapq.heappush(heap, (-pair_count[p], p))
  return merges


_CHAR_BYTE = {ch: b for b, ch in enumerate(BYTE_CHARS)}
# Names of the byte model's specials in the tokenizer file: spaces never occur in a byte-level token, so no
# learned token can collide with them.
_BYTE_SPECIALS = (" <pad> ", " <bos> ", " <eos> ")


def _byte_pre_tokenizer():
  from tokenizers import pre_tokenizers
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _word_counts(pre_tokenize, texts: Sequence[str], normalize=None) -> collections.Counter:
  counts: collections.Counter = collections.Counter()
  for text in texts:
    if normalize is not None:
      text = normalize(text)
    counts.update(w for w, _ in pre_tokenize(text))
  return counts


class ByteBPETokenizer:
  """The byte-level tokenizer with learned multi-byte tokens: ids 0..255 are bytes, 256..258 pad / bos / eos (as
  `ByteTokenizer`), 259.. the merges in the order they were learned. Encoding runs in `tokenizers` (byte-level
  pre-tokenizer, BPE over the bytes); decoding concatenates each id's bytes."""

  num_bytes, pad_id, bos_id, eos_id = 256, 256, 257, 258

  def __init__(self, merges: Sequence[tuple[int, int]], path: str | None = None):
    from tokenizers import Tokenizer, decoders, models
    self.merges = [(int(a), int(b)) for a, b in merges]
    self.token_bytes = [bytes([b]) for b in range(256)] + [b""] * 3
    for a, b in self.merges:
      self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
    self.vocab_size = len(self.token_bytes)
    self.old_vocab_size = 259
    self.name = f"byte+{len(self.merges)}"
    self.path = path
    chars = lambda i: "".join(BYTE_CHARS[x] for x in self.token_bytes[i])
    vocab = {BYTE_CHARS[b]: b for b in range(256)}
    vocab.update({name: 256 + k for k, name in enumerate(_BYTE_SPECIALS)})
    vocab.update({chars(259 + k): 259 + k for k in range(len(self.merges))})
    if len(vocab) != self.vocab_size:
      raise ValueError("ByteBPETokenizer: two merges make the same byte string (learn_merges skips such pairs)")
    self._tok = Tokenizer(models.BPE(vocab, [(chars(a), chars(b)) for a, b in self.merges]))
    self._tok.pre_tokenizer = _byte_pre_tokenizer()
    self._tok.decoder = decoders.ByteLevel()

  @classmethod
  def learn(cls, texts: Sequence[str], num_new: int, min_frequency: int = 2) -> "ByteBPETokenizer":
    counts = _word_counts(_byte_pre_tokenizer().pre_tokenize_str, texts)
    words = sorted(counts)  # a fixed order: the merges depend on the data only
    ids = [[_CHAR_BYTE[ch] for ch in w] for w in words]
    seen = {bytes([b]) for b in range(256)}
    table = [bytes([b]) for b in range(256)] + [b""] * 3

    def allowed(a, b):
      s = table[a] + table[b]
      if s in seen:
        return False
      seen.add(s)
      table.append(s)
      return True

    merges = learn_merges(ids, [counts[w] for w in words], num_new, 259, allowed=allowed,
                          min_frequency=min_frequency)
    return cls([(a, b) for a, b, _ in merges])

  def save(self, path: str) -> None:
    self._tok.save(path)
    self.path = path

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ok = ids[(ids >= 0) & (ids < self.vocab_size)]
    return b"".join(self.token_bytes[i] for i in ok).decode("utf-8", errors="replace")


def _hf_merge_pairs(model: dict) -> list[tuple[str, str]]:
  return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def extend_tokenizer_file(source: str, texts: Sequence[str], num_new: int, first_id: int, path: str, *,
                          min_frequency: int = 2) -> list[str]:
  """Continues the BPE of the `tokenizers` file `source` with `num_new` merges learned on `texts` and writes the
  result to `path`. New tokens get ids `first_id, first_id + 1, ...` (the model's embedding rows may outnumber the
  tokenizer's entries). Returns the new tokens' strings. Raises ValueError for a model that is not BPE."""
  from tokenizers import Tokenizer
  with open(source, encoding="utf-8") as f:
    spec = json.load(f)
  model = spec.get("model", {})
  if model.get("type") != "BPE":
    raise ValueError(f"vocab.extend: {source} holds a {model.get('type')!r} model; only BPE tokenizers can be "
                     "extended with merges")
  if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
    raise ValueError(f"vocab.extend: {source} uses a subword prefix / end-of-word suffix, which this extension "
                     "does not model")
  vocab: dict = model["vocab"]
  id_to_str = {int(i): s for s, i in vocab.items()}
  added = {int(t["id"]) for t in spec.get("added_tokens", [])}
  top = max(list(id_to_str) + list(added) + [-1])
  if top >= first_id:
    raise ValueError(f"vocab.extend: {source} has token id {top} >= the model's {first_id} embedding rows")
  backend = Tokenizer.from_file(source)
  normalize = backend.normalizer.normalize_str if backend.normalizer is not None else None
  pre = backend.pre_tokenizer.pre_tokenize_str if backend.pre_tokenizer is not None else (lambda t: [(t, None)])
  counts = _word_counts(pre, texts, normalize)
  words = sorted(counts)
  ids = [[t.id for t in backend.model.tokenize(w)] for w in words]
  fallback = bool(model.get("byte_fallback"))
  names = dict(id_to_str)

  def allowed(a, b):
    if a in added or b in added or a not in names or b not in names:
      return False
    if fallback and any(names[x].startswith("<0x") and names[x].endswith(">") for x in (a, b)):
      return False  # byte-fallback pieces are not text: their concatenation means nothing
    s = names[a] + names[b]
    if s in vocab:
      return False
    names[first_id + len(new_strings)] = s
    new_strings.append(s)
    vocab[s] = first_id + len(new_strings) - 1
    return True

  new_strings: list[str] = []
  merges = learn_merges(ids, [counts[w] for w in words], num_new, first_id, allowed=allowed,
                        min_frequency=min_frequency)
  pairs = [(names[a], names[b]) for a, b, _ in merges]
  as_strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
  model["merges"] = list(model.get("merges", [])) + [f"{a} {b}" if as_strings else [a, b] for a, b in pairs]
  model["vocab"] = vocab
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f, ensure_ascii=False)
  return new_strings[:len(merges)]


# ----------------------------------------------------------------------------- measuring across vocabularies

def token_byte_lengths(tokenizer, size: int | None = None) -> np.ndarray:
  """int32 [size]: the UTF-8 bytes each id stands for (0 for specials and ids past the tokenizer's entries).

  Exact for the byte tokenizers; for a `tokenizers` file it reads the vocabulary strings: byte-level BPE through
  the byte alphabet, SentencePiece-style files with U+2581 as a space and `<0xNN>` pieces as one byte."""
  from cl_jax.data.tokenizer import ByteTokenizer
  size = int(size or tokenizer.vocab_size)
  out = np.zeros(size, np.int32)
  if isinstance(tokenizer, ByteBPETokenizer):
    n = min(size, tokenizer.vocab_size)
    out[:n] = [len(b) for b in tokenizer.token_bytes[:n]]
    return out
  if isinstance(tokenizer, ByteTokenizer):
    out[:min(size, 256)] = 1
    return out
  with open(tokenizer.path, encoding="utf-8") as f:
    spec = json.load(f)
  byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
  specials = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special", True)}
  for s, i in spec["model"]["vocab"].items():
    if i >= size or i in specials:
      continue
    if byte_level:
      out[i] = sum(1 if ch in _CHAR_BYTE else len(ch.encode("utf-8")) for ch in s)
    elif s.startswith("<0x") and s.endswith(">") and len(s) == 6:
      out[i] = 1
    else:
      out[i] = len(s.replace("\u2581", " ").encode("utf-8"))
  return out


def fertility(tokenizer, texts: Sequence[str]) -> float:
  """Tokens per byte of `texts` (UTF-8): 1.0 for the byte model, lower with multi-byte tokens."""
  from cl_jax.data.text import encode_all
  tokens = sum(len(ids) for ids in encode_all(tokenizer, list(texts)))
  return tokens / max(sum(len(t.encode("utf-8")) for t in texts), 1)


def bits_per_byte(perplexity: float, tokens: np.ndarray, byte_lengths: np.ndarray) -> float:
  """Bits per byte of the targets `tokens[:, 1:]` from their per-token perplexity: `n ln(ppl) / (ln 2 * bytes)`.

  The eos between documents is a target with no bytes: its NLL counts, as the model must predict it."""
  targets = np.asarray(tokens)[:, 1:]
  nats = float(np.log(perplexity)) * targets.size
  return nats / (np.log(2.0) * float(np.sum(byte_lengths[targets])))


# ----------------------------------------------------------------------------- the run: vocab.extend

def default_vocab_config():
  """The `vocab` section of an LM config (`cl_jax.lm.config.default_config`)."""
  import ml_collections
  return ml_collections.ConfigDict(dict(
      extend=0,               # N > 0: learn N new tokens on the domain corpus before adaptation
      old_row_lr_scale=0.0,   # learning rate of the old vocabulary rows relative to the run's (0: frozen)
      new_row_lr_scale=1.0,   # learning rate of the new rows relative to the run's (they start untrained)
      noise_scale=0.01,       # new rows: mean of the old rows + noise_scale * their std * N(0, 1)
      min_frequency=2))       # a merge must occur this often in the domain's training words


def check_vocab_config(c) -> None:
  v = c.vocab
  if not isinstance(v.extend, int) or isinstance(v.extend, bool) or v.extend < 0:
    raise ValueError(f"vocab.extend={v.extend!r}: must be an integer >= 0 (0: no extension)")
  if not 0.0 <= v.old_row_lr_scale <= 1.0:
    raise ValueError(f"vocab.old_row_lr_scale={v.old_row_lr_scale}: must be in [0, 1] (0: old rows frozen)")
  if not 0.0 < v.new_row_lr_scale <= 100.0:
    raise ValueError(f"vocab.new_row_lr_scale={v.new_row_lr_scale}: must be in (0, 100]")
  if not v.noise_scale >= 0:
    raise ValueError(f"vocab.noise_scale={v.noise_scale}: must be >= 0")
  if not isinstance(v.min_frequency, int) or v.min_frequency < 1:
    raise ValueError(f"vocab.min_frequency={v.min_frequency!r}: must be an integer >= 1")
  if v.extend:
    if "lora" in c.strategy.split("+"):
      raise ValueError(f"vocab.extend={v.extend} with strategy={c.strategy!r}: LoRA freezes the embedding, so "
                       "the new token rows could not train; use a full-model strategy")
    tok = str(c.lm.tokenizer)
    if not c.lm.init_from and tok.endswith(".model"):
      raise ValueError(f"vocab.extend={v.extend} with lm.tokenizer={tok!r}: SentencePiece models cannot be "
                       "extended here; use 'byte' or a `tokenizers` .json file")


def domain_train_texts(c) -> list[str]:
  """The domain corpus's training documents, split exactly as `cl_jax.lm.data.load_data` splits them."""
  from cl_jax.data import text as textdata
  t = c.text
  docs = textdata.deduplicate(textdata.domain_documents(t.domain))
  split = textdata.split_documents(docs, seed=t.split_seed, validation=t.validation, test=t.test)
  return [d.text for d in split["train"]]


def _extension_settings(c, base_tokenizer, old_rows: int) -> dict:
  return {"extend": int(c.vocab.extend), "min_frequency": int(c.vocab.min_frequency), "domain": c.text.domain,
          "split_seed": int(c.text.split_seed), "validation": float(c.text.validation), "test": float(c.text.test),
          "base_tokenizer": getattr(base_tokenizer, "name", type(base_tokenizer).__name__), "old_rows": old_rows}


def extended_tokenizer(c, base_tokenizer, old_rows: int, workdir: str):
  """The run's extended tokenizer: read from `<workdir>/vocab/` when a previous start of this run wrote it (same
  settings), else learned on the domain's training documents and written there (process 0)."""
  from cl_jax.data.tokenizer import ByteTokenizer, HFTokenizer
  from cl_jax.workdir import is_writer
  folder = os.path.join(workdir, "vocab")
  meta_path, tok_path = os.path.join(folder, "extension.json"), os.path.join(folder, "tokenizer.json")
  settings = _extension_settings(c, base_tokenizer, old_rows)
  meta = None
  if os.path.exists(meta_path) and os.path.exists(tok_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("settings") != settings:
      meta = None
  if isinstance(base_tokenizer, ByteTokenizer):
    if meta is not None:
      tok = ByteBPETokenizer([tuple(m) for m in meta["merges"]], path=tok_path)
    else:
      tok = ByteBPETokenizer.learn(domain_train_texts(c), int(c.vocab.extend), int(c.vocab.min_frequency))
      _require_count(c, len(tok.merges))
      meta = {"settings": settings, "kind": "byte", "merges": [list(m) for m in tok.merges],
              "new_tokens": [tok.token_bytes[259 + k].decode("utf-8", "replace") for k in range(len(tok.merges))]}
      if is_writer():
        os.makedirs(folder, exist_ok=True)
        tok.save(tok_path)
    tok.path = tok_path
  elif isinstance(base_tokenizer, HFTokenizer):
    if meta is None:
      os.makedirs(folder, exist_ok=True)
      tmp = f"{tok_path}.tmp{jax.process_index()}"  # every process learns the same file; each writes its own
      source = base_tokenizer.path
      if not source.endswith(".json"):  # a converted SentencePiece model: extend its tokenizers JSON
        source = f"{tmp}.base.json"
        base_tokenizer.save(source)
      new = extend_tokenizer_file(source, domain_train_texts(c), int(c.vocab.extend), old_rows, tmp,
                                  min_frequency=int(c.vocab.min_frequency))
      _require_count(c, len(new))
      os.replace(tmp, tok_path)
      for side in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        other = os.path.join(os.path.dirname(base_tokenizer.path), side)
        if os.path.exists(other):
          shutil.copyfile(other, os.path.join(folder, side))
      meta = {"settings": settings, "kind": "tokenizer_file", "new_tokens": new}
    tok = HFTokenizer(tok_path, eos_id=base_tokenizer.eos_id, bos_id=base_tokenizer.bos_id,
                      pad_id=base_tokenizer.pad_id)
    tok.separator_id = base_tokenizer.separator_id  # lm.doc_separator's choice survives the extension
    tok.vocab_size = old_rows + int(c.vocab.extend)  # the model's rows: ids past the file's entries never occur
  else:
    raise ValueError(f"vocab.extend={c.vocab.extend}: the tokenizer {type(base_tokenizer).__name__} cannot be "
                     "extended (byte or `tokenizers` BPE files only)")
  tok.old_vocab_size = old_rows
  if is_writer():
    os.makedirs(folder, exist_ok=True)
    with open(meta_path, "w") as f:
      json.dump(meta, f, indent=1, ensure_ascii=False)
  return tok


def _require_count(c, got: int) -> None:
  if got < c.vocab.extend:
    from cl_jax.errors import ConfigError
    raise ConfigError(f"vocab.extend={c.vocab.extend}: the domain corpus {c.text.domain!r} yields only {got} "
                      f"merges occurring >= vocab.min_frequency={c.vocab.min_frequency} times")


def extend_for_run(c, data, model, base_params, workdir: str, imported=None):
  """The `vocab.extend` step of an LM run, between the base and the adaptation (`cl_jax.lm.runner.run`).

  Returns `(data, model, base_params, imported)`: the corpora re-read with the extended tokenizer, the model and
  base with N mean-initialised rows (`extend_vocab`, seeded by `seed`), and the import record pointing at the
  new tokenizer (so `lm.export_hf` writes it). Unchanged when `vocab.extend` is 0.
  """
  if not c.vocab.extend:
    return data, model, base_params, imported
  from cl_jax.lm.data import load_data
  old_rows = int(base_params["embed"]["embedding"].shape[0])
  tok = extended_tokenizer(c, data.tokenizer, old_rows, workdir)
  model, base_params = extend_vocab(model, base_params, int(c.vocab.extend), seed=int(c.seed),
                                    noise_scale=float(c.vocab.noise_scale))
  data = load_data(c, tokenizer=tok)
  if imported is not None:
    imported = imported._replace(tokenizer=tok, model=model)
  return data, model, base_params, imported


def row_scaling(c, params) -> Callable | None:
  """For `cl_jax.lm.runner._optimizer(wrap=...)`: the base optimizer followed by `scale_vocab_rows` (old rows at
  `vocab.old_row_lr_scale` times the rate, new rows at `vocab.new_row_lr_scale` times), or None without an
  extension. Chained after the whole optimizer (clipping included), the global-norm clip still sees every gradient."""
  if not c.vocab.extend:
    return None
  rows = int(params["embed"]["embedding"].shape[0])
  old = rows - int(c.vocab.extend)
  scale, new = float(c.vocab.old_row_lr_scale), float(c.vocab.new_row_lr_scale)
  return lambda tx: optax.chain(tx, scale_vocab_rows(old, scale, new))
