"""Continual instruction tuning: does replaying 5-10% of earlier sets cut forgetting, and do task prompts help?

  python experiments/continual_instruction_tuning.py --quick            # smoke run: 1 seed, few steps (minutes)
  python experiments/continual_instruction_tuning.py                    # the table: 3 seeds x 8 variants
  python experiments/continual_instruction_tuning.py --seeds 0 1 2 3 4 --steps 300

Every run goes through `cl_jax.run` with `configs/cit.py`: a byte-level `tiny` transformer (from scratch) trained
on the sets one after another (default order: name, signature, module_qa, refusal+benign), evaluated after every
task by greedy decoding; the accuracy-matrix entry is the exact-match rate of a task's sets.
Variants: cit.replay_fraction in {0, 0.05, 0.10, 0.20} x sft.task_prompt in {off, system}; and on the frozen base with
prompts off: `lora_per_set` (one LoRA adapter per set, a prompt router picks one at inference) and `olora` (O-LoRA).

The two claims tested (issue 10):
  1. mixing 5-10% of earlier instruction data into each new set cuts forgetting: BWT of replay 5% / 10% vs 0%;
  2. task-specific system prompts help keep behaviours apart: BWT with prompts=system vs off.
Each is judged from the paired per-seed differences (same seed, same data order): mean and a 95% t-interval; the
claim is "confirmed" when the interval excludes 0 in its favour, "refuted" when it excludes 0 against it, and
"inconclusive" otherwise.

Writes results/continual_instruction_tuning.md and .json (`--out` to change where).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {f"replay{int(round(100 * f))}_{p}": dict(fraction=f, prompts=p)
            for p in ("off", "system") for f in (0.0, 0.05, 0.10, 0.20)}
# Adapter methods on the frozen base (prompts off, no replay): one LoRA per set with a prompt router, and O-LoRA.
VARIANTS.update({"lora_per_set": dict(fraction=0.0, prompts="off", strategy="lora_per_task"),
                 "olora": dict(fraction=0.0, prompts="off", strategy="olora")})
# Adapters usually train at a larger learning rate than full fine-tuning: the same two at lr 1e-2 (vs --lr).
VARIANTS.update({f"{n}_lr1e-2": dict(VARIANTS[n], lr=1e-2) for n in ("lora_per_set", "olora")})


def variant_config(name: str, seed: int, steps: int, tasks: str, eval_examples: int):
  from configs.cit import get_config
  v = VARIANTS[name]
  strategy = v.get("strategy") or ("replay" if v["fraction"] > 0 else "naive")
  c = get_config(f"strategy={strategy},replay={v['fraction'] or 0.05},prompts={v['prompts']},steps={steps}")
  c.cit.tasks = tasks
  c.cit.eval_examples = eval_examples
  c.seed = seed
  return c


def interval(values) -> tuple[float, float, float]:
  """Mean and the 95% Student-t interval of the mean (half-width 0 for one value)."""
  x = np.asarray(values, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, m, m
  from scipy import stats
  h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
  return m, m - h, m + h


def verdict(diffs, higher_is_better: bool = True) -> str:
  m, lo, hi = interval(diffs)
  if len(diffs) < 2:
    return "inconclusive (one seed)"
  if (lo > 0) if higher_is_better else (hi < 0):
    return "confirmed"
  if (hi < 0) if higher_is_better else (lo > 0):
    return "refuted"
  return "inconclusive"


def fmt(values, signed: bool = False) -> str:
  if not len(values):
    return "—"
  m, lo, hi = interval(values)
  f = "{:+.3f}" if signed else "{:.3f}"
  return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]" if len(values) > 1 else f.format(m)


def main(argv=None):
  import cl_jax
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--report_only", action="store_true",
                 help="write the table from the finished runs under --workdir (same other flags), training nothing")
  p.add_argument("--quick", action="store_true", help="1 seed, 30 steps per task, two tasks, 8 eval examples")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--tasks", default="name,signature,module_qa,refusal+benign")
  p.add_argument("--eval_examples", type=int, default=32)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=384)
  p.add_argument("--metric", default="exact_match", choices=("exact_match", "format"),
                 help="the accuracy-matrix entry (cit.metric)")
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (optim.lr)")
  p.add_argument("--d_model", type=int, default=0, help="model width (0: the size's default, 128 for tiny)")
  p.add_argument("--variants", nargs="+", default=list(VARIANTS))
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "cit"))
  p.add_argument("--out", default=os.path.join(ROOT, "results", "continual_instruction_tuning"))
  a = p.parse_args(argv)
  given = sys.argv[1:] if argv is None else argv
  # The command that trains these runs (--report_only only re-reads them).
  a.command = " ".join(["python experiments/continual_instruction_tuning.py",
                        *[g for g in given if g != "--report_only"]])
  if a.quick:
    a.seeds, a.steps, a.tasks, a.eval_examples = a.seeds[:1], 30, "name,refusal+benign", 8
    a.batch_size, a.seq_len, a.d_model = 8, 256, 64
  rows = {}
  t0 = time.time()
  for seed in a.seeds:  # seed-major: a stopped sweep still has every variant for its first seeds
    for name in a.variants:
      workdir = os.path.join(a.workdir, f"{name}_s{seed}")
      if a.report_only:  # the table from the finished runs in --workdir, training nothing
        if not os.path.exists(os.path.join(workdir, "results.json")):
          continue
        r = cl_jax.Results.load(workdir)
      else:
        c = variant_config(name, seed, a.steps, a.tasks, a.eval_examples)
        c.cit.batch_size, c.sft.seq_len, c.cit.metric = a.batch_size, a.seq_len, a.metric
        if a.d_model:
          c.lm.d_model = a.d_model
        c.optim.lr = VARIANTS[name].get("lr", a.lr)
        r = cl_jax.run(c, workdir, progress=False)
      e = r.extra
      rows[(name, seed)] = {"variant": name, "seed": seed, "acc": r.acc, "bwt": r.bwt, "forgetting": r.forgetting,
                            "matrix": r.accuracy_matrix.tolist(), "refusal_rate": e.get("refusal_rate"),
                            "over_refusal_rate": e.get("over_refusal_rate"), "format": e["format_compliance"],
                            "replay_share": e.get("replay_share"), "seconds": e["timing"]["total_seconds"],
                            "routing_accuracy": e.get("routing_accuracy")}
      print(f"{name} seed {seed}: ACC {r.acc:.3f} BWT {r.bwt:+.3f} ({time.time() - t0:.0f}s)", flush=True)
      write(a, rows, quiet=True)  # the table so far, after every run
  write(a, rows)


def write(a, rows: dict, quiet: bool = False) -> None:
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  seeds = [s for s in a.seeds if any((n, s) in rows for n in a.variants)]
  by = lambda name, key: [rows[(name, s)][key] for s in seeds if (name, s) in rows]
  lines = ["# Continual instruction tuning: replay fraction and task prompts", "",
           f"`{a.command}` — tasks "
           f"{a.tasks.replace(',', ' → ')}, {a.steps} steps per task (batch {a.batch_size} packed rows of "
           f"{a.seq_len} bytes, lr {a.lr:g} unless the variant names another), seeds {seeds}, byte-level tiny "
           "transformer from scratch"
           f"{f' (d_model {a.d_model})' if a.d_model else ''}; matrix metric: {a.metric} of greedy answers on "
           f"{a.eval_examples} test examples per set. "
           "Mean and 95% t-interval over seeds.", "",
           "| variant | seeds | ACC | BWT | forgetting | refusal (refusal set) | over-refusal (benign) | "
           "final format compliance per set | realised replay | routing accuracy |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name in a.variants:
    if not by(name, "acc"):
      continue
    share = [x["rows"] for x in by(name, "replay_share") if x]
    formats = by(name, "format")
    per_set = " / ".join(f"{k} {np.mean([f[k] for f in formats]):.2f}" for k in formats[0])
    # routing: per run, the share of all evaluated prompts sent to their own set's adapter (mean over sets)
    routed = [np.mean([v for v in x.values() if v is not None]) for x in by(name, "routing_accuracy") if x]
    lines.append(f"| {name} | {len(by(name, 'acc'))} | {fmt(by(name, 'acc'))} | {fmt(by(name, 'bwt'), True)} | "
                 f"{fmt(by(name, 'forgetting'))} | {fmt([v for v in by(name, 'refusal_rate') if v is not None])} | "
                 f"{fmt([v for v in by(name, 'over_refusal_rate') if v is not None])} | {per_set} | "
                 f"{np.mean(share) if share else 0:.4f} | {fmt(routed) if routed else '—'} |")
  lines += ["", "## The claims, from paired per-seed differences in BWT (higher BWT = less forgetting)", ""]
  claims = {}

  def claim(label: str, pairs: list) -> None:
    """Paired per-seed differences (variant - baseline) of BWT and ACC. Pooled over several `pairs`: one value per
    seed, the mean of that seed's differences (runs of one seed share init and data order, so they are not
    independent samples), over the seeds that have every pair."""
    pairs = [(v, b) for v, b in pairs if v in a.variants and b in a.variants]
    have = [s for s in seeds if pairs and all((v, s) in rows and (b, s) in rows for v, b in pairs)]
    diff = lambda key: [float(np.mean([rows[(v, s)][key] - rows[(b, s)][key] for v, b in pairs])) for s in have]
    if diff("bwt"):
      claims[label] = (diff("bwt"), verdict(diff("bwt")), diff("acc"))

  for f in ("5", "10", "20"):
    for pr in ("off", "system"):
      claim(f"replay {f}% vs 0% (prompts {pr})", [(f"replay{f}_{pr}", f"replay0_{pr}")])
    claim(f"replay {f}% vs 0% (pooled over prompts off / system)",
          [(f"replay{f}_{pr}", f"replay0_{pr}") for pr in ("off", "system")])
  for f in ("0", "5", "10", "20"):
    claim(f"system prompts vs none (replay {f}%)", [(f"replay{f}_system", f"replay{f}_off")])
  claim("system prompts vs none (pooled over replay 0 / 5 / 10 / 20%)",
        [(f"replay{f}_system", f"replay{f}_off") for f in ("0", "5", "10", "20")])
  claim("LoRA per set (routed) vs full fine-tuning (replay 0%, prompts off)", [("lora_per_set", "replay0_off")])
  claim("O-LoRA vs full fine-tuning (replay 0%, prompts off)", [("olora", "replay0_off")])
  claim("LoRA per set at lr 1e-2 vs full fine-tuning", [("lora_per_set_lr1e-2", "replay0_off")])
  claim("O-LoRA at lr 1e-2 vs full fine-tuning", [("olora_lr1e-2", "replay0_off")])
  # ΔACC beside ΔBWT: less forgetting bought with less learning shows as a flat or negative ΔACC.
  lines += ["| comparison | seeds | ΔBWT | verdict (less forgetting?) | ΔACC |", "|---|---|---|---|---|"]
  lines += [f"| {k} | {len(d)} | {fmt(d, True)} | {v} | {fmt(acc, True)} |" for k, (d, v, acc) in claims.items()]
  lines += ["", "## Reading the numbers", "",
            "- Entries are rates in [0, 1] over the evaluated test examples of each set; ACC / BWT / forgetting come "
            "from the accuracy matrix (cl_jax.eval.metrics), whose entries are the chosen metric per task.",
            "- Refusal rate: share of greedy answers on the refusal set that start with a refusal phrase "
            "(`instructions.is_refusal`); over-refusal: the same share on the matched benign set.",
            "- Verdicts use paired per-seed differences of BWT with a 95% t-interval; with fewer than 3 seeds, or "
            "an interval that covers 0, the claim is left inconclusive rather than decided.",
            "- Scale: a tiny byte-level model trained from scratch for a few hundred steps on 2 shared CPU cores. "
            "At this scale exact match stays near 0 on the code sets, so the format-compliance metric "
            "(`cit.metric=format`) is what carries the signal; conclusions about large pre-trained models need "
            "runs of configs/cit.py with `lm.init_from` (an imported checkpoint) on an accelerator.", ""]
  from experiments.protocol import portable, write_markdown
  write_markdown(a.out + ".md", lines)  # + the hand-written <out>.notes.md, when there is one
  with open(a.out + ".json", "w") as f:
    json.dump(portable({"args": vars(a), "runs": list(rows.values()),
               "claims": {k: {"bwt_diffs": d, "verdict": v, "acc_diffs": acc}
                          for k, (d, v, acc) in claims.items()}}),
              f, indent=1)
  if not quiet:
    print("\n".join(lines))


if __name__ == "__main__":
  main()
