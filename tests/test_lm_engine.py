"""The LM evaluation engine (cl_jax/eval/lm_engine.py) and `cl-jax lm-eval` against lm-eval's own `hf` model.

The reference, tests/fixtures/lm_eval_reference.json, is written by scripts/make_lm_eval_reference.py with torch,
transformers and lm-eval's `hf` model on the tiny HF fixtures; these tests need none of torch / transformers.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from cl_jax.errors import ConfigError
from cl_jax.eval.lm_engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "fixtures", "lm_eval_reference.json")) as f:
  REF = json.load(f)
TOL = 1e-4
# Long continuations (the completion set's endings run to 82 tokens) sum float32 log-probabilities from forward passes
# whose batches differ from the reference's (torch and XLA block their matmuls differently): the sums then agree to
# about 1e-6 relative (1.8e-4 on a -180); every conventions error moves them by far more than that.
RTOL = 1e-6


def _digest(arguments) -> str:
  """scripts/make_lm_eval_reference.py's digest of a sample's request arguments."""
  return hashlib.sha1(json.dumps(arguments, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def engines():
  from cl_jax import sharding
  from cl_jax.lm import generation
  from cl_jax.lm.lm_eval_model import load_engine
  llama = generation.load(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"))
  # llama on a (one-device) mesh: rows padded to the mesh and placed with put_global_batch, as in a run; one length
  # bucket (fewer programs to compile). gpt2 is the engine `cl-jax lm-eval --batch_size 8` builds (and reuses).
  return {"llama": Engine.from_model(llama, batch_size=8, mesh=sharding.make_mesh(), buckets=(llama.max_len,)),
          "gpt2": load_engine(os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2"), batch_size=8)}


def _check_sets(engine, sets: dict) -> None:
  """Per-item log-likelihoods within TOL, greedy flags, generations and every per-item metric identical."""
  from cl_jax.eval import benchmark_sets
  for name, ref in sets.items():
    bench = benchmark_sets.load(name, limit=ref["limit"])
    samples = ref["samples"]
    reqs = [tuple(r) for r in benchmark_sets.requests(bench)]
    if "gen_kwargs" in samples[0]:  # generate_until, one sample per (item, filter): the contexts are the set's own
      first = {s["doc_id"]: s for s in reversed(samples)}
      rows = [first[i] for i in sorted(first)]
      assert [_digest([[c, r["gen_kwargs"]]]) for (c, _), r in zip(reqs, rows)] == [r["arguments_sha1"] for r in rows]
      texts = engine.generate_until([(c, r["gen_kwargs"]) for (c, _), r in zip(reqs, rows)])
      assert texts == [r["resps"][0][0] for r in rows], name
      continue
    per = len(reqs) // len(samples)  # choices per item, adjacent
    args = [reqs[i * per:(i + 1) * per] for i in range(len(samples))]
    assert [_digest([list(a) for a in item]) for item in args] == [s["arguments_sha1"] for s in samples], name
    args = [a for item in args for a in item]
    got = engine.loglikelihood(args)
    want = [r for s in samples for r in s["resps"]]
    np.testing.assert_allclose([g[0] for g in got], [w[0][0] for w in want], rtol=RTOL, atol=TOL, err_msg=name)
    assert [g[1] for g in got] == [bool(w[0][1]) for w in want], name
    # the native scorer (benchmark_sets.score) through the engine gives lm-eval's per-item metrics
    _, per_item = benchmark_sets.score(bench, engine)
    for metric in samples[0]["metrics"]:
      assert list(per_item[metric]) == [s["metrics"][metric] for s in samples], (name, metric)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_equals_lm_evals_hf_model_and_transformers_generate(engines, family):
  ref, engine = REF["families"][family], engines[family]
  assert (engine.max_len, engine.prefix_id) == (ref["max_length"], ref["prefix_token_id"])
  ll = engine.loglikelihood([(r["context"], r["continuation"]) for r in ref["loglikelihood"]])
  assert np.max(np.abs([g[0] - r["logprob"] for g, r in zip(ll, ref["loglikelihood"])])) < TOL
  assert [g[1] for g in ll] == [r["greedy"] for r in ref["loglikelihood"]]
  # a document's log-likelihood sums hundreds of float32 terms over windows: equal to float32 precision
  rolling = engine.loglikelihood_rolling([r["text"] for r in ref["loglikelihood_rolling"]])
  np.testing.assert_allclose(rolling, [r["logprob"] for r in ref["loglikelihood_rolling"]], rtol=RTOL, atol=TOL)
  texts = engine.generate_until([(r["context"], r["gen_kwargs"]) for r in ref["generate_until"]])
  assert texts == [r["text"] for r in ref["generate_until"]]
  # four stop strings no token spells: the very program generate_until compiled above (fewer compilations)
  out = engine.generate_ids([r["ids"] for r in ref["generate_ids"]], max_new_tokens=REF["new"], ignore_eos=True,
                            stop=["\x00"] * 4)
  assert [o.ids.tolist() for o in out] == [r["new"] for r in ref["generate_ids"]]
  assert all(len(o.ids) == REF["new"] for o in out)
  if family == "llama":  # gpt2's sets: through `cl-jax lm-eval` below, with the same engine
    _check_sets(engine, ref["sets"])
  s = engine.stats
  assert s["loglikelihood_rolling"]["items"] == len(ref["loglikelihood_rolling"])
  assert s["generate_until"]["items"] >= len(ref["generate_until"]) and s["loglikelihood"]["tokens"] > 0
  speed = engine.speed()
  assert speed["loglikelihood"]["items_per_s"] > 0 and speed["generate_until"]["tokens_per_s"] > 0


def test_cl_jax_lm_eval_command_runs_the_offline_sets_with_hf_models_numbers(engines, tmp_path, monkeypatch):
  """`cl-jax lm-eval --model cl_jax ...` (lm-eval's own CLI, in-process) gives lm-eval's `hf` model's per-sample
  responses, filtered responses and metrics, and its aggregate metrics, on the offline sets."""
  from lm_eval.tasks import TaskManager
  from cl_jax import cli
  from cl_jax.eval import benchmark_sets
  # lm-eval's CLI indexes its ~10,000 built-in task files before anything else (most of this test's time otherwise);
  # the offline sets need only --include_path, so the index is restricted to it here. The command is unchanged.
  init = TaskManager.__init__
  monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "include_defaults": False}))
  ref = REF["families"]["gpt2"]["sets"]
  tasks = [ref[name]["task"] for name in ref]
  limit = min(r["limit"] for r in ref.values())
  rc = cli.main(["lm-eval", "--model", "cl_jax", "--model_args", f"pretrained={ROOT}/tests/fixtures/hf/gpt2",
                 "--batch_size", "8", "--tasks", ",".join(tasks), "--include_path", benchmark_sets.task_dir(),
                 "--limit", str(limit), "--gen_kwargs", "max_gen_toks=32", "--output_path", str(tmp_path),
                 "--log_samples"])
  assert rc == 0
  for name, r in ref.items():
    files = glob.glob(os.path.join(str(tmp_path), "**", f"samples_{r['task']}_*.jsonl"), recursive=True)
    assert len(files) == 1, files
    with open(files[0]) as f:
      got = {(s["doc_id"], s["filter"]): s for s in map(json.loads, f)}
    assert sorted(got) == sorted((s["doc_id"], s["filter"]) for s in r["samples"])
    for w in r["samples"]:
      g = got[(w["doc_id"], w["filter"])]
      for metric, value in w["metrics"].items():
        assert g[metric] == value, (name, w["doc_id"], metric)
      assert g["filtered_resps"] == w["filtered_resps"] or not isinstance(w["resps"][0][0], str)
      if isinstance(w["resps"][0][0], str):
        assert g["resps"] == w["resps"]
      else:
        np.testing.assert_allclose([float(a[0][0]) for a in g["resps"]], [b[0][0] for b in w["resps"]], rtol=RTOL,
                                   atol=TOL)  # the log writes numbers as strings
    results = glob.glob(os.path.join(str(tmp_path), "**", "results_*.json"), recursive=True)
    with open(results[0]) as f:
      agg = json.load(f)["results"][r["task"]]
    for key, value in r["results"].items():
      assert agg[key] == pytest.approx(value), key


def test_rolling_windows_and_pairs_are_lm_evals(engines):
  from lm_eval import utils
  engine = engines["gpt2"]
  for n in (1, 5, 64, 65, 130, 200):
    text = " ".join(["the"] * n)
    tokens = engine.tok_encode(text)
    want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=engine.prefix_id, max_seq_len=engine.max_len, context_len=1)]
    assert engine.rolling_windows(text) == [(list(a), list(b)) for a, b in want]
  # trailing spaces move to the continuation; an empty context is the prefix token
  ctx, cont = engine.encode_pair("a b ", "c")
  assert ctx == engine.tok_encode("a b") and ctx + cont == engine.tok_encode("a b c")
  assert engine.encode_pair("", "hello")[0] == [engine.prefix_id]


def test_bad_requests_are_refused_before_any_work(engines):
  engine = engines["gpt2"]
  with pytest.raises(ConfigError, match="num_beams"):
    engine.generate_until([("x", {"until": ["\n"], "num_beams": 4})])
  with pytest.raises(ConfigError, match="max_gen_toks=64"):
    engine.generate_until([("x", {"max_gen_toks": 64})])
  with pytest.raises(ConfigError, match="exceeds max_len=64"):  # lm-eval's hf model asserts the same
    engine.loglikelihood([("a", " the" * 70)])
  with pytest.raises(ConfigError, match="no model with a KV cache"):
    Engine(engine.apply, engine.params, engine.tokenizer, max_len=64).generate_until([("x", {})])
  with pytest.raises(ConfigError, match="batch_size=0"):
    Engine(engine.apply, engine.params, engine.tokenizer, max_len=64, batch_size=0)
  other = engine.with_params(engine.params)
  assert other._score is engine._score and other.stats["loglikelihood"]["items"] == 0


def test_chat_template_renders_as_lm_eval_asks(engines):
  import copy
  from cl_jax.lm.templates import HFChatTemplate
  source = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  engine = copy.copy(engines["gpt2"])
  engine.template = HFChatTemplate(source)
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
  assert engine.apply_chat_template(chat) == "<|system|>Be brief.<|end|>\n<|user|>2+2?<|end|>\n<|assistant|>"
  # without the generation prompt the text ends right after the final message (transformers' continue_final_message)
  chat.append({"role": "assistant", "content": "The answer is"})
  assert engine.apply_chat_template(chat, add_generation_prompt=False).endswith("<|assistant|>The answer is")
  assert engine.chat_template == source and engines["gpt2"].chat_template == ""
