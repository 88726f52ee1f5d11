"""Text corpora, tokenizers, dedup/split/pack and cloze items (cl_jax.data.text, cl_jax.data.tokenizer)."""
from __future__ import annotations

import ast
import json
import os
import sys
import types

import numpy as np
import pytest

from cl_jax.data import text
from cl_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from cl_jax.errors import ConfigError


def test_byte_tokenizer_round_trip_and_specials():
  tok = ByteTokenizer()
  s = "def f(x):\n  return 'héllo → ✓'"
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert len(ids) == len(s.encode("utf-8"))
  assert tok.decode(ids) == s
  with_specials = np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])
  assert tok.decode(with_specials) == s
  assert tok.vocab_size == 259 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


def test_tokenizer_file_paths(tmp_path, monkeypatch):
  path = tmp_path / "tok.json"
  path.write_text("{}")
  # A missing package is a clear ImportError that names it.
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match="pip install tokenizers"):
    load_tokenizer(str(path))
  # With the package present, the file is loaded and the specials are found by name.
  vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3}

  class FakeTok:
    @staticmethod
    def from_file(p):
      assert p == str(path)
      return FakeTok()

    def get_vocab_size(self, with_added_tokens=True):
      return len(vocab)

    def token_to_id(self, t):
      return vocab.get(t)

    def encode(self, s, add_special_tokens=False):
      return types.SimpleNamespace(ids=[vocab[c] for c in s])

    def decode(self, ids, skip_special_tokens=True):
      inv = {v: k for k, v in vocab.items()}
      return "".join(inv[i] for i in ids if not (skip_special_tokens and i < 2))

  monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTok))
  tok = load_tokenizer(str(path))
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (4, 0, 1, 1)
  np.testing.assert_array_equal(tok.encode("abba"), [2, 3, 3, 2])
  assert tok.decode([2, 1, 3]) == "ab"
  with pytest.raises(ValueError, match="unknown file type"):
    (tmp_path / "tok.txt").write_text("")
    load_tokenizer(str(tmp_path / "tok.txt"))
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_tokenizer(str(tmp_path / "missing.model"))


def test_dedup_and_group_split_have_no_overlap():
  docs = text.deduplicate(text.general_documents())
  norm = [" ".join(d.text.split()) for d in docs]
  assert len(set(norm)) == len(norm)
  assert len(text.deduplicate(docs + docs[:10])) == len(docs)
  splits = text.split_documents(docs, seed=0, validation=0.1, test=0.1)
  assert sum(len(v) for v in splits.values()) == len(docs)
  groups = {s: {d.group for d in v} for s, v in splits.items()}
  texts = {s: {" ".join(d.text.split()) for d in v} for s, v in splits.items()}
  for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
    assert not groups[a] & groups[b], (a, b)
    assert not texts[a] & texts[b], (a, b)
  # Group-level fractions are near the configured ones (binomial tolerance over groups).
  n_groups = len({d.group for d in docs})
  for s in ("validation", "test"):
    assert abs(len(groups[s]) / n_groups - 0.1) < 4 * np.sqrt(0.09 / n_groups)
  # The split is a function of the seed: same seed, same split; another seed, another split.
  again = text.split_documents(docs, seed=0, validation=0.1, test=0.1)
  assert [d.group for d in again["test"]] == [d.group for d in splits["test"]]
  other = text.split_documents(docs, seed=1, validation=0.1, test=0.1)
  assert {d.group for d in other["test"]} != groups["test"]


def test_general_and_code_domains_are_disjoint():
  general = text.general_documents()
  code = text.code_documents()
  assert len(general) > 1000 and len(code) > 200
  code_groups = {d.group for d in code}
  assert not code_groups & {d.group for d in general}
  # No docstring of the general domain sits inside a code document (it would leak held-out prose).
  sample = general[::50]
  blob = "\n".join(d.text for d in code)
  clean = [d for d in sample if d.group.startswith("stdlib:")]
  leaked = [d.group for d in clean if " ".join(d.text.split()[:12]) in " ".join(blob.split())]
  assert len(leaked) <= len(clean) // 20, leaked  # only docstrings shared verbatim across modules
  for d in code[:40]:
    ast.parse(d.text)  # code documents are whole, valid Python modules


def test_pack_layout():
  docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])]
  packed = text.pack(docs, seq_len=4, eos_id=0)
  # Stream: 1 2 3 0 | 4 0 5 6 | 7 8 9 0  (12 tokens -> 3 sequences, nothing dropped).
  np.testing.assert_array_equal(packed.tokens, [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]])
  np.testing.assert_array_equal(packed.doc_index, [0, 1, 2])
  assert text.pack(docs, seq_len=5, eos_id=0).tokens.shape == (2, 5)  # the tail of 2 is dropped
  with pytest.raises(ValueError, match="seq_len"):
    text.pack(docs, seq_len=1, eos_id=0)


def test_load_domain_from_local_files(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
  (tmp_path / "dup.txt").write_text("document number 0 " * 20)  # exact duplicate of doc0
  tok = ByteTokenizer()
  dom = text.load_domain(f"files:{tmp_path}/*.txt", tok, seq_len=32, seed=0, validation=0.2, test=0.2)
  n_docs = sum(len(v) for v in dom.documents.values())
  assert n_docs == 40
  for s in text.SPLITS:
    p = dom.splits[s]
    assert p.tokens.dtype == np.int32 and p.tokens.shape[1] == 32
    # Every packed token stream decodes back to the split's documents joined by eos.
    stream = np.concatenate([np.append(tok.encode(d.text), tok.eos_id) for d in dom.documents[s]])
    np.testing.assert_array_equal(p.tokens.ravel(), stream[:p.tokens.size])
  with pytest.raises(ConfigError, match=r"^domain='files:.*\*.none': no file matches the glob"):
    text.load_domain(f"files:{tmp_path}/*.none", tok, seq_len=32)
  with pytest.raises(ValueError, match="expected 'general'"):
    text.load_domain("wikipedia", tok, seq_len=32)


def test_tfds_domain_through_data_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=30):
    docs = text.domain_documents("tfds:imdb_reviews:train:text")
    assert len(docs) == 30 and all(isinstance(d.text, str) for d in docs)
    with pytest.raises(KeyError, match="no feature 'body'"):
      text.domain_documents("tfds:imdb_reviews:train:body")


def test_cloze_items_are_correct_and_fair():
  tok = ByteTokenizer()
  dom = text.load_domain("general", tok, seq_len=64)
  items = text.make_cloze_items(dom.documents["test"], tok, num_items=50, context_tokens=48, seed=3)
  assert items.context.shape == (50, 48) and items.choices.shape[:2] == (50, 4)
  test_text = "\n".join(d.text for d in dom.documents["test"])
  for i in range(50):
    lens = items.choice_mask[i].sum(-1)
    assert np.all(lens == lens[0])  # equal token lengths: summed log-likelihoods are comparable
    words = [tok.decode(items.choices[i, k][items.choice_mask[i, k]]) for k in range(4)]
    assert len(set(words)) == 4 and all(w.startswith(" ") for w in words)
    # The true word really follows the context in the held-out text.
    assert tok.decode(items.context[i]) + words[items.answer[i]] in test_text
  # Answers are spread over positions (no position bias for a model to exploit).
  assert len(np.unique(items.answer)) == 4


def _write_corpus(root, n_txt=30, n_jsonl=50):
  (root / "notes").mkdir(parents=True)
  for i in range(n_txt):
    (root / "notes" / f"note{i:02d}.txt").write_text(f"Patient {i} presented with symptom {i % 7}. " * 8)
  lines = [json.dumps({"text": f"Record {i}: the dose was {i * 3} mg twice daily. " * 6, "id": i})
           for i in range(n_jsonl)]
  (root / "records.jsonl").write_text("\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:]) + "\n")
  (root / "scan.pdf").write_bytes(b"%PDF not part of the corpus")  # no text format: skipped, with a warning


def test_directory_domain_reads_txt_and_jsonl_and_splits_by_document(tmp_path):
  from cl_jax.models import hf_checkpoint
  _write_corpus(tmp_path)
  docs = text.directory_documents(str(tmp_path))
  assert len(docs) == 30 + 50  # scan.pdf and the blank line are not documents
  assert docs[0].group == "dir:notes/note00.txt" and docs[-1].group == "dir:records.jsonl:51"
  assert docs[-1].text.startswith("Record 49:")
  # Tokenized with a checkpoint's own tokenizer (tokenizer.json through `tokenizers`), also reachable as
  # lm.tokenizer=<checkpoint directory>.
  checkpoint = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
  tok = hf_checkpoint.load_tokenizer(checkpoint)
  same = load_tokenizer(checkpoint)
  assert (same.vocab_size, same.eos_id) == (tok.vocab_size, 2)
  np.testing.assert_array_equal(same.encode("dose twice daily"), tok.encode("dose twice daily"))
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    load_tokenizer(str(tmp_path / "notes"))
  dom = text.load_domain(f"dir:{tmp_path}", tok, seq_len=16, seed=0, validation=0.2, test=0.2)
  sizes = {s: len(dom.documents[s]) for s in text.SPLITS}
  assert sum(sizes.values()) == 80 and min(sizes.values()) >= 5  # by document: jsonl lines spread over splits
  groups = {s: {d.group for d in dom.documents[s]} for s in text.SPLITS}
  assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["validation"])
  assert any(g.startswith("dir:records.jsonl") for g in groups["test"])
  for s in text.SPLITS:
    stream = np.concatenate([np.append(tok.encode(d.text), tok.eos_id) for d in dom.documents[s]])
    np.testing.assert_array_equal(dom.splits[s].tokens.ravel(), stream[:dom.splits[s].tokens.size])
    assert dom.splits[s].tokens.max() < tok.vocab_size


def test_directory_domain_errors_name_the_file(tmp_path):
  with pytest.raises(ConfigError, match="missing': no such directory"):
    text.domain_documents(f"dir:{tmp_path}/missing")
  (tmp_path / "a.png").write_bytes(b"x")
  with pytest.raises(ConfigError, match="a.png': not a directory"):
    text.domain_documents(f"dir:{tmp_path}/a.png")
  with pytest.raises(ConfigError, match=r"no corpus file under"):
    text.domain_documents(f"dir:{tmp_path}")
  (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  with pytest.raises(ValueError, match=r"b.jsonl:2 has no string 'text' field"):
    text.domain_documents(f"dir:{tmp_path}")
  (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{not json\n')
  with pytest.raises(ValueError, match=r"b.jsonl:2 is not valid JSON"):
    text.domain_documents(f"dir:{tmp_path}")


# ----------------------------------------------------------------------------- bad corpora through the CLI

def _refused(capsys, workdir, *overrides):
  """Runs configs/cpt_lm.py through the CLI with `overrides`; asserts exit 2, one `error:` line on stderr and no
  workdir, and returns the line."""
  from cl_jax.cli import main
  rc = main(["--config", "configs/cpt_lm.py", *overrides, "--workdir", str(workdir), "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2, err
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
  assert not workdir.exists()
  return err


def test_missing_or_empty_corpora_are_refused_at_validation_naming_the_key(tmp_path, capsys):
  missing, empty = tmp_path / "missing", tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.png").write_bytes(b"not a corpus file")  # no text format
  workdir = tmp_path / "w"
  err = _refused(capsys, workdir, f"--config.text.domain=dir:{missing}")
  assert err == (f"error: text.domain='dir:{missing}': no such directory (expected a directory of text or source "
                 "files, .jsonl(.gz/.zst) or .parquet files)")
  err = _refused(capsys, workdir, f"--config.text.general=dir:{empty}")
  assert err.startswith(f"error: text.general='dir:{empty}': no corpus file under {empty}")
  err = _refused(capsys, workdir, f"--config.text.domain=files:{tmp_path}/*.txt")
  assert err.startswith(f"error: text.domain='files:{tmp_path}/*.txt': no file matches the glob")
  err = _refused(capsys, workdir, "--config.text.domain=wikipedia")
  assert err.startswith("error: text.domain='wikipedia': expected 'general', 'code'")


def test_a_corpus_file_that_is_not_utf8_is_named_with_its_byte_offset(tmp_path, capsys):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(5):
    (corpus / f"note{i}.txt").write_text(f"Plain note {i}. " * 20)
  latin1 = corpus / "zz_latin1.txt"
  latin1.write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1"))
  err = _refused(capsys, tmp_path / "w", f"--config.text.general=dir:{corpus}")
  assert err == (f"error: {latin1}: not UTF-8 (byte 0xe9 at offset 3); a corpus file must be UTF-8 text: re-encode "
                 "it, e.g. iconv -f latin1 -t utf-8")
  # The same through `files:`, and in a .jsonl file: the offset counts from the start of the file (17 + 12).
  with pytest.raises(ConfigError, match=r"zz_latin1.txt: not UTF-8 \(byte 0xe9 at offset 3\)"):
    text.domain_documents(f"files:{corpus}/*.txt")
  records = corpus / "records.jsonl"
  records.write_bytes(b'{"text": "fine"}\n{"text": "na\xefve"}\n')
  latin1.unlink()
  with pytest.raises(ConfigError, match=r"records.jsonl: not UTF-8 \(byte 0xef at offset 29\)"):
    text.domain_documents(f"dir:{corpus}")
