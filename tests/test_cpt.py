"""Continual pre-training on the task loop (cl_jax.lm.runner) and the regression monitor (cl_jax.lm.monitor)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import cl_jax
from cl_jax import faults, lm
from cl_jax.lm import runner
from cl_jax.lm.data import load_data
from cl_jax.lm.monitor import RegressionMonitor, relative_regression

BASE = {"general/perplexity": 10.0, "general/accuracy": 0.50, "general/cloze_accuracy": 0.60,
        "domain/perplexity": 20.0, "domain/accuracy": 0.30}


def test_relative_regression_directions():
  assert relative_regression(10.0, 10.3, higher_better=False) == pytest.approx(0.03)
  assert relative_regression(0.5, 0.49, higher_better=True) == pytest.approx(0.02)
  assert relative_regression(0.5, 0.55, higher_better=True) == pytest.approx(-0.1)


def test_monitor_hard_stop_on_forced_regression_keeps_best_inside():
  m = RegressionMonitor(BASE, threshold=0.02)
  assert m.check(0, BASE).is_best
  ok = {**BASE, "general/perplexity": 10.15, "domain/perplexity": 15.0}   # +1.5%: inside
  v = m.check(50, ok)
  assert v.within and v.is_best and not m.should_stop
  better_domain_but_regressed = {**BASE, "general/accuracy": 0.485, "domain/perplexity": 12.0}  # -3% acc
  v = m.check(100, better_domain_but_regressed)
  assert v.crossed == ["general/accuracy"] and not v.within and not v.is_best
  assert m.should_stop and m.stopped["step"] == 100
  assert m.stopped["regressions"]["general/accuracy"] == pytest.approx(0.03)
  assert m.best["step"] == 50  # the better-domain checkpoint is outside the threshold, so not kept
  assert "Hard stop at step 100: general/accuracy +3.00%" in m.describe() and "step 50" in m.describe()
  # The first crossing is the one reported, even if another metric crosses later.
  m.check(150, {**BASE, "general/perplexity": 11.0})
  assert m.stopped["step"] == 100


def test_monitor_errors():
  with pytest.raises(ValueError, match="threshold"):
    RegressionMonitor(BASE, threshold=0.0)
  with pytest.raises(ValueError, match="regression.select"):
    RegressionMonitor(BASE, select="domain/bleu")
  with pytest.raises(ValueError, match="regression.interval"):
    RegressionMonitor(BASE, interval="normal")
  with pytest.raises(ValueError, match="regression.keep"):
    RegressionMonitor(BASE, keep="last")
  with pytest.raises(KeyError, match="general/accuracy"):
    RegressionMonitor(BASE).check(1, {k: v for k, v in BASE.items() if k != "general/accuracy"})


def _tiny(**changes):
  c = lm.default_config()
  c.lm.d_model, c.lm.num_layers, c.lm.num_heads, c.lm.seq_len = 32, 1, 2, 32
  # 5% splits: the tests (the EWC comparison in particular) were calibrated on them
  c.text.update(max_train_sequences=256, eval_sequences=16, general_eval_sequences=64, cloze_items=16,
                cloze_context=16, validation=0.05, test=0.05)
  c.optim.lr = 1e-2
  c.pretrain.update(steps=30, batch_size=8)
  c.adapt.update(steps=20, batch_size=8, mixture="70_30")
  c.regression.update(eval_every=5, eval_batch_size=16)
  c.train.log_every_steps = 5
  for k, v in changes.items():
    section, key = k.split("__")
    c[section][key] = v
  return c


@pytest.fixture(scope="module")
def data():
  return load_data(_tiny())


def completion_items(data, path, n=64, seed=0):
  """A user's completion benchmark (JSONL, HellaSwag's row format) from the general TRAINING text: the true ending of
  a sentence against three strings of control bytes of its length, which neither corpus holds. The base scores 100%;
  a model that loses general text (domain-only at a high learning rate) loses it."""
  rng = np.random.default_rng(seed)
  rows = []
  for r in np.asarray(data.train["general"]):
    text = data.tokenizer.decode(r)
    cut = text.find(" ", 12)
    if cut < 0 or len(text) - cut < 9 or not text.isascii():
      continue
    noise = [bytes(rng.integers(1, 8, len(text) - cut - 1).astype(np.uint8)).decode() for _ in range(3)]
    label = int(rng.integers(4))
    rows.append({"query": text[:cut], "choices": noise[:label] + [text[cut + 1:]] + noise[label:], "label": label})
    if len(rows) == n:
      break
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return str(path)


@pytest.fixture(scope="module")
def bench(data, tmp_path_factory):
  """`regression.benchmarks`: the completion items above, general, guarded on acc at 2 points."""
  path = completion_items(data, tmp_path_factory.mktemp("bench") / "general_completion.jsonl")
  return [{"name": path, "threshold": 2.0, "metric": "acc"}]


BENCH_ACC = "general/bench/general_completion/acc"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, bench):
  """A finished run through `cl_jax.run` with a loose threshold: pretraining, adaptation to the end, all outputs;
  with a general benchmark (guarded at 2 points) in the monitor."""
  workdir = str(tmp_path_factory.mktemp("cpt") / "run")
  c = _tiny(regression__threshold=0.5, regression__benchmarks=bench)
  return cl_jax.run(c, workdir, progress=False), workdir


def test_run_writes_outputs_and_logs_realised_mixture(base_run):
  results, workdir = base_run
  assert results.kind == "lm" and cl_jax.Results.load(workdir).extra["test"] == results.extra["test"]
  fig = results.plot()  # the monitor plot, as a matplotlib Figure: general, domain, benchmarks
  assert len(fig.axes) == 3 and "general/perplexity" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert [t.get_text() for t in fig.axes[2].get_legend().get_texts()][0] == "general_completion acc"
  assert all("/bench/" not in t.get_text() for t in fig.axes[0].get_legend().get_texts())
  r = results.extra
  for f in ("results.json", "summary.md", "monitor.png", "metrics.jsonl", "config.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  assert r["stopped"] is None and r["steps_run"] == 20 and len(r["history"]) == 5  # steps 0,5,...,20
  # Adaptation helped the domain it trained on.
  assert r["test"]["final"]["domain/perplexity"] < r["test"]["base"]["domain/perplexity"]
  # The realised mixture per eval interval: 70/30 within binomial tolerance over all intervals.
  log = r["realised_mixture"]
  assert [e["end"] for e in log] == [5, 10, 15, 20]
  share = np.mean([e["realised"]["domain"] for e in log])
  assert abs(share - 0.7) < 4 * np.sqrt(0.21 / (20 * 8))
  assert all(e["configured_at_end"]["domain"] == pytest.approx(0.7) for e in log)
  # The best checkpoint is named, exists, and its test metrics are what the table row reports.
  assert os.path.isdir(r["best_checkpoint"])
  assert r["row"]["domain_ppl_gain_pct"] == pytest.approx(
      100 * (1 - r["test"]["best"]["domain/perplexity"] / r["test"]["base"]["domain/perplexity"]))
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [e for e in records if e["type"] == "eval" and e["phase"] == "adapt"]
  assert [e["step"] for e in evals] == [0, 5, 10, 15, 20] and "realised_mixture" in evals[1]
  # The benchmark: its scores (every metric) in every evaluation, the guarded one with its interval and call; the
  # base read the general text it was built from.
  assert evals[0][BENCH_ACC] == 1.0 and "general/bench/general_completion/acc_norm" in evals[0]
  for e in evals:
    lo, hi = e["regression_intervals"][BENCH_ACC]
    assert lo <= e["regressions"][BENCH_ACC] <= hi and e["regressions"][BENCH_ACC] == pytest.approx(1 - e[BENCH_ACC])
    assert e["regression_decisions"][BENCH_ACC] in ("within", "inconclusive", "regressed")
  # summary.md: before / after / kept per benchmark.
  row = r["benchmarks"][0]
  assert (row["benchmark"], row["role"], row["metric"], row["items"]) == ("general_completion", "general", "acc", 64)
  assert row["before"] == 1.0 and row["after"]["step"] == 20 and row["kept"]["step"] == r["best_step"]
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "## Benchmarks" in summary and "| general_completion | general | acc | 64 | 2 pts | 100.0 | " in summary
  # TensorBoard has the curve (the event files hold the tag of every numeric eval field).
  tb = os.path.join(workdir, "tensorboard")
  events = b"".join(open(os.path.join(tb, f), "rb").read() for f in os.listdir(tb))
  assert b"adapt/eval/" + BENCH_ACC.encode() in events
  # Both phases through the one loop: 30 pre-training and 20 adaptation train records, each step once.
  for phase, n in (("pretrain", 30), ("adapt", 20)):
    steps = [e["step"] for e in records if e["type"] == "train" and e["phase"] == phase]
    assert steps == list(range(1, n + 1)), phase


def test_hard_stop_fires_on_forced_regression(data, base_run, bench, tmp_path):
  _, base_workdir = base_run
  # Force a regression: adapt on code only with a learning rate 30x the pre-training one.
  c = _tiny(adapt__mixture="domain_only", adapt__lr_ratio=30.0, pretrain__base_dir=base_workdir,
            regression__benchmarks=bench)
  r = cl_jax.run(c, str(tmp_path / "stop"), progress=False, data=data).extra
  assert r["stopped"] is not None and r["stopped"]["step"] == 5 and r["steps_run"] == 5
  # Called on the paired interval: its lower end (not only the estimate) is beyond 2%.
  assert "general/perplexity" in r["stopped"]["metrics"]
  # The benchmark is lost too, beyond its 2 points on its paired interval, and the stop record names it.
  assert BENCH_ACC in r["stopped"]["metrics"] and r["stopped"]["benchmarks"] == ["general_completion"]
  assert r["stopped"]["intervals"][BENCH_ACC][0] > 0.02 and r["history"][1]["decisions"][BENCH_ACC] == "regressed"
  assert "general/bench/general_completion/acc +" in r["monitor"] and " points" in r["monitor"]
  assert all(r["history"][1]["intervals"][m]["lo"] > 0.02 for m in r["stopped"]["metrics"])
  assert r["history"][1]["decision"] == "regressed"
  assert "Hard stop at step 5" in r["monitor"]
  # Nothing after the base stayed inside 2%, so the kept checkpoint is the base itself (step 0).
  assert r["best_step"] == 0 and r["best_checkpoint"].endswith(os.path.join("best", "0"))
  assert os.path.isdir(r["best_checkpoint"])
  for k, v in r["test"]["base"].items():
    assert r["test"]["best"][k] == pytest.approx(v, rel=1e-6), k
  assert r["row"]["stopped"] and r["row"]["stopped_step"] == 5


def test_benign_run_at_the_default_threshold_keeps_an_adapted_model(data, base_run, bench, tmp_path):
  """Issue 9 item 5: with the default monitor (2%, paired 95% interval), a 70/30 run whose general text does not
  regress must not stop on noise and must hand back an adapted checkpoint, not the base; with a general benchmark
  guarded at 2 points (issue 21 item 4) too."""
  _, base_workdir = base_run
  c = _tiny(pretrain__base_dir=base_workdir, regression__benchmarks=bench)
  assert c.regression.threshold == 0.02 and c.regression.hard_stop
  workdir = str(tmp_path / "benign")
  r = cl_jax.run(c, workdir, progress=False, data=data).extra
  assert r["stopped"] is None and r["steps_run"] == 20
  assert r["test_intervals"]["best"]["general/perplexity"]["estimate"] <= 0.02
  assert r["best_step"] > 0 and r["test"]["best"]["domain/perplexity"] < r["test"]["base"]["domain/perplexity"]
  kept = r["benchmarks"][0]["kept"]
  assert kept["step"] == r["best_step"] and kept["decision"] == "within" and kept["interval"]["lo"] <= 0.02
  # Every decision is in metrics.jsonl: estimate, interval, verdict per evaluation.
  evals = [e for e in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if e["type"] == "eval"]
  assert [e["step"] for e in evals] == [0, 5, 10, 15, 20]
  for e in evals:
    lo, hi = e["regression_intervals"]["general/perplexity"]
    assert lo <= e["regressions"]["general/perplexity"] <= hi
    assert e["regression_decision"] in ("within", "inconclusive")
  assert sum(e["kept"] for e in evals if e["kept"]) >= 2 and evals[0]["kept"]
  # summary.md states the evaluation sets' sizes and what they resolve.
  summary = open(os.path.join(workdir, "summary.md")).read()
  g = r["eval_sets"]["validation"]["general"]
  assert g == {"sequences": 64, "tokens": 64 * 31}
  assert f"| validation | 64 | {64 * 31:,} |" in summary and "80% power" in summary


def test_lora_keeps_the_base_exactly(data, base_run, tmp_path):
  _, base_workdir = base_run
  c = _tiny(adapt__lr_ratio=1.0, adapt__mixture="domain_only", pretrain__base_dir=base_workdir,
            regression__threshold=0.5, lora__rank=4)
  c.strategy = "lora"
  r = cl_jax.run(c, str(tmp_path / "lora"), progress=False, data=data).extra
  assert r["method"] == "lora" and r["strategy_config"]["lora"]["rank"] == 4
  assert r["lora_base_unchanged"] is True
  assert r["test"]["final"]["domain/perplexity"] < r["test"]["base"]["domain/perplexity"]


def test_config_entry_point_and_errors():
  from cl_jax.kinds import validate  # types, the LM schema, then its cross-key checks
  from configs.cpt_lm import get_config
  c = get_config("mixture=two_phase,schedule=cosine")
  assert c.kind == "lm" and c.adapt.mixture == "two_phase" and c.optim.schedule == "cosine"
  validate(c)
  stages = runner.adaptation_stages(c)
  assert stages[1][0] == c.adapt.steps - round(c.optim.decay_fraction * c.adapt.steps)
  with pytest.raises(ValueError, match="mixture='60_30'"):
    validate(get_config("mixture=60_30"))
  bad = get_config()
  bad.adapt.lr_ratio = 0.0
  with pytest.raises(ValueError, match="^adapt.lr_ratio=0.0"):
    validate(bad)
  # The strategy sections are the classic path's; an LM-only refusal names its key.
  assert get_config("strategy=lora+distill").lora.rank == 8
  with pytest.raises(ValueError, match="^strategy='replay'"):
    validate(get_config("strategy=replay"))
  for key, value, match in (("regression.interval", "normal", "^regression.interval='normal'"),
                            ("regression.confidence", 1.0, "^regression.confidence=1.0"),
                            ("regression.keep", "last", "^regression.keep='last'"),
                            ("regression.stop_threshold", 0.0, "^regression.stop_threshold=0.0"),
                            ("regression.bootstrap_samples", 10, "^regression.bootstrap_samples=10"),
                            ("text.general_eval_sequences", -1, "^text.general_eval_sequences=-1")):
    bad = get_config()
    section, k = key.split(".")
    bad[section][k] = value
    with pytest.raises(ValueError, match=match):
      validate(bad)
  ewc_exact = get_config("strategy=ewc")
  ewc_exact.fisher.kind = "exact"
  with pytest.raises(ValueError, match="^fisher.kind='exact'"):
    validate(ewc_exact)



def test_unknown_model_size_exits_2_naming_the_sizes(tmp_path, capsys):
  from cl_jax.cli import main
  from cl_jax.models.transformer import SIZES
  workdir = tmp_path / "w"
  rc = main(["--config", "configs/cpt_lm.py", "--config.lm.size=huge", "--workdir", str(workdir), "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err == f"error: lm.size='huge': expected one of {list(SIZES)}"
  assert not workdir.exists()

def test_resume_after_a_crash_ends_with_the_same_numbers(data, base_run, bench, tmp_path, monkeypatch):
  reference, base_workdir = base_run
  # Same adaptation as `base_run` (same seed, same base restored from it, same benchmark), crashing after step 10.
  c = _tiny(regression__threshold=0.5, pretrain__base_dir=base_workdir, regression__benchmarks=bench)
  workdir = str(tmp_path / "resume")
  monkeypatch.setenv(faults.CRASH_ENV, "10")
  with pytest.raises(faults.SimulatedCrash):
    cl_jax.run(c, workdir, progress=False, data=data)
  monkeypatch.delenv(faults.CRASH_ENV)
  r = cl_jax.run(c, workdir, progress=False, data=data).extra
  ref = reference.extra
  assert [h["step"] for h in r["history"]] == [0, 5, 10, 15, 20]
  for split_model in ("best", "final"):
    for k, v in ref["test"][split_model].items():
      assert r["test"][split_model][k] == pytest.approx(v, rel=1e-5), (split_model, k)
  assert r["realised_mixture"] == ref["realised_mixture"]
  # The monitor's state came back from the checkpoint's meta: every decision after the resume is the same, the
  # benchmark's included (its baseline items are the step-0 ones, its bootstrap seeded by the step).
  for h, g in zip(r["history"], ref["history"]):
    assert (h["decisions"], h["decision"], h["kept"]) == (g["decisions"], g["decision"], g["kept"]), h["step"]
    assert h["metrics"][BENCH_ACC] == g["metrics"][BENCH_ACC]
    assert h["intervals"][BENCH_ACC] == g["intervals"][BENCH_ACC]
  assert r["benchmarks"] == ref["benchmarks"] and r["best_step"] == ref["best_step"]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [e["step"] for e in records if e["type"] == "eval"] == [0, 5, 10, 15, 20]  # nothing logged twice
  assert all(e["phase"] == "adapt" for e in records)  # the base came from base_dir: no pre-training here
  assert [e["step"] for e in records if e["type"] == "train"] == list(range(1, 21))


def test_lm_checkpoints_prove_themselves_and_metrics_come_back(data, base_run, bench, tmp_path):
  """Issue 23 on the LM kind (the checkpoint code is the classic kind's, tests/test_trust_checkpoints.py): the
  newest adaptation checkpoint with flipped bytes is set aside for the one before it, a deleted metrics.jsonl is
  rewritten from that checkpoint's copy, and the run ends with the same numbers."""
  import shutil
  import warnings
  reference, base_workdir = base_run
  workdir = str(tmp_path / "run")
  shutil.copytree(base_workdir, workdir)
  newest = os.path.join(workdir, "checkpoints", "tasks", "20")
  blob = max((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(newest, "state")) for f in fs
              if os.path.basename(d) == "d"), key=os.path.getsize)
  with open(blob, "r+b") as f:
    f.seek(os.path.getsize(blob) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(blob) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = cl_jax.run(_tiny(regression__threshold=0.5, regression__benchmarks=bench), workdir, progress=False,
                   data=data).extra
  said = [str(w.message) for w in caught]
  set_aside = [m for m in said if m.startswith("checkpoint ")]
  assert len(set_aside) == 1 and set_aside[0].startswith(f"checkpoint {newest} is corrupt (array digest mismatch"), said
  assert sum("metrics.jsonl was missing" in m for m in said) == 1, said
  for split_model in ("best", "final"):
    for k, v in reference.extra["test"][split_model].items():
      assert r["test"][split_model][k] == pytest.approx(v, rel=1e-5), (split_model, k)
  key = lambda path: [(e["type"], e.get("phase"), e["step"]) for e in map(json.loads, open(path))]
  assert key(os.path.join(workdir, "metrics.jsonl")) == key(os.path.join(base_workdir, "metrics.jsonl"))
  # Up to the step it resumed from, the log is the original's byte for byte (rewritten from the checkpoint's copy).
  step = int(next(m for m in said if "metrics.jsonl was missing" in m).split("checkpoint of step ")[1].split()[0])
  with open(os.path.join(base_workdir, "metrics.jsonl")) as f:
    original = [line for line in f if json.loads(line).get("phase") == "pretrain" or json.loads(line)["step"] <= step]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.readlines()[:len(original)] == original and 0 < step < 20


def test_generative_replay_pool_and_run(data, base_run, tmp_path):
  import jax
  from cl_jax.models.transformer import build_lm
  from cl_jax.strategies.generative_replay import generate_pool
  _, base_workdir = base_run
  c = _tiny(pretrain__base_dir=base_workdir, regression__threshold=0.5, generative_replay__num_prompts=12,
            generative_replay__prompt_len=8, generative_replay__batch_size=8)
  c.strategy = "generative_replay"
  model, params = build_lm(runner.model_config(c, data.tokenizer.vocab_size), seed=0)
  general = data.train["general"]
  kw = dict(num_prompts=12, prompt_len=8, temperature=1.0, batch_size=8)
  pool = generate_pool(model.apply, params, general, jax.random.key(1), **kw)
  again = generate_pool(model.apply, params, general, jax.random.key(1), **kw)
  assert pool.shape == (12, general.shape[1]) and np.array_equal(pool, again)
  # Each sample continues a stored general prompt: the prefix is a real sequence's first 8 tokens...
  prefixes = {tuple(r[:8]) for r in general}
  assert all(tuple(r[:8]) in prefixes for r in pool)
  # ...and the continuation is the model's, not the stored text.
  assert not any(any(np.array_equal(r, g) for g in general) for r in pool)
  r = cl_jax.run(c, str(tmp_path / "genreplay"), progress=False, data=data).extra
  assert r["strategy"] == "generative_replay" and r["steps_run"] == 20
  assert r["test"]["final"]["domain/perplexity"] < r["test"]["base"]["domain/perplexity"]
  # 30% of the 70/30 mixture's rows were replayed samples.
  replayed = [e["replayed_fraction"] for e in map(json.loads, open(os.path.join(tmp_path, "genreplay",
                                                                               "metrics.jsonl")))
              if e["type"] == "train" and e["phase"] == "adapt"]
  assert abs(np.mean(replayed) - 0.3) < 0.15


def test_lm_fisher_is_the_mean_of_per_sequence_squared_gradients(data):
  import jax
  from cl_jax.losses import next_token_metrics
  from cl_jax.models.transformer import build_lm
  from cl_jax.strategies import Learner
  from cl_jax.strategies.fisher import fisher_diagonal
  model, params = build_lm(runner.model_config(_tiny(), data.tokenizer.vocab_size), seed=0)
  seqs = data.train["general"][:3]
  learner = Learner(model.apply, runner.no_logit_mask)
  fisher = fisher_diagonal(learner, params, seqs[:, :-1], seqs[:, 1:], np.zeros(3, np.int32), 0, kind="empirical")

  def loss(p, s):
    return next_token_metrics(model.apply(p, s[None, :-1]), {"tokens": s[None]})[0]

  grads = [jax.grad(loss)(params, s) for s in seqs]
  expected = jax.tree.map(lambda *g: sum(np.square(np.asarray(x)) for x in g) / 3, *grads)
  for a, b in zip(jax.tree.leaves(fisher), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-10)
  # Not the square of the mean gradient (which cancels across sequences).
  mean_sq = jax.tree.map(lambda *g: np.square(sum(np.asarray(x) for x in g) / 3), *grads)
  assert sum(np.sum(a) for a in jax.tree.leaves(fisher)) > sum(np.sum(b) for b in jax.tree.leaves(mean_sq))
  with pytest.raises(ValueError, match="fisher.kind='exact'"):
    fisher_diagonal(learner, params, seqs[:, :-1], seqs[:, 1:], np.zeros(3, np.int32), 0, kind="exact")


def test_ewc_on_the_lm_holds_general_text(data, base_run, tmp_path):
  _, base_workdir = base_run
  common = dict(adapt__mixture="domain_only", adapt__lr_ratio=3.0, pretrain__base_dir=base_workdir,
                regression__threshold=0.9, fisher__num_samples=32)
  naive = cl_jax.run(_tiny(**common), str(tmp_path / "naive"), progress=False, data=data).extra
  c = _tiny(ewc__lam=1e3, **common)  # naive moves general perplexity by ~6% here, EWC by ~1.5%
  c.strategy = "ewc"
  ewc = cl_jax.run(c, str(tmp_path / "ewc"), progress=False, data=data).extra
  assert ewc["strategy_config"]["fisher"]["kind"] == "empirical"

  def general_change(r):
    return abs(r["test"]["final"]["general/perplexity"] / r["test"]["base"]["general/perplexity"] - 1)

  assert general_change(ewc) < 0.5 * general_change(naive)


def test_monitor_patience_rides_out_a_dip_that_recovers():
  dip = dict(BASE, **{"general/perplexity": BASE["general/perplexity"] * 1.05})
  m = RegressionMonitor(BASE, threshold=0.02, patience=2)
  m.check(50, dip)
  assert not m.should_stop            # one crossing: within patience
  m.check(100, BASE)                  # recovered: the streak resets
  m.check(150, dip)
  assert not m.should_stop
  m.check(200, dip)                   # two in a row: stop
  assert m.should_stop and m.stopped["step"] == 200
  with pytest.raises(ValueError, match="regression.patience"):
    RegressionMonitor(BASE, patience=0)
