"""Text generation (cl_jax.lm.generation): greedy ids identical to transformers' on the HF fixtures with stop strings
and a repetition penalty, prompts batched into length buckets (one compilation per bucket), top-k / top-p /
repetition penalty on hand-computed logits, the stop-string automaton against a brute-force search, the commands.

The reference ids come from transformers (scripts/make_generate_fixtures.py -> tests/fixtures/generate_reference.json);
this file imports neither torch nor transformers."""
from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax.lm import generation
from cl_jax.models import sampling

HERE = os.path.dirname(os.path.abspath(__file__))
REF = json.load(open(os.path.join(HERE, "fixtures", "generate_reference.json")))
HF = os.path.join(HERE, "fixtures", "hf")


@pytest.fixture(scope="module")
def llama():
  return generation.load(os.path.join(HF, "llama"))


# ----------------------------------------------------------------------------- logits processors, by hand

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
  logits = jnp.array([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
  seen = jnp.array([[True, True, False, False], [False, False, True, True]])
  out = np.asarray(sampling.repetition_penalty(logits, seen, 2.0))
  np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.25, -6.0]])


_FILTER = jax.jit(sampling.top_k_top_p_filter)  # top_k / top_p are traced: one compilation per logits shape


def _kept(logits, top_k, top_p):
  out = _FILTER(jnp.asarray(logits, jnp.float32)[None], jnp.int32(top_k), jnp.float32(top_p))
  return set(np.flatnonzero(np.isfinite(np.asarray(out)[0])).tolist())


def test_top_k_and_top_p_keep_the_hand_computed_sets():
  # probabilities 0.15, 0.5, 0.05, 0.2, 0.1 at ids 0..4 (sorted: ids 1, 3, 0, 4, 2)
  logits = np.log(np.array([0.15, 0.5, 0.05, 0.2, 0.1], np.float32))
  assert _kept(logits, 0, 1.0) == {0, 1, 2, 3, 4}
  assert _kept(logits, 0, 0.4) == {1}                    # the most likely token is always kept
  assert _kept(logits, 0, 0.65) == {1, 3}                # 0.5 < 0.65 <= 0.5 + 0.2
  assert _kept(logits, 0, 0.75) == {1, 3, 0}             # 0.7 < 0.75
  assert _kept(logits, 2, 1.0) == {1, 3}
  # top-p after top-k on the renormalised survivors: 0.5/0.85, 0.2/0.85, 0.15/0.85 -> cumulative 0.588, 0.824
  assert _kept(logits, 3, 0.8) == {1, 3}
  assert _kept(logits, 3, 0.85) == {1, 3, 0}
  # ties at the k-th value stay (transformers' TopKLogitsWarper keeps logits >= the k-th largest)
  assert _kept(np.array([1.0, 3.0, 1.0, 0.0]), 2, 1.0) == {0, 1, 2}


def test_top_p_equals_transformers_rule_on_random_logits():
  """TopPLogitsWarper's own formulation: sort ascending, drop tokens whose cumulative probability (themselves and
  everything less likely) is <= 1 - p, never the most likely one."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    logits = rng.normal(size=50).astype(np.float32) * 2
    p = float(rng.uniform(0.05, 0.99))
    order = np.argsort(logits)
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    drop = np.cumsum(probs) <= 1 - p
    drop[-1] = False
    assert _kept(logits, 0, p) == set(order[~drop].tolist())


# ----------------------------------------------------------------------------- stop strings, by brute force

class _Pieces:
  """A tokenizer whose ids decode to fixed strings (no tokenizer file): token_bytes falls back to decode([i])."""

  def __init__(self, pieces):
    self.pieces, self.vocab_size = pieces, len(pieces)

  def decode(self, ids):
    return "".join(self.pieces[int(i)] for i in ids)


def test_stop_automaton_fires_exactly_when_the_last_token_completes_a_stop_string():
  tok = _Pieces(["a", "b", "ab", "ba", "aba", "c", "", "bab"])
  stops = generation.StopStrings(["abab", "cb"], tok, tok.vocab_size)
  rng = np.random.default_rng(1)
  fired = 0
  for _ in range(300):
    prompt = rng.integers(0, 8, size=int(rng.integers(1, 4)))
    stream = rng.integers(0, 8, size=8)
    state = stops.initial([prompt])[0]
    text = tok.decode(prompt)
    for t in stream:
      before = text
      text += tok.pieces[t]
      # brute force: a stop string ends inside the last token's text (transformers' rule)
      expected = any(text.find(s, i) >= 0 and text.find(s, i) + len(s) > len(before)
                     for s in ("abab", "cb") for i in range(len(text)))
      which = np.arange(2)
      got = bool(stops.hit[which, t, state].any())
      state = stops.next[which, t, state]
      assert got == expected, (prompt, stream, text)
      fired += got
      if got:
        break
  assert fired > 50  # the random streams really do hit the stop strings
  assert stops.cut("xxabababyy") == "xxabab" and stops.cut("zcbq") == "zcb" and stops.cut("none") == "none"


# ----------------------------------------------------------------------------- against transformers

def _rows(family):
  data = REF["families"][family]
  return data["rows"], data["stop_strings"]


def test_greedy_with_stop_strings_equals_transformers_one_compilation_per_bucket(llama):
  rows, stops = _rows("llama")
  prompts = [np.asarray(r["ids"]) for r in rows]
  for r, p in zip(rows, prompts):  # the same prompt ids as transformers' tokenizer
    np.testing.assert_array_equal(llama.tokenizer.encode(r["text"]), p)
  assert sorted(generation.bucket_of(len(p), (16, 64)) for p in prompts) == [16, 16, 64, 64]
  before = sampling.compilations()
  out = generation.generate_ids(llama, prompts, max_new_tokens=REF["new"], stop=stops, buckets=(16, 64),
                                batch_size=1)
  assert sampling.compilations() - before == 2  # two buckets, two programs
  for r, o in zip(rows, out):
    assert o.ids.tolist() == r["stop"], r["text"]
    assert o.ids.tolist() == r["free"][:len(r["stop"])]
  assert [o.stopped for o in out] == ["stop", "stop", "stop", "stop"]
  for o in out[:3]:  # the text is cut right after its first stop string (the last token may run past it)
    full = llama.tokenizer.decode(o.ids)
    ends = [full.find(s) + len(s) for s in stops if s in full]
    assert o.text == full[:min(ends)] and len(o.text) <= len(full)
  assert len(out[3].ids) == 1  # its first new token already holds a stop string
  # new prompt lengths inside the same buckets compile nothing
  other = [p[:-2] for p in prompts[:2]] + [np.concatenate([p, p[:3]]) for p in prompts[2:]]
  assert [generation.bucket_of(len(p), (16, 64)) for p in other] == [16, 16, 64, 64]
  again = generation.generate_ids(llama, other, max_new_tokens=REF["new"], stop=stops, buckets=(16, 64),
                                  batch_size=1)
  assert sampling.compilations() - before == 2
  assert len(again) == 4


def test_greedy_with_repetition_penalty_equals_transformers_under_learned_positions():
  """GPT-2 has learned positions: left padding must not shift them (each row keeps positions 0..n-1)."""
  gpt2 = generation.load(os.path.join(HF, "gpt2"))
  rows, stops = _rows("gpt2")
  out = generation.generate_ids(gpt2, [r["ids"] for r in rows], max_new_tokens=REF["new"], stop=stops,
                                repetition_penalty=REF["penalty"], buckets=(64,))
  assert [o.ids.tolist() for o in out] == [r["penalty"] for r in rows]
  # the penalty really changed something: without it one prompt continues differently
  assert any(r["penalty"] != r["stop"] for r in rows)


def test_sampling_is_seeded_per_row_and_independent_of_batch_mates(llama):
  rows, _ = _rows("llama")
  p0, p1 = np.asarray(rows[0]["ids"]), np.asarray(rows[1]["ids"])
  kw = dict(max_new_tokens=12, temperature=1.5, top_k=40, top_p=0.95, buckets=(16,), batch_size=2)

  def ids(prompts, seed=0):
    return [o.ids.tolist() for o in generation.generate_ids(llama, prompts, seed=seed, **kw)]

  before = sampling.compilations()
  a = ids([p0, p1])
  assert ids([p0, p1]) == a                         # same seed, same draws
  assert ids([p0, p1], seed=1) != a                 # the seed is used
  both = ids([p0, p0])
  assert both[0] == a[0] and both[1] != both[0]     # row 0 ignores its batch mate; row 1 has its own key
  assert a[0] != rows[0]["free"][:len(a[0])]        # really sampled, not greedy
  assert sampling.compilations() - before == 1      # seed, temperature, top-k / top-p are traced values


# ----------------------------------------------------------------------------- the commands

def _same_model(llama, monkeypatch):
  """`load` returns the already loaded llama (a fresh load is a new static argument: a new compilation)."""
  path = os.path.join(HF, "llama")

  def load(p):
    assert p == path
    return llama

  monkeypatch.setattr(generation, "load", load)
  return path


def test_cli_generate_prints_the_cut_completion(llama, capsys, monkeypatch):
  from cl_jax import cli
  rows, stops = _rows("llama")
  argv = ["generate", "--model", _same_model(llama, monkeypatch), "--max_new_tokens", str(REF["new"]),
          "--prompt", rows[1]["text"]]
  for s in stops:
    argv += ["--stop", s]
  expected = generation.StopStrings(stops, llama.tokenizer, 128).cut(llama.tokenizer.decode(rows[1]["stop"]))
  assert generation.generate_ids(llama, [rows[1]["ids"]], max_new_tokens=REF["new"], stop=stops)[0].text == expected
  before = sampling.compilations()
  assert cli.main(argv, prog="cl-jax") == 0
  assert capsys.readouterr().out == expected + "\n" and expected
  assert sampling.compilations() == before  # bucket 16, one row, the same settings: the same program


@pytest.mark.parametrize("flag,value,message", [
    ("--top_p", "0", "top_p=0.0: must be in (0, 1]"),
    ("--temperature", "-1", "temperature=-1.0: must be >= 0"),
    ("--model", "/no/such/dir", "--model='/no/such/dir': expected a Hugging Face checkpoint directory"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(flag, value, message, capsys):
  from cl_jax import cli
  argv = ["generate", "--model", os.path.join(HF, "llama"), "--prompt", "x", flag, value]
  assert cli.main(argv, prog="cl-jax") == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_chat_renders_the_template_and_answers_each_line(llama, monkeypatch):
  from cl_jax.lm.templates import encode_prompt
  rows, stops = _rows("llama")
  line = "Once upon a time"
  argv = ["chat", "--model", _same_model(llama, monkeypatch), "--max_new_tokens", str(REF["new"])]
  for s in stops:  # the settings of the programs compiled above (a prompt of the 64 bucket, one row)
    argv += ["--stop", s]
  out = io.StringIO()
  assert generation.main(argv, stdin=io.StringIO(f"{line}\n/reset\n{line}\n"), stdout=out) == 0
  # each reply is the continuation of the rendered conversation (plain template: the fixture has no chat_template)
  prompt = encode_prompt([("user", line)], llama.tokenizer, llama.template)
  assert prompt[0] == llama.tokenizer.bos_id and generation.bucket_of(len(prompt)) == 64
  expected = generation.generate_ids(llama, [prompt], max_new_tokens=REF["new"], stop=stops)[0].text
  assert out.getvalue() == f"{expected}\n{expected}\n"  # '/reset' started the second conversation afresh


def test_load_reads_a_cl_jax_lm_workdir(tmp_path, monkeypatch):
  """A finished LM run's workdir: its config.json's model, its last task-boundary params (`boundary_params`, which
  the merge tests cover, is stubbed here: orbax would cost seconds), its tokenizer."""
  from cl_jax import checkpoint, lm
  from cl_jax.data.tokenizer import ByteTokenizer
  from cl_jax.lm.runner import model_config
  from cl_jax.models.transformer import abstract_lm
  from cl_jax.workdir import config_dict

  def random_params(config, seed):  # host arrays of the model's shapes (an eager init would cost seconds)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype),
                        abstract_lm(model_config(config, ByteTokenizer.vocab_size))[1])

  c = lm.default_config()
  c.lm.d_model, c.lm.num_layers, c.lm.num_heads, c.lm.seq_len = 16, 1, 2, 16
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config_dict(c), f)
  final = random_params(c, 3)
  monkeypatch.setattr(checkpoint, "boundary_params", lambda path, task=None: final if path == str(tmp_path) else None)
  m = generation.load(str(tmp_path))
  assert isinstance(m.tokenizer, ByteTokenizer) and m.eos_ids == (258,) and m.pad_id == 256 and m.max_len == 16
  assert m.vocab_size == 259
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # a checkpoint of another model (d_model 32) is refused, not loaded into the wrong shapes
  c32 = c.copy_and_resolve_references()
  c32.lm.d_model = 32
  other = random_params(c32, 4)
  monkeypatch.setattr(checkpoint, "boundary_params", lambda path, task=None: other)
  with pytest.raises(generation.ConfigError, match="param shapes differ"):
    generation.load(str(tmp_path))
  c.vocab.extend = 8
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config_dict(c), f)
  with pytest.raises(generation.ConfigError, match="vocab.extend"):
    generation.load(str(tmp_path))
