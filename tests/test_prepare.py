"""Tokenize-once corpora (cl_jax.data.prepare): shards, manifest, resume, verification, and LM runs on a cache."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from cl_jax.data import prepare, text
from cl_jax.data.tokenizer import ByteTokenizer
from cl_jax.errors import ConfigError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _corpus(root, n_txt=40, n_jsonl=60, extra=True):
  rng = np.random.default_rng(0)
  doc = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
  os.makedirs(root / "notes", exist_ok=True)
  for i in range(n_txt):
    (root / "notes" / f"n{i:02d}.txt").write_text(doc(int(rng.integers(20, 120))))
  with open(root / "records.jsonl", "w") as f:
    for _ in range(n_jsonl):
      f.write(json.dumps({"text": doc(int(rng.integers(10, 80)))}) + "\n")
    f.write(json.dumps({"text": "same  text"}) + "\n" + json.dumps({"text": "same text"}) + "\n")  # a duplicate
  if extra:
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
      for _ in range(20):
        f.write(json.dumps({"text": doc(40)}) + "\n")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n")
  return root


def _files(path):
  return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_prepare_packs_exactly_like_the_in_memory_path_deterministically(tmp_path):
  corpus = _corpus(tmp_path / "corpus", extra=False)
  tok = ByteTokenizer()
  m = prepare.prepare([f"dir:{corpus}"], tok, str(tmp_path / "a"), seq_len=32, validation=0.1, test=0.1,
                      shard_sequences=50, progress=False)
  prepare.prepare([f"dir:{corpus}"], tok, str(tmp_path / "b"), seq_len=32, validation=0.1, test=0.1,
                  shard_sequences=50, progress=False)
  assert _files(tmp_path / "a") == _files(tmp_path / "b")  # same inputs, same bytes
  dom = text.load_domain(f"dir:{corpus}", tok, 32, validation=0.1, test=0.1)
  assert m.data["documents"] == sum(len(d) for d in dom.documents.values()) and m.data["duplicates"] == 1
  for split in text.SPLITS:
    cached = prepare.cached_split(m, split)
    np.testing.assert_array_equal(cached.tokens[np.arange(len(cached.tokens))], dom.splits[split].tokens)
    np.testing.assert_array_equal(cached.doc_index, dom.splits[split].doc_index)
    assert m.data["splits"][split]["documents"] == len(dom.documents[split])
  assert len(m.data["splits"]["train"]["shards"]) > 2
  # Segment ids restart at 1 in every sequence and step up exactly after each eos.
  rows = prepare.cached_split(m, "train").tokens
  assert m.data["record"]["dtype"] == "<u2" == rows.record_dtype  # 259 ids fit in 16 bits
  segs = prepare.CachedRows(m.path, rows.files, 32, part=1, record_dtype="<u2")[np.arange(len(rows))]
  toks = rows[np.arange(len(rows))]
  assert (segs[:, 0] == 1).all()
  np.testing.assert_array_equal(np.diff(segs, axis=1), (toks[:, :-1] == tok.eos_id).astype(np.int32))
  # Lazy subsets read the same rows.
  np.testing.assert_array_equal(rows.view([5, 2, 9])[np.array([2, 0])], toks[[9, 5]])


def test_prepare_reads_every_format_warns_on_skipped_files_and_resumes_byte_identically(tmp_path):
  corpus = _corpus(tmp_path / "corpus")
  warnings = []
  kw = dict(seq_len=16, validation=0.1, test=0.1, shard_sequences=40, progress=False, batch_documents=16)
  full = prepare.prepare([f"dir:{corpus}"], ByteTokenizer(), str(tmp_path / "full"), warn=warnings.append, **kw)
  assert len(warnings) == 1 and "picture.png" in warnings[0] and "skipping 1 file" in warnings[0]
  assert full.data["documents"] == 40 + 60 + 1 + 20  # .txt, .jsonl (less a duplicate), .jsonl.gz
  # Interrupted after 3 shards, then run again: the same cache, byte for byte.
  part = prepare.prepare([f"dir:{corpus}"], ByteTokenizer(), str(tmp_path / "cut"), warn=lambda m: None,
                         _stop_after_shards=3, **kw)
  assert part.data == {} and not os.path.exists(tmp_path / "cut" / "manifest.json")
  with pytest.raises(ConfigError, match="unfinished prepare"):
    prepare.open_prepared(str(tmp_path / "cut"))
  prepare.prepare([f"dir:{corpus}"], ByteTokenizer(), str(tmp_path / "cut"), warn=lambda m: None, **kw)
  assert _files(tmp_path / "cut") == _files(tmp_path / "full")
  # A finished cache is returned as it is; other settings at the same --out are refused.
  assert prepare.prepare([f"dir:{corpus}"], ByteTokenizer(), str(tmp_path / "full"), warn=lambda m: None,
                         **kw).data == full.data
  with pytest.raises(ConfigError, match="other sources or settings"):
    prepare.prepare([f"dir:{corpus}"], ByteTokenizer(), str(tmp_path / "full"), warn=lambda m: None,
                    **{**kw, "seq_len": 32})


class _OtherTokenizer(ByteTokenizer):
  def encode(self, s):
    return np.asarray(list(s.encode("utf-8")[::-1]), np.int32)


def test_a_corrupt_or_mismatched_cache_is_one_clear_error(tmp_path):
  corpus = _corpus(tmp_path / "corpus", extra=False)
  m = prepare.prepare([f"dir:{corpus}"], ByteTokenizer(), str(tmp_path / "c"), seq_len=16, shard_sequences=64,
                      progress=False)
  with pytest.raises(ConfigError, match="another tokenizer"):
    prepare.open_prepared(m.path, _OtherTokenizer())
  with pytest.raises(ConfigError, match="lm.seq_len is 32"):
    prepare.open_prepared(m.path, ByteTokenizer(), seq_len=32)
  shard = os.path.join(m.path, m.data["splits"]["train"]["shards"][1]["file"])
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 7)
  with pytest.raises(ConfigError, match="train-00001.array_record is .* bytes, the manifest says"):
    prepare.open_prepared(m.path)
  os.remove(os.path.join(m.path, "manifest.json"))
  with pytest.raises(ConfigError, match="no manifest.json -- not a prepared cache"):
    prepare.check_spec(f"cache:{m.path}", "text.domain")


def test_an_lm_run_reads_a_prepared_cache_as_it_reads_the_raw_text(tmp_path):
  import cl_jax
  from cl_jax.lm.data import load_data
  from tests.test_cpt import _tiny
  corpus = _corpus(tmp_path / "corpus", n_txt=80, n_jsonl=200, extra=False)
  general = f"dir:{_corpus(tmp_path / 'general', n_txt=60, n_jsonl=200, extra=False)}"  # small: a fast test
  assert prepare.main([f"dir:{corpus}", "--tokenizer", "byte", "--seq_len", "32", "--out", str(tmp_path / "cache"),
                       "--shard_sequences", "128"]) == 0
  spec = f"cache:{tmp_path / 'cache'}"
  raw = load_data(_tiny(text__domain=f"dir:{corpus}", text__general=general))
  cached = load_data(_tiny(text__domain=spec, text__general=general))
  # The same training rows (read on demand from the shards), evaluation sets, cloze items and document counts.
  rows = cached.train["domain"]
  assert not isinstance(rows, np.ndarray) and len(rows) == len(raw.train["domain"])
  np.testing.assert_array_equal(rows[np.arange(len(rows))], raw.train["domain"])
  np.testing.assert_array_equal(cached.doc_index["domain"], raw.doc_index["domain"])
  for split in ("validation", "test"):
    np.testing.assert_array_equal(cached.eval[split]["domain"], raw.eval[split]["domain"])
  assert cached.num_docs == raw.num_docs
  # Through the skeleton: a short run trains on the cache; the domain it adapted to improves.
  c = _tiny(text__domain=spec, text__general=general)
  c.pretrain.steps, c.adapt.steps, c.regression.eval_every = 4, 4, 4
  r = cl_jax.run(c, str(tmp_path / "run"), progress=False).extra
  assert r["steps_run"] == 4 and r["test"]["final"]["domain/perplexity"] < r["test"]["base"]["domain/perplexity"]
  # A cache prepared with another split than the run's is refused before anything is written.
  with pytest.raises(ConfigError, match="split with"):
    load_data(_tiny(text__domain=spec, text__general=general, text__split_seed=1))


def test_the_in_memory_path_reads_every_format_and_names_what_it_skips(tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  corpus = _corpus(tmp_path / "corpus", n_txt=2, n_jsonl=3)
  (corpus / "readme.md").write_text("A markdown document.")
  (corpus / "tool.py").write_text("def f():\n    return 1\n")
  with open(corpus / "z.jsonl.zst", "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(b'{"text": "zstd one"}\n{"text": "zstd two"}\n'))
  pq.write_table(pa.table({"text": ["parquet one", "parquet two", None]}), corpus / "t.parquet")
  docs = text.domain_documents(f"dir:{corpus}")
  assert "skipping 1 file(s) of no known text format: picture.png" in capsys.readouterr().err
  texts = {d.text for d in docs}
  assert {"A markdown document.", "def f():\n    return 1\n", "zstd two", "parquet two"} <= texts
  groups = [d.group for d in docs]
  assert "dir:t.parquet:2" in groups and "dir:z.jsonl.zst:1" in groups and "dir:more.jsonl.gz:20" in groups
  assert len(docs) == 2 + 3 + 2 + 20 + 1 + 1 + 2 + 2  # .txt, .jsonl (+2 near-duplicates), .gz, .md, .py, .zst, .parquet
