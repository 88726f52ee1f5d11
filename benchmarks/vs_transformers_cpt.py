"""End-to-end continual pre-training speed: cl_jax's whole run against a transformers (PyTorch, CPU) training script.

  nice -n 5 python benchmarks/vs_transformers_cpt.py --repeats 3 --out results/vs_transformers_cpt.md
  nice -n 5 python benchmarks/vs_transformers_cpt.py --steps 4 --every 2 --repeats 1 --out ''   # a quick check

The model is SmolLM-135M's shape (Llama: 30 layers, hidden 576, 9 heads, 3 kv heads, intermediate 1536, tied
embeddings, vocabulary 49,152), random init, saved by transformers in the Hugging Face layout with the test fixtures'
tokenizer (`benchmarks/lm_memory.py`'s `make_model`; `--layers` / `--hidden` shrink it). Two corpora are tokenized
once, before any timing, into prepared caches (`cl_jax.data.prepare.prepare`): the general text (`general`, CPython's
documentation) and a domain corpus (39 pydoc topics as .txt files). Both sides then do the same work on the same
token rows:

  load        the checkpoint directory (and, for cl_jax, its tokenizer and the two caches: the run's own input path)
  evaluate    the base on the validation split: general and domain perplexity / next-token accuracy over
              `--eval-seqs` sequences each and general cloze accuracy over `--eval-seqs` items (4 choices)
  train       `--steps` steps of AdamW (float32, b1 0.9, b2 0.95, eps 1e-8, no weight decay, gradients clipped at
              global norm 1.0, the run's WSD learning-rate schedule: peak 3e-5) on batches of 4 x 128 tokens: the rows
              cl_jax's mixture sampler draws (70% domain / 30% general), step by step;
              every `--every` steps: the same validation evaluation and a checkpoint of model + optimizer state
  test        the base and the final model on the test split (same sizes)

cl_jax: `run.py --config configs/cpt_hf.py:path=<model>,domain=cache:<d>,general=cache:<g>,steps=N` (the CLI's
`cl_jax.cli.launch` in a child process, as a user launches it) with `regression.eval_every=K` (its evaluations and
rolling checkpoints share that cadence), `regression.hard_stop=False` and `checkpoint.keep_best=False` (no early stop
and no separate best checkpoint: transformers' script keeps the final model) and `lm.export_hf=False` (transformers'
checkpoints are already in that layout). What only cl_jax does and stays on: its regression monitor's paired
intervals after every evaluation (bootstrap, 2,000 resamples), metrics.jsonl / summary.md / monitor.png, and the
task-boundary checkpoint at step 0 (the base its test split restores).

transformers: what a user writes: `AutoModelForCausalLM.from_pretrained`, `torch.optim.AdamW`, `clip_grad_norm_`, a
`LambdaLR`-free loop that sets each step's learning rate, `model(input_ids=x[:, :-1])` with cross-entropy against
`x[:, 1:]` (the same 127 positions per row cl_jax trains on), `torch.inference_mode()` evaluations in batches of the
size cl_jax uses, and every K steps `save_pretrained` + `torch.save(optimizer.state_dict())` (what `Trainer`'s
`save_steps` writes). `torch.set_num_threads(--threads)`, by default the machine's core count.

bare step: cl_jax's own jitted train step of the run (the step `cl_jax.lm.runner.adapt_phase` builds, with the
strategy hooks, clipping, the finite flag and the throughput wrapper), on the same model and one batch of the run,
called back to back with `block_until_ready` after a compiling call: median of `--bare-repeats` calls.

Every run is a fresh child process; the sides alternate (bare, cl_jax, transformers, bare, ...) `--repeats` times.
Per run: wall from launch to exit; time to the first step's end; steady-state training tokens/s (steps 2..N over the
wall time between the first step's end and the last step's end, less the evaluations and checkpoint writes inside
that window); end-to-end tokens/s (all N steps' tokens over the whole wall). Tokens are rows x 128.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 4, 128
CLOZE_CONTEXT = 48


# ----------------------------------------------------------------------------- the work, as the run's config

def run_argv(a, model: str, caches: dict, workdir: str) -> list[str]:
  """cl_jax's command line (after `run.py`): the whole run, with its evaluation / checkpoint cadence at `--every`."""
  return [f"--config={os.path.join(ROOT, 'configs', 'cpt_hf.py')}:path={model},domain=cache:{caches['domain']},"
          f"general=cache:{caches['general']},steps={a.steps}",
          f"--workdir={workdir}", "--no_progress", f"--config.adapt.batch_size={BATCH}", f"--config.lm.seq_len={SEQ}",
          f"--config.regression.eval_every={a.every}", f"--config.text.eval_sequences={a.eval_seqs}",
          f"--config.text.general_eval_sequences={a.eval_seqs}", f"--config.text.cloze_items={a.eval_seqs}",
          "--config.regression.hard_stop=False", "--config.checkpoint.keep_best=False",
          "--config.lm.export_hf=False", *a.extra]


def make_caches(model: str, corpus: str, out: str) -> dict:
  """The general and domain corpora tokenized by the model's tokenizer into prepared caches, with the run's split."""
  from cl_jax.data import prepare
  tok = prepare.load_any_tokenizer("hf:" + model)
  caches = {}
  for role, spec in (("general", "general"), ("domain", "dir:" + corpus)):
    caches[role] = os.path.join(out, f"cache_{role}")
    prepare.prepare([spec], tok, caches[role], seq_len=SEQ, seed=0, validation=0.15, test=0.15,
                    tokenizer_spec="hf:" + model, progress=False)
  return caches


def child_prep(a, model: str, caches: dict, out: str) -> None:
  """The run's own inputs, written for the transformers side: the train rows cl_jax's sampler draws at each step,
  the validation / test sequences and cloze items its evaluator scores, each step's learning rate, its eval batch."""
  import ml_collections
  import numpy as np
  from cl_jax import cli
  from cl_jax.data import mixture as mx
  from cl_jax.lm.data import load_data, source_order
  from cl_jax.lm.runner import EVAL_LOGITS_BYTES, MixtureSource, adaptation_stages
  from cl_jax.models import hf_checkpoint
  from cl_jax.train.schedules import build_schedule
  c, _ = cli.build_config(run_argv(a, model, caches, os.path.join(out, "unused")))
  data = load_data(c)
  sizes = {n: len(data.train[n]) for n in source_order(data)}
  sampler = mx.MixtureSampler(adaptation_stages(c, sizes), sizes, c.adapt.batch_size, seed=c.seed)
  source = MixtureSource(sampler, data.train, 1)
  rows = []
  for _ in range(a.steps):
    b = next(source)
    rows.append(np.concatenate([b["x"], b["y"][:, -1:]], 1))
  optim = ml_collections.ConfigDict(c.optim.to_dict())
  optim.lr = float(c.optim.lr) * float(c.adapt.lr_ratio)
  schedule = build_schedule(optim, int(c.adapt.steps), 1)
  vocab = int(hf_checkpoint.read_config(model)["vocab_size"])
  eval_rows = max(1, min(int(c.regression.eval_batch_size), EVAL_LOGITS_BYTES // (4 * (SEQ - 1) * vocab)))
  arrays = {"train": np.stack(rows).astype(np.int64), "lr": np.array([float(schedule(i)) for i in range(a.steps)]),
            "eval_rows": np.int64(eval_rows), "b1": np.float64(c.optim.b1), "b2": np.float64(c.optim.b2),
            "weight_decay": np.float64(c.optim.weight_decay), "grad_clip": np.float64(c.optim.grad_clip)}
  for split in ("validation", "test"):
    for role, tokens in data.eval[split].items():
      arrays[f"{split}/{role}"] = np.asarray(tokens).astype(np.int64)
    for field in ("context", "choices", "choice_mask", "answer"):
      value = np.asarray(getattr(data.cloze[split], field))
      arrays[f"{split}/cloze/{field}"] = value.astype(np.int64) if value.dtype.kind in "iu" else value
  np.savez(os.path.join(out, "work.npz"), **arrays)


# ----------------------------------------------------------------------------- the children

class Clock:
  """Wall-clock intervals by name (absolute `time.time()`, comparable with the parent's launch time)."""

  def __init__(self):
    self.spans, self.marks = [], {}

  def wrap(self, fn, name):
    def timed(*args, **kwargs):
      t0 = time.time()
      try:
        return fn(*args, **kwargs)
      finally:
        self.spans.append([name, t0, time.time()])
    return timed

  def dump(self, **extra) -> None:
    print("CLOCK " + json.dumps({"spans": self.spans, "marks": self.marks, **extra}), flush=True)


def child_cl_jax(argv: list[str]) -> None:
  """The run through the CLI, with clocks around its evaluations, checkpoint writes and first step (wrappers only:
  the run's code is unchanged; the first step's result is waited for, which the loop's next step would do anyway)."""
  clock = Clock()
  clock.marks["python"] = time.time()
  from cl_jax import checkpoint, cli
  from cl_jax.lm import runner
  from cl_jax.train import step as train_step
  compile_step = train_step.compile_step

  def probed_compile(*args, **kwargs):
    step, multi = compile_step(*args, **kwargs)

    def first_blocking(state, batch):
      out = step(state, batch)
      if "first_step" not in clock.marks:
        import jax
        jax.block_until_ready(out)
        clock.marks["first_step"] = time.time()
      clock.marks["last_dispatch"] = time.time()
      return out
    return first_blocking, multi
  train_step.compile_step = probed_compile
  adapt_phase = runner.adapt_phase

  def probed_phase(*args, **kwargs):
    phase = adapt_phase(*args, **kwargs)
    phase.plan.evaluate = clock.wrap(phase.plan.evaluate, "evaluate")  # the evaluator and the monitor after it
    return phase
  runner.adapt_phase = probed_phase
  for name in ("save", "wait", "restore", "restore_params"):
    setattr(checkpoint.Checkpoints, name, clock.wrap(getattr(checkpoint.Checkpoints, name), f"checkpoint {name}"))
  code = cli.launch(argv)
  clock.dump(code=code)


def child_bare(argv: list[str], repeats: int) -> None:
  """cl_jax's train step of the run, alone: the same model, optimizer and step, one batch of the run, called back to
  back (each call blocked on) after a compiling call."""
  import jax
  from cl_jax import cli
  from cl_jax.lm import runner
  c, _ = cli.build_config(argv)
  built = runner.build(c)
  phase = runner.adapt_phase(c, built.data, built.model, built.params, built.mesh, model_cfg=built.cfg, own_base=True)
  batch = phase.plan.put_batch(next(phase.plan.batches(1, None)), False)
  state, times = phase.plan.state, []
  with jax.set_mesh(built.mesh):
    for i in range(repeats + 1):
      t0 = time.perf_counter()
      state, metrics = phase.plan.train_step(state, batch)
      jax.block_until_ready((state, metrics))
      if i:
        times.append(time.perf_counter() - t0)
  print("BARE " + json.dumps({"step_seconds": times}), flush=True)


def child_transformers(model: str, work: str, every: int, threads: int, ckpt_dir: str) -> None:
  """The same work as a user's PyTorch loop over transformers' model (module docstring)."""
  clock = Clock()
  clock.marks["python"] = time.time()
  import numpy as np
  import torch
  import torch.nn.functional as F
  import transformers as tf
  torch.set_num_threads(threads)
  d = dict(np.load(work))
  m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
  clock.marks["loaded"] = time.time()
  rows = int(d["eval_rows"])

  @torch.inference_mode()
  def evaluate(split: str) -> dict:
    m.eval()
    out = {}
    for role in ("general", "domain"):
      tokens = torch.from_numpy(d[f"{split}/{role}"])
      nll, hit = [], []
      for i in range(0, len(tokens), rows):
        x = tokens[i:i + rows]
        logits = m(input_ids=x[:, :-1]).logits
        nll.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(-1))
        hit.append((logits.argmax(-1) == x[:, 1:]).float().mean(-1))
      out[f"{role}/perplexity"] = float(torch.cat(nll).mean().exp())
      out[f"{role}/accuracy"] = float(torch.cat(hit).mean())
    context, choices = torch.from_numpy(d[f"{split}/cloze/context"]), torch.from_numpy(d[f"{split}/cloze/choices"])
    mask, answer = torch.from_numpy(d[f"{split}/cloze/choice_mask"]), d[f"{split}/cloze/answer"]
    n, k, w = choices.shape
    per = max(rows // k, 1)
    scores = []
    for i in range(0, n, per):
      b = len(choices[i:i + per])
      seq = torch.cat([context[i:i + per, None].expand(-1, k, -1), choices[i:i + per]], -1).reshape(b * k, -1)
      logits = m(input_ids=seq[:, :-1]).logits[:, context.shape[1] - 1:]
      nll = F.cross_entropy(logits.transpose(1, 2), seq[:, context.shape[1]:], reduction="none").reshape(b, k, w)
      scores.append(-(nll * mask[i:i + per]).sum(-1))
    out["general/cloze_accuracy"] = float((torch.cat(scores).argmax(-1).numpy() == answer).mean())
    m.train()
    return out

  def save(step: int) -> None:
    path = os.path.join(ckpt_dir, f"checkpoint-{step}")
    m.save_pretrained(path)
    torch.save(opt.state_dict(), os.path.join(path, "optimizer.pt"))

  evals = {"validation 0": clock.wrap(evaluate, "evaluate")("validation"),
           "test base": clock.wrap(evaluate, "evaluate")("test")}
  m.train()
  lrs, train = d["lr"], torch.from_numpy(d["train"])
  opt = torch.optim.AdamW(m.parameters(), lr=float(lrs[0]), betas=(float(d["b1"]), float(d["b2"])), eps=1e-8,
                          weight_decay=float(d["weight_decay"]))
  losses = []
  for i in range(len(train)):
    for g in opt.param_groups:
      g["lr"] = float(lrs[i])
    x = train[i]
    logits = m(input_ids=x[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), float(d["grad_clip"]))
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))  # the loss a user logs (torch runs eagerly: the step is done here)
    if i == 0:
      clock.marks["first_step"] = time.time()
    clock.marks["last_dispatch"] = time.time()
    if (i + 1) % every == 0:
      evals[f"validation {i + 1}"] = clock.wrap(evaluate, "evaluate")("validation")
      clock.wrap(save, "checkpoint save")(i + 1)
  evals["test final"] = clock.wrap(evaluate, "evaluate")("test")
  clock.dump(code=0, losses=losses, evals=evals)


# ----------------------------------------------------------------------------- the parent

def launch(argv: list[str], env: dict, cwd: str = ROOT) -> dict:
  """Runs a child; returns its parsed report lines with the wall from launch to exit ('wall') and 'launch'."""
  t0 = time.time()
  p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
  wall = time.time() - t0
  if p.returncode != 0:
    raise RuntimeError(f"{' '.join(argv[:4])} ... failed (exit {p.returncode}):\n{p.stdout[-3000:]}")
  out = {"launch": t0, "wall": wall}
  for line in p.stdout.splitlines():
    for tag in ("CLOCK ", "BARE "):
      if line.startswith(tag):
        out[tag.strip().lower()] = json.loads(line[len(tag):])
  return out


def summarise(run: dict, steps: int) -> dict:
  """Per-run figures (module docstring) from the child's clocks."""
  c = run["clock"]
  first, last = c["marks"]["first_step"], c["marks"]["last_dispatch"]
  end_train = min([s[1] for s in c["spans"] if s[1] >= last] or [last])  # the evaluation after the last step
  inside = sum(e - b for _, b, e in c["spans"] if b >= first and e <= end_train)
  tokens = BATCH * SEQ
  spans = {}
  for name, b, e in c["spans"]:
    spans[name] = spans.get(name, 0.0) + e - b
  return {"wall": run["wall"], "first_step": first - run["launch"], "steady": (steps - 1) * tokens / (
      end_train - first - inside), "e2e": steps * tokens / run["wall"], "spans": spans,
      "train_seconds": end_train - first - inside}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=20, help="adaptation steps per run")
  ap.add_argument("--every", type=int, default=10, help="evaluate and checkpoint every this many steps")
  ap.add_argument("--eval-seqs", type=int, default=8, help="validation / test sequences per corpus and cloze items")
  ap.add_argument("--repeats", type=int, default=3, help="alternations of bare step, cl_jax, transformers")
  ap.add_argument("--bare-repeats", type=int, default=5, help="timed calls of the bare step per run")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads of transformers")
  ap.add_argument("--layers", type=int, default=30, help="the Llama's layers (SmolLM-135M: 30)")
  ap.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM-135M: 576; intermediate 8/3 x)")
  ap.add_argument("--only", choices=("bare", "cl_jax", "transformers"), action="append", default=None,
                  help="run only these sides (repeatable)")
  ap.add_argument("--workroot", default="", help="keep the model, caches and workdirs here (default: a temp dir)")
  ap.add_argument("--out", default="results/vs_transformers_cpt.md")
  ap.add_argument("--extra", action="append", default=[], help="an extra cl_jax override, e.g. "
                  "--extra=--config.train.log_every_steps=5 (repeatable)")
  ap.add_argument("--child", choices=("prep", "cl_jax", "bare", "transformers"), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--model", default="", help=argparse.SUPPRESS)
  ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  root = a.workroot
  model, corpus = os.path.join(root, "model"), os.path.join(root, "corpus")
  caches = {r: os.path.join(root, f"cache_{r}") for r in ("general", "domain")}
  if a.child == "prep":
    caches = make_caches(model, corpus, root)
    return child_prep(a, model, caches, root)
  if a.child == "cl_jax":
    return child_cl_jax(run_argv(a, model, caches, a.workdir))
  if a.child == "bare":
    return child_bare(run_argv(a, model, caches, a.workdir), a.bare_repeats)
  if a.child == "transformers":
    return child_transformers(model, os.path.join(root, "work.npz"), a.every, a.threads, a.workdir)

  own = not root
  root = a.workroot = os.path.abspath(root or tempfile.mkdtemp(prefix="vs_transformers_cpt_"))
  model, corpus = os.path.join(root, "model"), os.path.join(root, "corpus")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  passthrough = [f"--steps={a.steps}", f"--every={a.every}", f"--eval-seqs={a.eval_seqs}", f"--workroot={root}",
                 *(f"--extra={e}" for e in a.extra)]
  me = [sys.executable, os.path.abspath(__file__)]
  load = [os.getloadavg()]
  try:
    if not os.path.isdir(model):
      from benchmarks.lm_memory import SHAPE, make_corpus
      shape = dict(SHAPE, num_hidden_layers=a.layers, hidden_size=a.hidden,
                   intermediate_size=a.hidden * 8 // 3, num_attention_heads=max(a.hidden // 64, 1),
                   num_key_value_heads=max(a.hidden // 192, 1))
      make_model(model, shape)
      make_corpus(corpus)
    if not os.path.exists(os.path.join(root, "work.npz")):
      launch(me + ["--child=prep", *passthrough], env)
    sides = a.only or ["bare", "cl_jax", "transformers"]
    runs = {s: [] for s in sides}
    for r in range(a.repeats):
      for side in sides:
        workdir = os.path.join(root, f"{side}_{r}")
        shutil.rmtree(workdir, ignore_errors=True)
        cmd = me + [f"--child={side}", f"--workdir={workdir}", f"--threads={a.threads}",
                    f"--bare-repeats={a.bare_repeats}", *passthrough]
        out = launch(cmd, env)
        if side == "bare":
          out["tokens_per_sec"] = BATCH * SEQ / statistics.median(out["bare"]["step_seconds"])
        else:
          out.update(summarise(out, a.steps))
        runs[side].append(out)
        print(f"repeat {r} {side}: " + json.dumps({k: v for k, v in out.items() if k not in ("clock", "launch")}),
              flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
        load.append(os.getloadavg())
    text = report(a, runs, load, argv if argv is not None else sys.argv[1:])
    print("RESULT " + json.dumps({s: [{k: v for k, v in r.items() if k != "clock"} for r in rs]
                                  for s, rs in runs.items()}))
    from benchmarks.common import emit
    emit([text], a.out)
  finally:
    if own:
      shutil.rmtree(root, ignore_errors=True)


def make_model(path: str, shape: dict) -> None:
  """A Llama of `shape` at random initialisation, saved by transformers, with the fixtures' tokenizer."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).save_pretrained(path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(ROOT, "tests", "fixtures", "hf", "llama", name), path)


def report(a, runs: dict, load: list, argv: list) -> str:
  med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
  col = lambda side, key: [r[key] for r in runs.get(side, [])]  # noqa: E731
  bare, ours, theirs = col("bare", "tokens_per_sec"), runs.get("cl_jax", []), runs.get("transformers", [])
  lines = ["# End-to-end continual pre-training: cl_jax's whole run vs a transformers (PyTorch) script", "",
           f"`nice -n 5 python benchmarks/vs_transformers_cpt.py {' '.join(argv)}`".replace(" `", "`"), "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, shared; load average (1/5/15 min) at the start "
           f"{'/'.join(f'{x:.1f}' for x in load[0])}, after each run: "
           f"{', '.join(f'{x[0]:.1f}' for x in load[1:])}. torch threads: {a.threads}. "
           f"{a.steps} steps of {BATCH} x {SEQ} tokens, evaluation + checkpoint every {a.every}, "
           f"{a.eval_seqs} sequences per corpus and {a.eval_seqs} cloze items per evaluation.", "",
           "| run | side | wall s | first step s | steady train tok/s | end-to-end tok/s | eval s | checkpoint s |",
           "|---|---|---|---|---|---|---|---|"]
  for side in ("cl_jax", "transformers"):
    for i, r in enumerate(runs.get(side, [])):
      ck = sum(v for k, v in r["spans"].items() if k.startswith("checkpoint"))
      lines.append(f"| {i} | {side} | {r['wall']:.0f} | {r['first_step']:.0f} | {r['steady']:.1f} | "
                   f"{r['e2e']:.1f} | {r['spans'].get('evaluate', 0):.0f} | {ck:.0f} |")
  lines += ["", f"Bare cl_jax step tokens/s, per run: {', '.join(f'{x:.1f}' for x in bare)} (median {med(bare):.1f}).",
            ""]
  steady = [r["steady"] for r in ours]
  paired = [r["steady"] / b for r, b in zip(ours, bare)]
  e2e = [o["e2e"] / t["e2e"] for o, t in zip(ours, theirs)]
  e2e_bare = [r["e2e"] / b for r, b in zip(ours, bare)]
  steady_pair = [o["steady"] / t["steady"] for o, t in zip(ours, theirs)]
  lines += ["| ratio | median | per repeat |", "|---|---|---|",
            f"| cl_jax steady training tok/s in the run / bare step (goal >= 0.9) | "
            f"{med(steady) / med(bare):.2f} | {', '.join(f'{x:.2f}' for x in paired)} |",
            f"| cl_jax end-to-end tok/s / bare step | {med([r['e2e'] for r in ours]) / med(bare):.2f} | "
            f"{', '.join(f'{x:.2f}' for x in e2e_bare)} |",
            f"| cl_jax end-to-end / transformers end-to-end (goal >= 1.0) | "
            f"{med(col('cl_jax', 'e2e')) / med(col('transformers', 'e2e')):.2f} | {', '.join(f'{x:.2f}' for x in e2e)} |",
            f"| cl_jax steady / transformers steady | "
            f"{med(steady) / med(col('transformers', 'steady')):.2f} | "
            f"{', '.join(f'{x:.2f}' for x in steady_pair)} |", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
