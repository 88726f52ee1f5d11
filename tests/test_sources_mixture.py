"""An LM run over any number of sources (`data.sources`) with stages over them (`data.stages`): the checks before
any work, the shorthand's equivalence, per-source draws and evaluation metrics, capped evaluation sets."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from cl_jax.data import mixture as mx
from cl_jax.errors import ConfigError

WORDS = ("river stone garden window morning letter travel silver market harbor winter candle forest meadow "
         "lantern quiet golden narrow distant gentle").split()


def _write(path, docs):
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  return f"files:{path}"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """Four small corpora as .jsonl (each line a document, its own split unit): prose twice, code, csv rows."""
  root = tmp_path_factory.mktemp("sources")
  rng = np.random.default_rng(0)
  prose = lambda n: [" ".join(rng.choice(WORDS, 40)).capitalize() + "." for _ in range(n)]
  code = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nprint(f{i}({i}))\n" * 2 for i in range(80)]
  csv = ["\n".join(f"{i},{j},{(i * j) % 97}" for j in range(12)) for i in range(80)]
  return {"general": _write(root / "general.jsonl", prose(80)), "notes": _write(root / "notes.jsonl", prose(60)),
          "code": _write(root / "code.jsonl", code), "csv": _write(root / "csv.jsonl", csv)}


def _config(**sources):
  from cl_jax import lm
  c = lm.default_config()
  c.lm.d_model, c.lm.num_layers, c.lm.num_heads, c.lm.seq_len = 16, 1, 2, 32
  c.text.update(eval_sequences=12, general_eval_sequences=16, cloze_items=8, cloze_context=16, validation=0.15,
                test=0.15)
  c.pretrain.update(steps=4, batch_size=8)
  c.adapt.update(steps=8, batch_size=8)
  c.regression.update(eval_every=4, eval_batch_size=16, threshold=0.5)
  c.train.log_every_steps = 4
  c.lm.export_hf = False
  for name, entry in sources.items():
    c.data.sources[name] = entry
  return c


def test_bad_sources_and_stages_are_one_config_error_line(corpora):
  from cl_jax.config import set_overrides
  from cl_jax.kinds import validate
  good = dict(general=corpora["general"], code=corpora["code"])
  c = _config(**good)
  set_overrides(c, {"data.sources.csv": corpora["csv"]})  # the command line adds a source by name
  c.data.stages = [[0, {"general": 1, "code": 3}], [4, {"csv": 1}]]
  validate(c)
  with pytest.raises(ConfigError, match="unknown config key .data.nope."):
    set_overrides(c, {"data.nope": 1})  # other sections stay locked
  stages = {"unknown": ([[0, {"code": 1, "web": 1}]], r"^data.stages\[0\]: unknown source\(s\) \['web'\]"),
            "negative": ([[0, {"code": 1}], [4, {"csv": -0.5}]], r"^data.stages\[1\]: weight\(s\) \{'csv': -0.5\}"),
            "empty": ([[0, {"code": 1}], [4, {}]], r"^data.stages\[1\]: an empty stage"),
            "all zero": ([[0, {"code": 0.0}]], r"^data.stages\[0\]: weights .* are all zero"),
            "until steps": ([[4, {"code": 1}], [8, {"csv": 1}]], r"^data.stages\[0\]: starts at step 4; .*start_step"),
            "not increasing": ([[0, {"code": 1}], [0, {"csv": 1}]], r"^data.stages\[1\]: starts at step 0, not after"),
            "never runs": ([[0, {"code": 1}], [8, {"csv": 1}]], r"^data.stages\[1\]: starts at step 8, at or past"),
            "not a pair": ([[0, {"code": 1}, 3]], r"^data.stages\[0\]=.*pair")}
  for what, (value, match) in stages.items():
    c = _config(**good, csv=corpora["csv"])
    c.data.stages = value
    with pytest.raises(ConfigError, match=match) as e:
      validate(c)
    assert "\n" not in str(e.value), what
  sources = {"role": (dict(code={"spec": corpora["code"], "role": "target"}), r"^data.sources.code.role='target'"),
             "key": (dict(code={"spec": corpora["code"], "weight": 1}), r"^data.sources.code: unknown key\(s\) \['weight'\]"),
             "cap": (dict(code={"spec": corpora["code"], "eval_sequences": -1}), r"^data.sources.code.eval_sequences=-1"),
             "no general": (dict(code=corpora["code"], csv=corpora["csv"]), r"^data.sources: no 'general' source"),
             "missing file": (dict(code="files:/nonexistent/*.jsonl"), r"^data.sources.code='files:/nonexistent")}
  for what, (entries, match) in sources.items():
    c = _config(**{**({} if what == "no general" else {"general": corpora["general"]}), **entries})
    with pytest.raises(ConfigError, match=match) as e:
      validate(c)
    assert "\n" not in str(e.value), what
  c = _config(**good)
  c.text.domain = corpora["csv"]
  with pytest.raises(ConfigError, match="^text.domain=.* and data.sources both name corpora"):
    validate(c)


def test_the_shorthand_is_two_sources_and_presets_spread_over_a_role(corpora):
  from cl_jax.lm import runner
  from cl_jax.lm.data import load_data, run_sources
  short = _config()
  short.text.general, short.text.domain = corpora["general"], corpora["code"]
  named = _config(general={"spec": corpora["general"], "eval_sequences": 16},
                  domain={"spec": corpora["code"], "eval_sequences": 12})
  assert [s.name for s in run_sources(short)] == [s.name for s in run_sources(named)] == ["general", "domain"]
  a, b = load_data(short), load_data(named)
  for role in ("general", "domain"):
    np.testing.assert_array_equal(a.train[role], b.train[role])
    for split in ("validation", "test"):
      np.testing.assert_array_equal(a.eval[split][role], b.eval[split][role])
  np.testing.assert_array_equal(a.cloze["test"].context, b.cloze["test"].context)
  sizes = {n: len(a.train[n]) for n in ("general", "domain")}
  for preset in ("70_30", "three_phase", "two_phase", "cyclical", "difficulty"):
    short.adapt.mixture = named.adapt.mixture = preset
    want = mx.from_spec(preset, 8, domain="domain", general="general",
                        stable_fraction=(8 - round(short.optim.decay_fraction * 8)) / 8)
    assert runner.adaptation_stages(short) == runner.adaptation_stages(named, sizes) == want, preset
  # Three sources: the preset's domain weight is shared by code and csv in proportion to their sizes.
  three = _config(general=corpora["general"], code=corpora["code"], csv=corpora["csv"])
  three.adapt.mixture = "70_30"
  sizes = {"general": 50, "code": 30, "csv": 10}
  (start, weights), = runner.adaptation_stages(three, sizes)
  assert start == 0 and weights["code"] == pytest.approx(0.7 * 30 / 40) and weights["csv"] == pytest.approx(0.7 / 4)
  assert weights["general"] == pytest.approx(0.3)


def test_pretraining_draws_from_every_general_source_by_size(corpora):
  from cl_jax.lm import runner
  from cl_jax.lm.data import load_data
  c = _config(general=corpora["general"], notes={"spec": corpora["notes"], "role": "general"}, code=corpora["code"])
  data = load_data(c)
  assert data.roles == {"general": ("general", "notes"), "domain": ("code",)}
  sampler, rows = runner.pretrain_mixture(c, data)
  source = runner.MixtureSource(sampler, rows, 0)
  batches = [next(source) for _ in range(100)]
  ids = np.concatenate([b["domain"] for b in batches])
  sizes = np.array([len(data.train["general"]), len(data.train["notes"])])
  share = sizes[1] / sizes.sum()  # notes has 60 documents to general's 80
  assert set(np.unique(ids)) == {0, 1} and abs(np.mean(ids == 1) - share) < 4 * np.sqrt(share * (1 - share) / 800)
  # Each row is one of the train sequences of the source its draw names.
  seqs = {n: {tuple(r) for r in data.train[n]} for n in ("general", "notes")}
  for b in batches[:5]:
    tokens = np.concatenate([b["x"], b["y"][:, -1:]], 1)
    assert all(tuple(t) in seqs[("general", "notes")[d]] for t, d in zip(tokens, b["domain"]))


def test_source_metrics_are_each_source_scored_alone():
  """The per-source numbers come from the role's per-sequence scores: equal to scoring the source by itself."""
  from cl_jax.lm.data import CPTData, with_source_metrics

  def evaluate(params, sequences, cloze=None, per_item=None):  # a stand-in model: NLL and accuracy from the tokens
    out = {}
    for name, t in sequences.items():
      nll, hit = t.mean(1) / 10.0 + params, (t[:, 0] % 2).astype(float)
      out[f"{name}/perplexity"], out[f"{name}/accuracy"] = math.exp(nll.mean()), hit.mean()
      per_item.update({f"{name}/perplexity": nll, f"{name}/accuracy": hit})
    return out

  rng = np.random.default_rng(1)
  parts = {"a": rng.integers(0, 50, (5, 8)), "b": rng.integers(20, 90, (3, 8)), "c": rng.integers(0, 9, (4, 8))}
  ev = {"general": parts["c"], "domain": np.concatenate([parts["a"], parts["b"]])}
  data = CPTData(None, {}, {}, {"validation": ev}, {}, {}, {"general": ("c",), "domain": ("a", "b")},
                 {"validation": {"general": (("c", 4),), "domain": (("a", 5), ("b", 3))}})
  got = with_source_metrics(evaluate, data)(0.5, data.eval["validation"])
  for name in ("a", "b"):
    alone = evaluate(0.5, {"x": parts[name]}, per_item={})
    assert got[f"source/{name}/perplexity"] == pytest.approx(alone["x/perplexity"], rel=1e-12)
    assert got[f"source/{name}/accuracy"] == pytest.approx(alone["x/accuracy"], rel=1e-12)
  assert "source/c/perplexity" not in got  # a role with one source: its role metric says it all
  assert got["source/a/perplexity"] != got["source/b/perplexity"]


def test_four_sources_two_stages_run(corpora, tmp_path):
  """Two general and two domain sources, two stages: draws per source, role metrics guarded, per-source recorded."""
  import cl_jax
  c = _config(general=corpora["general"], notes={"spec": corpora["notes"], "role": "general"},
              code=corpora["code"], csv={"spec": corpora["csv"], "eval_sequences": 5})
  c.data.eval_tokens = 12 * 32  # the default cap: 12 sequences of 32 tokens per split
  c.data.stages = [[0, {"general": 1, "code": 1}], [4, {"csv": 3, "code": 1, "notes": 1}]]
  c.adapt.difficulty = True  # each domain source in its own difficulty order
  c.pretrain.steps = 0  # the base is the initialisation (pre-training's draws: the test above)
  workdir = str(tmp_path / "run")
  r = cl_jax.run(c, workdir, progress=False).extra
  assert r["mixture"] == "stages+difficulty"
  assert r["stages"] == [[0, {"general": 0.5, "notes": 0.0, "code": 0.5, "csv": 0.0}],
                         [4, {"general": 0.0, "notes": 0.2, "code": 0.2, "csv": 0.6}]]
  first, second = r["realised_mixture"]
  assert (first["start"], first["end"], second["end"]) == (0, 4, 8)
  assert first["realised"]["csv"] == first["realised"]["notes"] == 0 < first["realised"]["code"]
  assert second["realised"]["general"] == 0 < second["realised"]["csv"]
  assert sum(second["realised"].values()) == pytest.approx(1.0)
  # Evaluation sets: csv capped at its 5, the others at the budget's 12 (or their whole split when smaller).
  sizes = r["eval_sets"]["validation"]
  assert sizes["sources"]["csv"]["sequences"] == 5 and sizes["sources"]["code"]["sequences"] == 12
  assert sizes["domain"]["sequences"] == 17
  assert sizes["general"]["sequences"] == sizes["sources"]["general"]["sequences"] + \
      sizes["sources"]["notes"]["sequences"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [e for e in records if e["type"] == "eval" and e["phase"] == "adapt"]
  assert [e["step"] for e in evals] == [0, 4, 8]
  for e in evals:  # the role's perplexity is its sources' row-weighted geometric mean
    for role, names in (("general", ("general", "notes")), ("domain", ("code", "csv"))):
      n = [sizes["sources"][s]["sequences"] for s in names]
      mixed = sum(k * math.log(e[f"source/{s}/perplexity"]) for k, s in zip(n, names)) / sum(n)
      assert math.log(e[f"{role}/perplexity"]) == pytest.approx(mixed, rel=1e-9)
  # Guarded: the general role's metrics only; the per-source ones are recorded with intervals on the test split.
  assert all(not m.startswith("source/") for h in r["history"] for m in h["intervals"])
  assert r["test_intervals"]["final"]["source/csv/perplexity"]["n"] == r["eval_sets"]["test"]["sources"]["csv"][
      "sequences"]
  summary = open(os.path.join(workdir, "summary.md")).read()
  t = r["eval_sets"]["test"]["sources"]["csv"]
  assert f"| csv | domain | 5 | 155 | {t['sequences']} | {t['tokens']} |" in summary
