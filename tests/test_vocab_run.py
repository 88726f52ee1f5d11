"""Vocabulary extension in a continual pre-training run (`vocab.extend`): learning, the run, resume, export."""
from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest

import cl_jax
from cl_jax import faults, lm
from cl_jax.checkpoint import boundary_params
from cl_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from cl_jax.errors import ConfigError
from cl_jax.lm import runner
from cl_jax.lm import vocab as V

CODE = "files:" + os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")
N_NEW = 24


def _tiny(**changes):
  c = lm.default_config()
  c.lm.d_model, c.lm.num_layers, c.lm.num_heads, c.lm.seq_len = 32, 1, 2, 32
  c.text.update(domain=CODE, max_train_sequences=256, eval_sequences=16, cloze_items=16, validation=0.15, test=0.15,
                cloze_context=16)
  if "general_eval_sequences" in c.text:
    c.text.general_eval_sequences = 32
  c.optim.lr = 1e-2
  c.pretrain.update(steps=20, batch_size=8)
  c.adapt.update(steps=10, batch_size=8, mixture="70_30")
  c.regression.update(eval_every=5, eval_batch_size=16, hard_stop=False)
  c.train.log_every_steps = 5
  c.vocab.extend = N_NEW
  for k, v in changes.items():
    section, key = k.split("__")
    c[section][key] = v
  return c


def test_learn_merges_by_hand():
  # Pair counts: (1,2): 5+2 = 7, (2,3): 5+1 = 6 -> merge (1,2) -> 10; then (10,3): 5, (2,3): 1 -> (10,3) -> 11;
  # then only (2,3) with count 1 < min_frequency 2 is left.
  words, counts = [[1, 2, 3], [1, 2], [2, 3]], [5, 2, 1]
  assert V.learn_merges(words, counts, 5, 10) == [(1, 2, 10), (10, 3, 11)]
  assert V.learn_merges(words, counts, 5, 10, min_frequency=1) == [(1, 2, 10), (10, 3, 11), (2, 3, 12)]
  # A banned pair is skipped for good; the next best is taken. Ties go to the smallest pair.
  assert V.learn_merges(words, counts, 1, 10, allowed=lambda a, b: (a, b) != (1, 2)) == [(2, 3, 10)]
  assert V.learn_merges([[4, 5], [1, 2]], [3, 3], 1, 10) == [(1, 2, 10)]


def test_byte_extension_is_deterministic_round_trips_and_lowers_fertility():
  texts = [f"def f{i}(self, value):\n    return self.value + value  # é\n" * 3 for i in range(40)]
  a, b = V.ByteBPETokenizer.learn(texts, 30), V.ByteBPETokenizer.learn(texts, 30)
  assert a.merges == b.merges and len(a.merges) == 30 and a.vocab_size == 259 + 30
  held_out = "class Thing:\n    def method(self, value):\n        return self.value  # ü\n"
  assert a.decode(a.encode(held_out)) == held_out
  assert V.fertility(ByteTokenizer(), [held_out]) == 1.0
  assert V.fertility(a, [held_out]) < 0.75
  # Every new token is a multi-byte string; the byte ids keep their meaning.
  assert all(len(a.token_bytes[i]) >= 2 for i in range(259, a.vocab_size))
  np.testing.assert_array_equal(a.encode("\x00\xff"), ByteTokenizer().encode("\x00\xff"))
  lengths = V.token_byte_lengths(a)
  ids = a.encode(held_out)
  assert int(lengths[ids].sum()) == len(held_out.encode("utf-8"))


def test_tokenizer_file_extension_continues_its_bpe(tmp_path):
  from cl_jax.models import hf_checkpoint
  src = "tests/fixtures/hf/llama"
  tok = hf_checkpoint.load_tokenizer(src, hf_checkpoint.read_config(src))
  texts = ["the theory of the thing then there " * 10]
  out = str(tmp_path / "tokenizer.json")
  new = V.extend_tokenizer_file(tok.path, texts, 6, 200, out)
  assert len(new) == 6
  ext = HFTokenizer(out, eos_id=tok.eos_id, bos_id=tok.bos_id, pad_id=tok.pad_id)
  ids = ext.encode(texts[0])
  assert ids.max() >= 200 and ext.decode(ids) == tok.decode(tok.encode(texts[0]))
  assert len(ids) < len(tok.encode(texts[0]))
  with pytest.raises(ValueError, match="embedding rows"):
    V.extend_tokenizer_file(tok.path, texts, 6, 100, out)  # ids up to 127 exist: new ids must start above


def _embedding(params):
  return np.asarray(params["embed"]["embedding"])


def _flags(c) -> list[str]:
  """`--config.key=value` flags that turn configs/cpt_lm.py into `c` (the keys `_tiny` sets)."""
  keys = ["lm.d_model", "lm.num_layers", "lm.num_heads", "lm.seq_len", "text.domain", "text.max_train_sequences",
          "text.eval_sequences", "text.cloze_items", "text.validation", "text.test", "text.cloze_context",
          "optim.lr", "pretrain.steps", "pretrain.batch_size", "adapt.steps", "adapt.batch_size", "adapt.mixture",
          "regression.eval_every", "regression.eval_batch_size", "regression.hard_stop", "train.log_every_steps",
          "vocab.extend", "optim.schedule"]
  if "general_eval_sequences" in c.text:
    keys.append("text.general_eval_sequences")
  value = lambda k: c[k.split(".")[0]][k.split(".")[1]]
  return [f"--config.{k}={value(k)}" for k in keys]


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory):
  """`run.py --config configs/cpt_lm.py ... --config.vocab.extend=24`: the command-line path end to end."""
  from cl_jax.cli import main
  from cl_jax.results import Results
  workdir = str(tmp_path_factory.mktemp("vocab_run"))
  assert main(["--config", "configs/cpt_lm.py:mixture=70_30", "--workdir", workdir, "--no_progress"]
              + _flags(_tiny())) == 0
  return workdir, Results.load(workdir)


def test_run_extends_the_vocabulary_and_keeps_old_rows_frozen(extended_run):
  workdir, results = extended_run
  meta = json.load(open(os.path.join(workdir, "vocab", "extension.json")))
  assert len(meta["merges"]) == N_NEW and os.path.exists(os.path.join(workdir, "vocab", "tokenizer.json"))
  base = _embedding(boundary_params(os.path.join(workdir, "pretrain")))
  final_params = boundary_params(workdir)
  final = _embedding(final_params)
  assert base.shape == (259, 32) and final.shape == (259 + N_NEW, 32)
  np.testing.assert_array_equal(final[:259], base)            # frozen: bit-identical
  assert np.abs(final[259:] - base.mean(0)).max() > 1e-3       # the new rows trained away from the mean
  record = results.as_dict()
  assert record["steps_run"] == 10 and np.isfinite(record["test"]["final"]["domain/perplexity"])
  # Fertility on the domain's test documents goes down.
  c = _tiny()
  tok = V.ByteBPETokenizer([tuple(m) for m in meta["merges"]])
  from cl_jax.data import text as textdata
  docs = textdata.split_documents(textdata.deduplicate(textdata.domain_documents(CODE)), seed=0, validation=0.15,
                                  test=0.15)["test"]
  assert V.fertility(tok, [d.text for d in docs]) < 0.9
  assert c.vocab.extend == N_NEW


def test_runner_optimizer_scales_old_rows():
  """The adaptation's optimizer (`_optimizer(wrap=row_scaling)`): old rows move at old_row_lr_scale x the rate,
  new rows at new_row_lr_scale x."""
  import jax
  import jax.numpy as jnp
  import optax
  from cl_jax.models.transformer import build_lm, model_config
  c = _tiny(vocab__old_row_lr_scale=0.1, vocab__new_row_lr_scale=3.0)
  model, params = build_lm(model_config("tiny", vocab_size=259, d_model=32, num_heads=2, num_layers=1, max_len=32))
  model, params = V.extend_vocab(model, params, N_NEW)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
  schedule = optax.constant_schedule(1e-2)
  plain = runner._optimizer(c, c.optim, schedule)
  scaled = runner._optimizer(c, c.optim, schedule, wrap=V.row_scaling(c, params))
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_scaled, _ = scaled.update(grads, scaled.init(params), params)
  e_plain, e_scaled = np.asarray(u_plain["embed"]["embedding"]), np.asarray(u_scaled["embed"]["embedding"])
  np.testing.assert_allclose(e_scaled[:259], 0.1 * e_plain[:259], rtol=1e-6)
  np.testing.assert_allclose(e_scaled[259:], 3.0 * e_plain[259:], rtol=1e-6)
  assert np.abs(e_plain).min() > 0
  assert V.row_scaling(_tiny(vocab__extend=0), params) is None


def test_resume_reads_the_saved_tokenizer_and_ends_the_same(extended_run, tmp_path, monkeypatch):
  workdir, results = extended_run
  c = _tiny(pretrain__base_dir=workdir)
  monkeypatch.setenv(faults.CRASH_ENV, "5")
  with pytest.raises(faults.SimulatedCrash):
    cl_jax.run(c, str(tmp_path), progress=False)
  monkeypatch.delenv(faults.CRASH_ENV)

  def no_relearning(*a, **k):
    raise AssertionError("the resumed run learned its tokens again instead of reading <workdir>/vocab")

  monkeypatch.setattr(V.ByteBPETokenizer, "learn", no_relearning)
  resumed = cl_jax.run(c, str(tmp_path), progress=False).as_dict()
  want = results.as_dict()["test"]["final"]
  for k in ("domain/perplexity", "general/perplexity"):
    assert resumed["test"]["final"][k] == pytest.approx(want[k], rel=1e-4)


def test_imported_checkpoint_extension_and_export(tmp_path):
  c = _tiny(vocab__extend=8, pretrain__steps=0, adapt__steps=4)
  c.lm.init_from = "tests/fixtures/hf/llama"
  cl_jax.run(c, str(tmp_path), progress=False)
  exported = json.load(open(tmp_path / "hf" / "config.json"))
  assert exported["vocab_size"] == 128 + 8
  tok = json.load(open(tmp_path / "hf" / "tokenizer.json"))
  assert max(tok["model"]["vocab"].values()) == 128 + 7 and len(tok["model"]["merges"]) == 65 + 8


def test_config_errors_name_the_key():
  from cl_jax.kinds import validate
  for changes, key in ((dict(vocab__extend=-1), r"vocab\.extend"),
                       (dict(vocab__old_row_lr_scale=2.0), r"vocab\.old_row_lr_scale"),
                       (dict(vocab__new_row_lr_scale=0.0), r"vocab\.new_row_lr_scale")):
    with pytest.raises(ConfigError, match=key):
      validate(_tiny(**changes))
  c = _tiny()
  c.strategy = "lora"
  with pytest.raises(ConfigError, match=r"vocab\.extend"):
    validate(c)


def test_workdirs_written_before_the_stage_sections_still_resume(tmp_path):
  """A config.json without `vocab` / `long_context` (an older run) is the same run as one with them off."""
  from cl_jax.errors import WorkdirError
  from cl_jax.workdir import decide
  c = lm.default_config()
  old = json.loads(c.to_json_best_effort())
  del old["vocab"], old["long_context"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert decide(c, str(tmp_path), overwrite=False, reference=lm.default_config())  # resumes
  c.vocab.extend = 8
  with pytest.raises(WorkdirError, match="vocab"):
    decide(c, str(tmp_path), overwrite=False, reference=lm.default_config())
