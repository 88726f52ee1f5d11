"""Continual pre-training: general prose -> Python code, seven ways, several seeds.

  python experiments/continual_pretraining.py                      # the table in results/ (CPU, ~1 h per seed loaded)
  python experiments/continual_pretraining.py --quick              # a smoke run (minutes)
  python experiments/continual_pretraining.py --seeds 0 1 2 --adapt_steps 600

Per seed: pre-train a byte-level `tiny` transformer on general text (CPython's pydoc topics and
docstrings), then adapt a copy of that same base to code (standard-library source) with each variant:
  (a) domain only            (b) 70/30 domain/general    (c) 50/50
  (d) three-phase curriculum 80/20 -> 50/50 -> 20/80 general/domain
  (e) two-phase recipe (50/50 while the LR is stable, 90/10 domain during the decay): WSD vs cosine
  (f) domain only + distillation to the base (token KL, T=2)
  (g) domain only with a LoRA adapter (rank 8) on the frozen base
  (h) domain only, difficulty-aware order (code files by base perplexity, moderate first, most OOD last)
All variants share the adaptation budget (steps, batch, peak LR = lr_ratio x pre-training LR, 5% warmup).
The regression monitor runs in record-only mode (`regression.hard_stop=False`) so every variant is
measured at the same step count; the table reports where it *would* have stopped and what it keeps (what a
stopped run keeps: nothing after the call). It decides on paired intervals (cl_jax.lm.monitor): per-sequence
losses of the adapted model against the base's on the same sequences.

Both evaluation splits are reported with 95% paired intervals: general validation and test are 15% of the source
files each (the whole splits are evaluated), large enough that the two splits agree in sign wherever either can
tell the sign; the report computes that agreement, the best arm and the claim verdicts from the runs.

Writes results/continual_pretraining.md, results/continual_pretraining.json and two PNGs beside them.
The seed's claims tested: mixing 20-40% general data cuts regression compared to domain only; LoRA keeps
the base exactly; WSD suits a domain-heavy late phase better than cosine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

import cl_jax
from experiments.lm_protocol import small_lm_config
from experiments.protocol import portable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "a_domain_only": dict(mixture="domain_only"),
    "b_70_30": dict(mixture="70_30"),
    "c_50_50": dict(mixture="50_50"),
    "d_three_phase": dict(mixture="three_phase"),
    "e_two_phase_wsd": dict(mixture="two_phase", schedule="wsd"),
    "e_two_phase_cosine": dict(mixture="two_phase", schedule="cosine"),
    "f_distill": dict(mixture="domain_only", strategy="distill"),
    "g_lora": dict(mixture="domain_only", strategy="lora"),
    "h_difficulty": dict(mixture="difficulty"),
}


def make_config(args, seed: int, variant: dict, base_dir: str = ""):
  c = small_lm_config(seed, pretrain_steps=args.pretrain_steps, adapt_steps=args.adapt_steps, base_dir=base_dir,
                      mixture=variant["mixture"], eval_every=args.eval_every, eval_sequences=args.eval_sequences,
                      general_eval_sequences=args.general_eval_sequences, cloze_items=args.cloze_items,
                      validation=args.split_fraction, test=args.split_fraction)
  c.optim.schedule = variant.get("schedule", "wsd")
  c.adapt.lr_ratio = args.lr_ratio
  c.strategy = variant.get("strategy", "naive")
  if "lora" in c.strategy.split("+"):
    c.adapt.lr_ratio = args.lora_lr_ratio
  c.adapt.difficulty = variant["mixture"] == "difficulty"
  c.regression.update(threshold=0.02, stop_threshold=args.stop_threshold)
  return c


def mean_std(xs):
  xs = np.asarray([x for x in xs if x is not None], float)
  if xs.size == 0:
    return "-"
  return f"{xs.mean():+.2f} ± {xs.std(ddof=1):.2f}" if xs.size > 1 else f"{xs.mean():+.2f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--pretrain_steps", type=int, default=1000)
  p.add_argument("--adapt_steps", type=int, default=300)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--lr_ratio", type=float, default=0.1)
  p.add_argument("--lora_lr_ratio", type=float, default=1.0)
  p.add_argument("--stop_threshold", type=float, default=0.05, help="the monitor's stop (regression.stop_threshold)")
  p.add_argument("--eval_sequences", type=int, default=256, help="domain sequences per evaluation split")
  p.add_argument("--general_eval_sequences", type=int, default=0, help="general sequences per evaluation split "
                 "(0: the whole split)")
  p.add_argument("--split_fraction", type=float, default=0.15, help="text.validation = text.test")
  p.add_argument("--cloze_items", type=int, default=400)
  p.add_argument("--variants", nargs="+", default=list(VARIANTS))
  p.add_argument("--base_dir", default="", help="adapt from this finished LM run's base instead of pre-training "
                 "one per seed (one seed; lets several processes share a base, each running some --variants)")
  p.add_argument("--workroot", default=os.path.join(ROOT, "runs", "continual_pretraining"))
  p.add_argument("--out", default=os.path.join(ROOT, "results", "continual_pretraining.md"))
  p.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run")
  p.add_argument("--note", default="", help="a provenance sentence printed under the command line (e.g. how "
                 "parallel processes were launched), with --from_json")
  p.add_argument("--continue_json", action="store_true", help="keep the runs already in the results JSON, "
                 "run only the missing (seed, variant) pairs, reusing each seed's base")
  p.add_argument("--from_json", default="", help="rewrite the report from a saved results JSON (the runs of "
                 "--seeds only), training nothing")
  args = p.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    for k in ("pretrain_steps", "adapt_steps", "eval_every", "lr_ratio", "lora_lr_ratio", "eval_sequences",
              "general_eval_sequences", "split_fraction", "cloze_items"):
      setattr(args, k, saved["args"].get(k, getattr(args, k)))
    records = [dict(r, threshold=r.get("threshold", 0.02)) for r in saved["runs"] if r["seed"] in args.seeds]
    seconds = sum(r["timing"]["total_seconds"] for r in records)
    write_outputs(args, records, seconds)
    return records
  if args.quick:
    args.pretrain_steps, args.adapt_steps, args.eval_every = 60, 40, 20
    args.eval_sequences, args.general_eval_sequences, args.cloze_items, args.seeds = 32, 128, 60, [0]
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown:
    p.error(f"--variants: unknown {unknown}; choose among {list(VARIANTS)}")

  t0 = time.time()
  records = []
  stem = os.path.splitext(args.out)[0]
  if args.continue_json and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      records = [dict(r, threshold=r.get("threshold", 0.02)) for r in json.load(f)["runs"]]
  done = {(r["seed"], r["variant"]) for r in records}
  for seed in args.seeds:
    base_dir = args.base_dir or next((r["workdir"] for r in records if r["seed"] == seed), "")
    for name in args.variants:
      if (seed, name) in done:
        continue
      c = make_config(args, seed, VARIANTS[name], base_dir)
      workdir = os.path.join(args.workroot, f"seed{seed}", name)
      t = time.time()
      r = cl_jax.run(c, workdir, overwrite=True, progress=False).extra
      base_dir = base_dir or workdir  # later variants adapt the same base
      r["variant"] = name
      r["workdir"] = workdir
      records.append(r)
      row = r["row"]
      print(f"[{time.time() - t0:6.0f}s] seed {seed} {name:20s} final: domain ppl {row['final_domain_ppl_gain_pct']:+.2f}%"
            f", general ppl {row['final_general_ppl_regression_pct']:+.2f}%; crossed at "
            f"{row['stopped_step']} {row['stopped_metrics']} ({time.time() - t:.0f}s)", flush=True)
      write_outputs(args, records, time.time() - t0)
  return records


def write_outputs(args, records, seconds):
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  stem = os.path.splitext(args.out)[0]
  slim = [{k: r[k] for k in ("variant", "seed", "row", "threshold", "test", "test_intervals", "baseline", "history",
                             "stopped", "best_step", "realised_mixture", "stages", "adapt_lr", "pretrain_lr",
                             "num_params", "eval_sets", "monitor_rule", "timing", "workdir") if k in r}
          | ({"lora_base_unchanged": r["lora_base_unchanged"]} if "lora_base_unchanged" in r else {})
          for r in records]
  with open(stem + ".json", "w") as f:
    json.dump(portable({"args": vars(args), "runs": slim}), f, indent=2)
  plot_tradeoff(records, stem + "_tradeoff.png")
  plot_curves(records, stem + "_curves.png", records[0]["threshold"])
  with open(args.out, "w") as f:
    f.write(report(args, records, seconds, os.path.basename(stem)))


def _by_variant(records):
  out = {}
  for r in records:
    out.setdefault(r["variant"], []).append(r)
  return out


def plot_tradeoff(records, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 5))
  for name, rs in _by_variant(records).items():
    x = [r["row"]["final_general_ppl_regression_pct"] for r in rs]
    y = [r["row"]["final_domain_ppl_gain_pct"] for r in rs]
    ax.errorbar(np.mean(x), np.mean(y), xerr=np.std(x) if len(x) > 1 else None,
                yerr=np.std(y) if len(y) > 1 else None, fmt="o", capsize=3, label=name)
  ax.axvline(100 * records[0]["threshold"], color="red", ls="--", label="2% threshold")
  ax.set_xlabel("general perplexity regression at the end (%)")
  ax.set_ylabel("domain (code) perplexity gain at the end (%)")
  ax.set_title("continual pre-training: domain gain vs general regression (test split)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(records, path, threshold):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  seed = records[0]["seed"]
  for r in records:
    if r["seed"] != seed:
      continue
    steps = [h["step"] for h in r["history"]]
    line, = axes[0].plot(steps, [100 * h["regressions"][PPL] for h in r["history"]], marker=".",
                         label=r["variant"])
    if all("intervals" in h for h in r["history"]):  # the monitor's 95% paired interval
      axes[0].fill_between(steps, [100 * h["intervals"][PPL]["lo"] for h in r["history"]],
                           [100 * h["intervals"][PPL]["hi"] for h in r["history"]], color=line.get_color(), alpha=0.15)
    base = r["baseline"]["domain/perplexity"]
    axes[1].plot(steps, [100 * (1 - h["metrics"]["domain/perplexity"] / base) for h in r["history"]],
                 marker=".", label=r["variant"])
  axes[0].axhline(100 * threshold, color="red", ls="--", label="threshold")
  axes[0].set_ylabel("general perplexity regression (%, band: 95% interval)")
  axes[1].set_ylabel("domain perplexity gain (%)")
  for ax in axes:
    ax.set_xlabel("adaptation step")
    ax.legend(fontsize=7)
  fig.suptitle(f"validation metrics during adaptation (seed {seed})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


PPL = "general/perplexity"


def _val_iv(record, metric=PPL):
  """The validation interval record of the final evaluation (the monitor's split)."""
  return record["history"][-1]["intervals"][metric]


def _test_iv(record, model="final", metric=PPL):
  return record["test_intervals"][model][metric]


def _ci(iv) -> str:
  return f"{100 * iv['estimate']:+.2f} [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}]"


def _sign(x: float) -> int:
  return int(np.sign(round(x, 12)))


def replay(record, stop_threshold: float) -> dict:
  """The monitor's decisions re-derived from the recorded validation intervals (cl_jax.lm.monitor's rule): the first
  evaluation regressed beyond the threshold, the one that would stop the run (lower bound beyond max(threshold,
  stop_threshold)), and the kept step (best validation domain perplexity among the evaluations not regressed, before
  any stop). Record-only runs train on; this is what a hard-stopping run would have kept."""
  thr = record["threshold"]
  stop = max(thr, stop_threshold)
  out = {"first_regressed": None, "stop": None, "kept": 0}
  best = math.inf
  for h in record["history"]:
    lows = {m: iv["lo"] for m, iv in h["intervals"].items()}
    regressed = sorted(m for m, lo in lows.items() if lo > thr)
    if regressed and out["first_regressed"] is None:
      out["first_regressed"] = (h["step"], regressed)
    if out["stop"] is None and not regressed and h["metrics"]["domain/perplexity"] < best:
      best, out["kept"] = h["metrics"]["domain/perplexity"], h["step"]
    harmful = sorted(m for m, lo in lows.items() if lo > stop)
    if harmful and out["stop"] is None:
      out["stop"] = (h["step"], harmful)
  return out


def _kept_numbers(record, step):
  """(validation gain, validation general regression, test gain, test general regression) of the kept step, in %;
  test numbers exist for the base (step 0) and the final step only."""
  h = next(h for h in record["history"] if h["step"] == step)
  base = record["baseline"]
  val_gain = 100 * (1 - h["metrics"]["domain/perplexity"] / base["domain/perplexity"])
  val_regr = 100 * h["intervals"][PPL]["estimate"]
  t = record["test"]
  model = "base" if step == 0 else "final" if step == record["history"][-1]["step"] else None
  if model is None:
    return val_gain, val_regr, None, None
  return (val_gain, val_regr, 100 * (1 - t[model]["domain/perplexity"] / t["base"]["domain/perplexity"]),
          100 * (t[model][PPL] / t["base"][PPL] - 1))


def report(args, records, seconds, stem) -> str:
  groups = _by_variant(records)
  r0 = records[0]
  sizes = r0["eval_sets"]
  g_val, g_test = sizes["validation"]["general"], sizes["test"]["general"]
  d_val, d_test = sizes["validation"]["domain"], sizes["test"]["domain"]
  thr = 100 * r0["threshold"]
  lines = [
      "# Continual pre-training: general prose -> Python code",
      "",
      "Produced by `python experiments/continual_pretraining.py "
      f"--seeds {' '.join(map(str, args.seeds))} --pretrain_steps {args.pretrain_steps} "
      f"--adapt_steps {args.adapt_steps} --eval_every {args.eval_every}` "
      f"({seconds / 60:.0f} min of run wall time on a shared, loaded 2-core CPU). "
      + (args.note.strip() + " " if getattr(args, "note", "") else "") +
      "Model: byte-level `tiny` transformer "
      f"({r0['num_params']:,} params, d=128, 2 layers, 128-byte context); pre-training "
      f"{args.pretrain_steps} steps at peak LR {r0['pretrain_lr']:g} (cosine), adaptation {args.adapt_steps} steps "
      f"at peak LR {r0['adapt_lr']:g} (= {args.lr_ratio:g} x; LoRA: {args.lora_lr_ratio:g} x), 5% warmup, batch 16. "
      "Corpora: general = pydoc topics + docstrings of half the standard library; domain = source of the other "
      f"half; each split by source file ({100 * args.split_fraction:g}% of the files each to validation and test).",
      "",
      f"Evaluation sets (the same for every arm): general validation {g_val['sequences']:,} sequences = "
      f"{g_val['tokens']:,} scored tokens, general test {g_test['sequences']:,} sequences = {g_test['tokens']:,} "
      f"tokens; domain validation / test {d_val['sequences']:,} / {d_test['sequences']:,} sequences "
      f"({d_val['tokens']:,} / {d_test['tokens']:,} tokens); {sizes['validation']['cloze_items']} / "
      f"{sizes['test']['cloze_items']} four-way cloze items. Intervals are 95% paired bootstraps over sequences "
      "(cl_jax.lm.monitor.paired_interval) of one run against its own base.",
      "",
      f"Monitor (record-only here, so every arm runs all {args.adapt_steps} steps; cl_jax.lm.monitor): a general "
      f"metric is regressed when the lower end of its 95% paired interval on the relative regression exceeds {thr:g}% "
      f"(such a checkpoint is never kept) and the run stops when it exceeds "
      f"{100 * max(getattr(args, 'stop_threshold', 0.05), r0['threshold']):g}%.",
      "",
      "## Final model, both splits",
      "",
      "*gain* = domain perplexity improvement over the base; *regr.* = general perplexity regression relative to the "
      "base (positive = worse), mean ± std over seeds; *signs agree* = runs whose validation and test regression have "
      "the same sign; *acc* / *cloze* = next-token / cloze accuracy regression on test.",
      "",
      "| variant | n | test gain (%) | val. gain (%) | test regr. (%) | val. regr. (%) | signs agree "
      "| test acc regr. (%) | test cloze regr. (%) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, rs in groups.items():
    rows = [r["row"] for r in rs]
    agree = sum(_sign(_test_iv(r)["estimate"]) == _sign(_val_iv(r)["estimate"]) for r in rs)
    lines.append(
        f"| {name} | {len(rows)} | {mean_std([r['final_domain_ppl_gain_pct'] for r in rows])} "
        f"| {mean_std([_val(x, 'domain/perplexity', gain=True) for x in rs])} "
        f"| {mean_std([r['final_general_ppl_regression_pct'] for r in rows])} "
        f"| {mean_std([_val(x, PPL) for x in rs])} | {agree}/{len(rs)} "
        f"| {mean_std([_final_regr(x, 'general/accuracy') for x in rs])} "
        f"| {mean_std([_final_regr(x, 'general/cloze_accuracy') for x in rs])} |")
  lines += ["", f"Per run: final general perplexity regression (%) with its 95% interval, validation / test, "
                f"and the regression size each split detects beyond {thr:g}% with 80% power.", "",
            "| variant | seed | validation | test | val. detectable (%) | test detectable (%) |",
            "|---|---|---|---|---|---|"]
  for name, rs in groups.items():
    for r in rs:
      lines.append(f"| {name} | {r['seed']} | {_ci(_val_iv(r))} | {_ci(_test_iv(r))} | "
                   f"{100 * _val_iv(r)['detectable']:.2f} | {100 * _test_iv(r)['detectable']:.2f} |")
  stop = getattr(args, "stop_threshold", 0.05)
  lines += ["", "## What the monitor keeps", "",
            f"Re-derived from each run's recorded validation intervals with the monitor's rule (record-only runs "
            f"train on; this is what a run with the default hard stop keeps): *regressed* = the first step whose "
            f"interval lies beyond {thr:g}% (never kept), *stop* = the first beyond {100 * max(stop, r0['threshold']):g}% "
            "(the hard stop), *kept* = the best evaluation by validation domain perplexity among those not regressed "
            "before any stop (step 0 = the base). Test numbers exist for the base and the final step.", "",
            "| variant | seed | regressed (step: metric) | stop | kept step | kept val. gain (%) | kept val. regr. (%) "
            "| kept test gain (%) | kept test regr. (%) |",
            "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "-" if x is None else f"{x:+.2f}"
  for name, rs in groups.items():
    for r in rs:
      d = replay(r, stop)
      nums = _kept_numbers(r, d["kept"])
      when = lambda e: "-" if e is None else f"{e[0]}: " + ",".join(m.split("/")[1] for m in e[1])
      lines.append(f"| {name} | {r['seed']} | {when(d['first_regressed'])} | {when(d['stop'])} | {d['kept']} | "
                   + " | ".join(fmt(x) for x in nums) + " |")
  lines += ["", f"![trade-off]({stem}_tradeoff.png)", "", f"![curves]({stem}_curves.png)", ""]
  lines += ["## Base model (test split)", "", "| seed | general ppl | general acc | cloze acc | domain ppl | domain acc |",
            "|---|---|---|---|---|---|"]
  seen = set()
  for r in records:
    if r["seed"] in seen:
      continue
    seen.add(r["seed"])
    m = r["test"]["base"]
    lines.append(f"| {r['seed']} | {m['general/perplexity']:.3f} | {100 * m['general/accuracy']:.2f} | "
                 f"{100 * m['general/cloze_accuracy']:.1f} | {m['domain/perplexity']:.3f} | "
                 f"{100 * m['domain/accuracy']:.2f} |")
  lines += ["", "## Realised mixtures", "",
            "Fraction of domain (code) examples per evaluation interval, seed "
            f"{r0['seed']} (configured weight at the interval's end in brackets):", ""]
  for r in records:
    if r["seed"] != r0["seed"]:
      continue
    parts = [f"{e['realised']['domain']:.2f} ({e['configured_at_end']['domain']:.2f})" for e in r["realised_mixture"]]
    lines.append(f"- {r['variant']}: " + ", ".join(parts))
  lines += ["", "## Claims (computed by the script from the numbers above)", "", *split_claims(groups, thr, stop),
            *claims(groups), ""]
  return "\n".join(lines)


def split_claims(groups, thr: float, stop: float = 0.05) -> list[str]:
  """Sentences on the evaluation splits and the arms, computed from the runs."""
  out = []
  runs = [r for rs in groups.values() for r in rs]
  arm_val = {n: np.mean([_val_iv(r)["estimate"] for r in rs]) for n, rs in groups.items()}
  arm_test = {n: np.mean([_test_iv(r)["estimate"] for r in rs]) for n, rs in groups.items()}
  arms_agree = [n for n in groups if _sign(arm_val[n]) == _sign(arm_test[n])]
  runs_agree = [r for r in runs if _sign(_val_iv(r)["estimate"]) == _sign(_test_iv(r)["estimate"])]
  differ = [n for n in groups if n not in arms_agree]
  sent = (f"- *Validation and test agree in sign* on the final general perplexity change in {len(arms_agree)} of "
          f"{len(groups)} arms (seed means) and in {len(runs_agree)} of {len(runs)} runs.")
  if differ:
    parts = []
    for n in differ:
      zero = all(_val_iv(r)["lo"] <= 0 <= _val_iv(r)["hi"] or _test_iv(r)["lo"] <= 0 <= _test_iv(r)["hi"]
                 for r in groups[n])
      parts.append(f"{n} (validation {100 * arm_val[n]:+.2f}%, test {100 * arm_test[n]:+.2f}%"
                   + ("; in every run one split's interval contains 0)" if zero else ")"))
    sent += " They differ for " + ", ".join(parts) + "."
  out.append(sent)
  excl = [r for r in runs if not (_val_iv(r)["lo"] <= 0 <= _val_iv(r)["hi"])
          and not (_test_iv(r)["lo"] <= 0 <= _test_iv(r)["hi"])]
  excl_agree = sum(_sign(_val_iv(r)["estimate"]) == _sign(_test_iv(r)["estimate"]) for r in excl)
  out.append(f"- Of the {len(excl)} runs whose validation and test intervals both exclude 0, {excl_agree} agree in "
             "sign: where a split can tell the sign, the other tells the same one."
             if excl_agree == len(excl) else
             f"- Of the {len(excl)} runs whose validation and test intervals both exclude 0, only {excl_agree} agree in "
             "sign: the two splits measure different general text (the split is by source file), not just noise.")
  half = [100 * (iv["hi"] - iv["lo"]) / 2 for r in runs for iv in (_val_iv(r), _test_iv(r))]
  det = [100 * iv["detectable"] for r in runs for iv in (_val_iv(r), _test_iv(r))]
  out.append(f"- *Resolution*: the 95% intervals on general perplexity change have a median half-width of "
             f"{np.median(half):.2f} points (range {min(half):.2f}-{max(half):.2f}); a true regression of "
             f"{np.median(det):.2f}% (median over runs and splits) is called beyond the {thr:g}% threshold with 80% "
             "power.")
  gain = {n: np.mean([r["row"]["final_domain_ppl_gain_pct"] for r in rs]) for n, rs in groups.items()}
  inside = [n for n in groups if 100 * arm_test[n] <= thr and 100 * arm_val[n] <= thr]
  if inside:
    best = max(inside, key=gain.get)
    out.append(f"- *Best arm inside the {thr:g}% threshold on both splits* (by test domain gain): {best}, "
               f"{gain[best]:+.2f}% domain perplexity for {100 * arm_test[best]:+.2f}% (test) / "
               f"{100 * arm_val[best]:+.2f}% (validation) general; the largest gain overall is "
               f"{max(gain, key=gain.get)} ({max(gain.values()):+.2f}%, general {100 * arm_test[max(gain, key=gain.get)]:+.2f}%"
               " test).")
  least = min(groups, key=lambda n: arm_test[n])
  out.append(f"- *Least general regression* (test): {least} ({100 * arm_test[least]:+.2f}%; validation "
             f"{100 * arm_val[least]:+.2f}%).")
  decided = {id(r): replay(r, stop) for r in runs}
  kept_adapted = [r for r in runs if decided[id(r)]["kept"] > 0]
  ok = [r for r in runs if 100 * _test_iv(r)["estimate"] <= thr]
  ok_adapted = [r for r in ok if decided[id(r)]["kept"] > 0]
  regressed = [r for r in runs if decided[id(r)]["first_regressed"]]
  stopped = [r for r in runs if decided[id(r)]["stop"]]
  out.append(f"- *The monitor* (rule replayed on the validation intervals): some evaluation regressed beyond {thr:g}% "
             f"in {len(regressed)} of {len(runs)} runs, the {100 * max(stop, thr / 100):g}% stop fired in "
             f"{len(stopped)} ({', '.join(sorted({r['variant'] for r in stopped})) or 'none'}), and an adapted "
             f"checkpoint (not the base) is kept in {len(kept_adapted)}; of the {len(ok)} runs whose final test "
             f"regression is within {thr:g}%, an adapted model is kept in {len(ok_adapted)}.")
  return out


def _val(record, metric, gain=False):
  """Validation change at the last evaluation (the monitor's split), in %: regression, or gain if `gain`."""
  base, last = record["baseline"][metric], record["history"][-1]["metrics"][metric]
  return 100.0 * (base - last) / base if gain else 100.0 * (last - base) / base


def _final_regr(record, metric):
  base, final = record["test"]["base"][metric], record["test"]["final"][metric]
  return 100.0 * (base - final) / base


def claims(groups) -> list[str]:
  """Verdicts on the seed's claims from paired (same seed, same base) differences of final test numbers."""
  out = []

  seeds = sorted(set.intersection(*[{r["seed"] for r in rs} for rs in groups.values()]))

  def final(name, key):
    """Per-seed values over the seeds every variant has (so differences are paired); key 'val' = validation."""
    by_seed = {r["seed"]: _val(r, PPL) if key == "val" else r["row"][key] for r in groups.get(name, [])}
    return np.array([by_seed[s] for s in seeds], float)

  def paired(x, y):
    d = x - y
    spread = f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else ""
    return d, f"{d.mean():+.2f}{spread} (positive in {int((d > 0).sum())}/{len(d)} seeds)"

  regr, gain = "final_general_ppl_regression_pct", "final_domain_ppl_gain_pct"
  if "a_domain_only" in groups and "b_70_30" in groups:
    a, b = final("a_domain_only", regr), final("b_70_30", regr)
    d, txt = paired(a, b)
    dg, txtg = paired(final("a_domain_only", gain), final("b_70_30", gain))
    dv, txtv = paired(final("a_domain_only", "val"), final("b_70_30", "val"))
    verdict = ("agrees on both splits" if (d > 0).all() and (dv > 0).all() else
               "agrees on test only" if (d > 0).all() else "agrees on validation only" if (dv > 0).all() else
               "DISAGREES")
    out.append(f"- *Mixing 20-40% general data cuts regression compared to domain only*: general perplexity "
               f"regression {a.mean():+.2f}% (domain only) vs {b.mean():+.2f}% (70/30, i.e. 30% general) on test; "
               f"paired reduction {txt} percentage points on test and {txtv} on validation, for a domain-gain cost "
               f"of {txtg} points: {verdict}.")
  if "g_lora" in groups:
    rs = groups["g_lora"]
    unchanged = all(r.get("lora_base_unchanged") for r in rs)
    thr = 100 * rs[0]["threshold"]
    ivs = [_test_iv(r) for r in rs]
    adapted = ("stays inside the threshold too (every test interval's upper end within it)"
               if all(100 * iv["hi"] <= thr for iv in ivs) else
               "regresses beyond the threshold (every test interval's lower end past it)"
               if all(100 * iv["lo"] > thr for iv in ivs) else
               "is not resolved against the threshold in every run")
    out.append(f"- *LoRA keeps the base exactly*: the base weights are bit-identical after adaptation in "
               f"{'every' if unchanged else 'NOT every'} run, so with the adapter switched off the general "
               f"perplexity change is exactly 0. With the adapter on it is {final('g_lora', regr).mean():+.2f}% "
               f"(test; validation {final('g_lora', 'val').mean():+.2f}%) for a domain gain of "
               f"{final('g_lora', gain).mean():+.2f}% (full fine-tuning on the same data: "
               f"{final('a_domain_only', regr).mean():+.2f}% / {final('a_domain_only', gain).mean():+.2f}%): the "
               f"adapted model {adapted}.")
  if "e_two_phase_wsd" in groups and "e_two_phase_cosine" in groups:
    gw, gc = final("e_two_phase_wsd", gain), final("e_two_phase_cosine", gain)
    d, txt = paired(gw, gc)
    dr, txtr = paired(final("e_two_phase_wsd", regr), final("e_two_phase_cosine", regr))
    verdict = ("agrees" if d.mean() > 0 and (d > 0).all() else
               "DISAGREES" if d.mean() < 0 and (d < 0).all() else "is not resolved (mixed sign across seeds)")
    out.append(f"- *WSD suits a domain-heavy late phase better than cosine*: with the same two-phase data, WSD "
               f"gains {gw.mean():+.2f}% domain perplexity vs {gc.mean():+.2f}% with cosine; paired WSD - cosine "
               f"{txt} points of domain gain and {txtr} points of general regression: {verdict}.")
  return out


if __name__ == "__main__":
  main()
