"""The tiktoken fast path of `cl-jax prepare` (cl_jax.data.tokenizer.tiktoken_encoder): equal ids to `tokenizers`,
byte-identical caches, refusal of ineligible tokenizers, and the sample check that catches a wrong rank table."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("tiktoken")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from cl_jax.data import prepare  # noqa: E402
from cl_jax.data.tokenizer import (BYTE_CHARS, ByteTokenizer, FastPathUnavailable, HFTokenizer,  # noqa: E402
                                   TiktokenBPE, tiktoken_encoder)
from cl_jax.errors import ConfigError  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
# Llama 3's / Qwen2's split pattern (case-insensitive contractions, digits in threes, newlines kept with punctuation).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TEXTS = [
  "The quick brown fox jumps over the lazy dog. It's, we'll, they'RE, I'M, DON'T.",
  "def f(x):\n    return {'a': [x ** 2, 0x1F]}  # comment\n\n\n\tindent\r\n  end  \n",
  "Ünïcödé café naïve e\u0301 (combining) Å\u030a 日本語のテキスト 中文 한국어 العربية Ελληνικά",
  "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷 and 1234567890 12 345 6789 3.14159",
  "runs of     spaces\t\t\ttabs\n\n\n\nnewlines   \u00a0nbsp\u3000ideographic space   ",
  "special strings <|endoftext|> inside<|im_start|>user\nhi<|im_end|> and partial <|endoftext and <|im_",
  "<|endoftext|><|endoftext|>x", "", " ", "\n", "a", "'s's'S",
  "mixed: for i in range(10): print(f\"{i:>3}\")  // C++: std::vector<int> v{1,2,3};",
]


def _training_text():
  rng = np.random.default_rng(0)
  words = ("alpha beta gamma delta return def class import lambda print range self value the and of to in is "
           "café naïve 日本 語 🙂 0123 456 789 it's we'll (x) [y] {z} -> == != ** // <| |>").split()
  docs = [" ".join(rng.choice(words, 60)) for _ in range(150)]
  return docs + [t for t in TEXTS if t] * 3


def _train(pre, normalizer=None, vocab=700):
  tok = Tokenizer(models.BPE())
  if normalizer is not None:
    tok.normalizer = normalizer
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tok


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Byte-level BPE files in the three shapes the fast path takes: GPT-2 (ByteLevel regex), Qwen2 (NFC, Split
  regex then ByteLevel), Llama 3 (the same with ignore_merges)."""
  root = tmp_path_factory.mktemp("bpe")
  out = {}
  out["gpt2"] = _train(pre_tokenizers.ByteLevel(add_prefix_space=False))
  split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  out["qwen2"] = _train(split, normalizers.NFC())
  llama = json.loads(_train(split).to_str())
  llama["model"]["ignore_merges"] = True
  out["llama3"] = Tokenizer.from_str(json.dumps(llama))
  paths = {}
  for name, tok in out.items():
    paths[name] = str(root / f"{name}.json")
    tok.save(paths[name])
  return paths


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llama3"])
def test_tiktoken_gives_the_ids_of_tokenizers_on_varied_text(files, kind):
  hf = HFTokenizer(files[kind])
  fast = tiktoken_encoder(hf)
  texts = TEXTS + [" ".join(TEXTS), "".join(TEXTS[::-1])]
  want = [hf.encode(t) for t in texts]
  for t, w, one, batch in zip(texts, want, [fast.encode(t) for t in texts], fast.encode_batch(texts)):
    np.testing.assert_array_equal(one, w, err_msg=repr(t))
    np.testing.assert_array_equal(batch, w, err_msg=repr(t))
  # The special-token strings inside documents became their ids in both (prepare encodes them so).
  ids = hf.encode(TEXTS[5])
  assert hf.token_id("<|im_start|>") in ids.tolist() and hf.token_id("<|endoftext|>") in ids.tolist()


def _bytes_vocab(merges):
  """A byte-level BPE over the 256 byte characters with the given merges (strings of them), ids in merge order."""
  vocab = {ch: i for i, ch in enumerate(BYTE_CHARS)}
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  return vocab


def _bare(vocab, merges, path):
  tok = Tokenizer(models.BPE(vocab, merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.add_special_tokens(["<|endoftext|>"])
  tok.save(str(path))
  return HFTokenizer(str(path))


def test_a_token_its_merges_cannot_build_from_its_own_bytes_is_left_out(tmp_path):
  # 'abc' is made by (ab, c), but from the bytes a b c the merge list makes 'bc' first and then stops at [a, bc];
  # tiktoken, given 'abc', would return it whole.
  merges = [("b", "c"), ("a", "b"), ("ab", "c")]
  hf = _bare(_bytes_vocab(merges), merges, tmp_path / "t.json")
  fast = tiktoken_encoder(hf)
  assert fast.dropped == 1
  for text in ("abc", "xabcabc abc", "ab bc"):
    np.testing.assert_array_equal(fast.encode(text), hf.encode(text))
  assert hf.encode("abc").tolist() == [ord("a"), 256]


def test_ineligible_tokenizers_are_refused_with_the_reason(files, tmp_path):
  # Merge order that disagrees with the ids: two merges swapped.
  spec = json.loads(open(files["gpt2"]).read())
  spec["model"]["merges"][3], spec["model"]["merges"][4] = spec["model"]["merges"][4], spec["model"]["merges"][3]
  (tmp_path / "swapped.json").write_text(json.dumps(spec))
  with pytest.raises(FastPathUnavailable, match="merge order and token ids disagree"):
    tiktoken_encoder(HFTokenizer(str(tmp_path / "swapped.json")))
  # A SentencePiece-style (Metaspace) file, as every checkpoint fixture here is.
  meta = HFTokenizer(os.path.join(FIXTURES, "gpt2", "tokenizer.json"))
  with pytest.raises(FastPathUnavailable, match="pre-tokenizer"):
    tiktoken_encoder(meta)
  # A byte-level BPE trained without the full byte alphabet (a byte it never saw has no token).
  spec = json.loads(open(files["gpt2"]).read())
  del spec["model"]["vocab"][BYTE_CHARS[0]]
  (tmp_path / "partial.json").write_text(json.dumps(spec))
  with pytest.raises(FastPathUnavailable, match="256 byte-level"):
    tiktoken_encoder(HFTokenizer(str(tmp_path / "partial.json")))
  # auto: the tokenizer's own encoder, with the reason; tiktoken: a ConfigError before anything is written.
  assert prepare.select_encoder(meta, "auto")[0] is None
  assert "pre-tokenizer" in prepare.select_encoder(meta, "auto")[1]
  with pytest.raises(ConfigError, match="tokenizer_backend=tiktoken: .*pre-tokenizer"):
    prepare.prepare(["general"], meta, str(tmp_path / "never"), seq_len=16, tokenizer_backend="tiktoken",
                    progress=False)
  assert not os.path.exists(tmp_path / "never")
  with pytest.raises(ConfigError, match="not a tokenizers file"):
    prepare.select_encoder(ByteTokenizer(), "tiktoken")
  with pytest.raises(ConfigError, match="tokenizer_backend='fast'"):
    prepare.select_encoder(meta, "fast")


def test_without_tiktoken_auto_falls_back_and_tiktoken_is_refused(files, monkeypatch):
  monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
  hf = HFTokenizer(files["gpt2"])
  fast, why = prepare.select_encoder(hf, "auto")
  assert fast is None and "pip install tiktoken" in why
  with pytest.raises(ConfigError, match="tiktoken"):
    prepare.select_encoder(hf, "tiktoken")


def _corpus(root):
  rng = np.random.default_rng(1)
  os.makedirs(root, exist_ok=True)
  docs = _training_text()
  with open(root / "docs.jsonl", "w") as f:
    for i in range(240):
      a, b = rng.integers(0, len(docs), 2)
      f.write(json.dumps({"text": f"{docs[a]} {TEXTS[i % len(TEXTS)]} {docs[b][:int(rng.integers(1, 200))]}"})
              + "\n")
  return root


def _files(path):
  return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path)) if f != "manifest.json"}


def _manifest(path):
  data = json.load(open(os.path.join(path, "manifest.json")))
  return data, {k: v for k, v in data.items() if k != "encoder"}


def test_caches_are_byte_identical_between_backends_and_resume(files, tmp_path):
  corpus = _corpus(tmp_path / "corpus")
  hf = HFTokenizer(files["qwen2"])
  kw = dict(seq_len=64, shard_sequences=40, batch_documents=50, validation=0.1, test=0.1, progress=False)
  prepare.prepare([f"dir:{corpus}"], hf, str(tmp_path / "slow"), tokenizer_backend="tokenizers", **kw)
  prepare.prepare([f"dir:{corpus}"], hf, str(tmp_path / "fast"), tokenizer_backend="auto", verify_first=10,
                  verify_every=7, **kw)
  slow, fast = _files(tmp_path / "slow"), _files(tmp_path / "fast")
  assert len([f for f in slow if f.endswith(".array_record")]) > 3 and slow == fast
  (ms, s), (mf, f) = _manifest(tmp_path / "slow"), _manifest(tmp_path / "fast")
  assert s == f
  n = mf["documents"]
  assert mf["encoder"]["backend"] == "tiktoken" and ms["encoder"]["backend"] == "tokenizers"
  assert mf["encoder"]["verified_documents"] == 10 + len([k for k in range(11, n + 1) if k % 7 == 0])
  assert ms["encoder"]["verified_documents"] == 0
  # Interrupted after two shards with tiktoken, resumed: the same bytes and the same verification count.
  out = str(tmp_path / "resumed")
  prepare.prepare([f"dir:{corpus}"], hf, out, tokenizer_backend="tiktoken", verify_first=10, verify_every=7,
                  _stop_after_shards=2, **kw)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  prepare.prepare([f"dir:{corpus}"], hf, out, tokenizer_backend="tiktoken", verify_first=10, verify_every=7, **kw)
  assert _files(out) == slow and _manifest(out)[0]["encoder"] == mf["encoder"]


def _corrupted(hf):
  """The fast encoder of `hf` with the ids of its ten most frequent multi-byte tokens in the corpus rotated."""
  import tiktoken
  good = tiktoken_encoder(hf)
  ranks = dict(good._enc._mergeable_ranks)
  counts = np.bincount(np.concatenate(hf.encode_batch(_training_text())), minlength=hf.vocab_size)
  multi = [int(i) for i in np.argsort(-counts) if 256 <= i < len(ranks)][:10]
  byte_of = {i: b for b, i in ranks.items()}
  for old, new in zip(multi, multi[1:] + multi[:1]):
    ranks[byte_of[old]] = new
  enc = tiktoken.Encoding("corrupt", pat_str=good._enc._pat_str, mergeable_ranks=ranks,
                          special_tokens=good._enc._special_tokens)
  return TiktokenBPE(enc, nfc=False, dropped=0)


def test_the_sample_check_catches_a_corrupted_rank_table(files, tmp_path):
  corpus = _corpus(tmp_path / "corpus")
  hf = HFTokenizer(files["gpt2"])
  kw = dict(seq_len=64, shard_sequences=40, batch_documents=50, progress=False)
  bad = _corrupted(hf)
  assert any(not np.array_equal(x, y) for x, y in zip(bad.encode_batch(TEXTS), hf.encode_batch(TEXTS)))
  # Explicit tiktoken: a ConfigError naming the document, nothing of the cache left behind. Only every 110th
  # document is checked: the corruption is found in the third batch, after shards of the first were written.
  out = tmp_path / "strict"
  written = []
  real_save = prepare._save_progress
  prepare._save_progress = lambda *a: (written.append(1), real_save(*a))
  try:
    with pytest.raises(ConfigError, match="disagree on document 110 "):
      prepare.prepare([f"dir:{corpus}"], hf, str(out), tokenizer_backend="tiktoken", verify_first=0,
                      verify_every=110, _fast_encoder=bad, **kw)
  finally:
    prepare._save_progress = real_save
  assert written and os.listdir(out) == []
  # auto: a warning, then the whole cache from tokenizers -- the bytes of a tokenizers-only prepare.
  warnings = []
  m = prepare.prepare([f"dir:{corpus}"], hf, str(tmp_path / "auto"), tokenizer_backend="auto", verify_first=0,
                      verify_every=5, _fast_encoder=bad, warn=warnings.append, **kw)
  assert len(warnings) == 1 and "starting again with tokenizers" in warnings[0]
  assert m.data["encoder"]["backend"] == "tokenizers" and "refused by the check" in m.data["encoder"]["note"]
  prepare.prepare([f"dir:{corpus}"], hf, str(tmp_path / "slow"), tokenizer_backend="tokenizers", **kw)
  assert _files(tmp_path / "auto") == _files(tmp_path / "slow")
