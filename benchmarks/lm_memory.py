"""Peak memory of LM continual pre-training: cl_jax's whole run against transformers' own training step.

  nice -n 5 python benchmarks/lm_memory.py [--steps 4] [--repeats 1] [--out results/lm_memory.md]
  nice -n 5 python benchmarks/lm_memory.py --step-analysis --model DIR --corpus DIR   # XLA's account of the step

The model is SmolLM-135M's shape (Llama: 30 layers, hidden 576, 9 heads, 3 kv heads, intermediate 1536, tied
embeddings, vocabulary 49,152; 134.5M parameters), built with transformers at random initialisation and saved in
the Hugging Face layout under a temporary directory (nothing downloaded, nothing committed); its tokenizer is the
tiny BPE of the test fixtures (token ids then use 128 of the 49,152 rows, which changes no buffer's size). The
adaptation corpus is 39 topics of CPython's own documentation (`pydoc_data`) as .txt files.

Two measurements, alternated `--repeats` times, each in a fresh subprocess whose peak resident set size (RSS) is
the kernel's `ru_maxrss` of that process (`os.wait4`):

  cl_jax        the whole run, as a user launches it: `run.py --config configs/cpt_hf.py:path=<model>,...` with
                batch 4 x 128 tokens, float32, AdamW, `--steps` adaptation steps, an evaluation and checkpoint every
                `--steps / 2` steps, the test-split evaluation of base / best / final and the export to HF layout;
                the evaluation sets are shrunk (32 sequences per corpus, 32 cloze items) so a run fits a shared CPU
                (their buffers are sized by `regression.eval_batch_size`, not by the set size).
  transformers  `LlamaForCausalLM.from_pretrained` of the same directory, `torch.optim.AdamW`, gradient clipping
                at 1.0, `--steps` training steps on random batches of 4 x 128 tokens: the training step alone.

The cl_jax child also prints where its memory goes: a sampling thread reads the process's RSS every 20 ms and
charges it to the phase the run is in (loading, building the train state, the first step with its compilation,
later steps, evaluations, checkpoint saves and restores, the export), and the bytes of live JAX arrays at the end
of each phase, in units of the parameters' own size (params + two AdamW moments = 3 copies), glibc's `mallinfo2`
(bytes malloc has handed out / free bytes it still holds), and a TIMELINE line: every phase entry with its own peak
(which step, evaluation or write the peak is in). `CL_JAX_MALLOC=default` before the command measures the run
without `cl_jax.host_memory`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2)
BATCH, SEQ = 4, 128
EXTRA = [a for a in os.environ.get("LM_MEMORY_OVERRIDES", "").split() if a]  # e.g. --config.checkpoint.keep=1
EVAL_SET = 4  # sequences per corpus and cloze items per evaluation: enough to run every evaluation path


def make_model(path: str) -> None:
  """SmolLM-135M's architecture at random initialisation, in the HF layout, with the fixtures' tokenizer."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE)).save_pretrained(path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(ROOT, "tests", "fixtures", "hf", "llama", name), path)


def make_corpus(path: str) -> None:
  from pydoc_data.topics import topics
  os.makedirs(path, exist_ok=True)
  for i, key in enumerate(sorted(topics)[40:120]):
    with open(os.path.join(path, f"{i:03d}.txt"), "w") as f:
      f.write(topics[key])


def cl_jax_argv(model: str, corpus: str, workdir: str, steps: int, eval_batch: int, code: str) -> list[str]:
  every = max(steps // 2, 1)
  return [f"--config={os.path.join(code, 'configs', 'cpt_hf.py')}:path={model},domain={corpus},steps={steps}",
          f"--workdir={workdir}", f"--config.adapt.batch_size={BATCH}", f"--config.lm.seq_len={SEQ}",
          f"--config.regression.eval_every={every}", f"--config.regression.eval_batch_size={eval_batch}",
          f"--config.text.eval_sequences={EVAL_SET}", f"--config.text.general_eval_sequences={EVAL_SET}",
          f"--config.text.cloze_items={EVAL_SET}", "--config.train.log_every_steps=1", *EXTRA]


# ----------------------------------------------------------------------------- the children

def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _heap() -> dict:
  """glibc's own account (`mallinfo2`, summed over its arenas): bytes in use by malloc's callers (`used`: XLA's
  CPU buffers are malloc'd), bytes malloc holds free in its arenas and has not handed back to the kernel
  (`free`: fragmentation; resident when touched before), bytes in mmapped blocks (`mmapped`, inside `used`)."""
  import ctypes

  class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
  libc = ctypes.CDLL("libc.so.6")
  libc.mallinfo2.restype = Info
  m = libc.mallinfo2()
  return {"used": m.uordblks + m.hblkhd, "free": m.fordblks, "mmapped": m.hblkhd}


class PhaseProbe:
  """Charges sampled RSS to the current phase; live JAX array bytes at each phase's end."""

  def __init__(self, every: float = 0.02):
    self.phase, self.peak, self.live, self.order, self.heap = "start-up", {}, {}, [], {}
    self.timeline, self.t0 = [["start-up", 0.0, 0]], time.time()  # every entry of a phase: [name, start s, peak]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
    self._thread.start()

  def _sample(self, every):
    while not self._stop.is_set():
      rss = _rss_bytes()
      self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)
      self.timeline[-1][2] = max(self.timeline[-1][2], rss)
      time.sleep(every)

  def enter(self, name):
    import jax
    previous, self.phase = self.phase, name
    self.timeline.append([name, round(time.time() - self.t0, 2), _rss_bytes()])
    if name not in self.order:
      self.order.append(name)
    self.peak[name] = max(self.peak.get(name, 0), _rss_bytes())
    return previous, jax

  def leave(self, previous, jax, name):
    self.peak[name] = max(self.peak.get(name, 0), _rss_bytes())
    self.live[name] = max(self.live.get(name, 0), sum(a.nbytes for a in jax.live_arrays()))
    heap, old = _heap(), self.heap.get(name)
    if old is None or heap["used"] + heap["free"] >= old["used"] + old["free"]:
      self.heap[name] = heap  # at the phase end where malloc held the most
    self.phase = previous
    self.timeline.append([previous, round(time.time() - self.t0, 2), _rss_bytes()])

  def wrap(self, fn, name):
    def wrapped(*args, **kwargs):
      label = name(*args, **kwargs) if callable(name) else name
      previous, jax = self.enter(label)
      try:
        return fn(*args, **kwargs)
      finally:
        self.leave(previous, jax, label)
    return wrapped

  def stop(self):
    self._stop.set()
    self._thread.join()


def child_cl_jax(argv: list[str]) -> None:
  """The run through the CLI, its phases probed (monkeypatched wrappers: the run's code is unchanged)."""
  try:  # what `run.py` does first (cli.launch), done here before the probe's thread allocates (older code: none)
    from cl_jax import host_memory
    host_memory.configure()
  except ImportError:
    pass
  probe = PhaseProbe()
  from cl_jax import checkpoint, cli
  from cl_jax.eval import evaluator
  from cl_jax.lm import runner
  from cl_jax.models import hf_checkpoint
  from cl_jax.train import state as train_state, step as train_step
  runner.build = probe.wrap(runner.build, "load model + corpora")
  train_state.build_state = probe.wrap(train_state.build_state, "build train state")
  compile_step = train_step.compile_step
  calls = {"n": 0}

  def probed_compile(*args, **kwargs):
    step, multi = compile_step(*args, **kwargs)

    def label(*a, **k):
      calls["n"] += 1
      return "first train step (compile)" if calls["n"] == 1 else "train steps"
    return probe.wrap(step, label), multi
  train_step.compile_step = probed_compile
  make_lm_evaluator = evaluator.make_lm_evaluator
  evaluator.make_lm_evaluator = lambda *a, **k: probe.wrap(make_lm_evaluator(*a, **k), "evaluation")
  checkpoint.Checkpoints.save = probe.wrap(checkpoint.Checkpoints.save, "checkpoint save (staging)")
  checkpoint.Checkpoints.wait = probe.wrap(checkpoint.Checkpoints.wait, "checkpoint wait (writing)")
  checkpoint.Checkpoints.restore = probe.wrap(checkpoint.Checkpoints.restore, "checkpoint restore")
  hf_checkpoint.export = probe.wrap(hf_checkpoint.export, "export to HF layout")
  code = cli.launch(argv)
  probe.stop()
  params = 4 * 134_515_008
  print("PROBE " + json.dumps({"code": code, "order": probe.order, "peak": probe.peak, "live": probe.live,
                               "heap": probe.heap, "param_bytes": params}), flush=True)
  print("TIMELINE " + json.dumps([[n, t, round(b / 2 ** 20)] for n, t, b in probe.timeline]), flush=True)


def step_analysis(model: str, corpus: str) -> dict:
  """XLA's own account of the run's train step (`compiled.memory_analysis()`), in MiB and in params' bytes: the
  state passed in, the state returned (aliased to the input when donation works), the step's temporaries. The same
  parts as the run (`adapt_phase`, the strategy's loss, the optimizer, `make_train_step`), lowered, not run."""
  import jax
  from cl_jax import compilation_cache
  from cl_jax.lm import runner
  from cl_jax.losses import next_token_loss
  from cl_jax.train.step import make_train_step, with_finite_flag
  from configs.cpt_hf import get_config
  compilation_cache.enable()
  c = get_config(f"path={model},domain={corpus},steps=2")
  c.adapt.batch_size, c.lm.seq_len = BATCH, SEQ
  c.text.eval_sequences = c.text.general_eval_sequences = c.text.cloze_items = EVAL_SET
  built = runner.build(c)
  phase = runner.adapt_phase(c, built.data, built.model, built.params, built.mesh, model_cfg=built.cfg, own_base=True)
  batch = phase.plan.put_batch(next(phase.plan.batches(1, None)), False)
  optimizer = runner._optimizer(c, c.optim, phase.schedule)
  step = with_finite_flag(make_train_step(phase.strategy.loss(next_token_loss(phase.learner)), optimizer,
                                          phase.schedule, log_norms=True, strategy=phase.strategy))
  with jax.set_mesh(built.mesh):
    m = jax.jit(step, donate_argnums=0).lower(phase.plan.state, batch).compile().memory_analysis()
  p = 4 * sum(x.size for x in jax.tree.leaves(phase.plan.state.params))
  return {k: {"MiB": round(getattr(m, k) / 2 ** 20), "params": round(getattr(m, k) / p, 2)}
          for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")}


def child_transformers(model: str, steps: int) -> None:
  import torch
  import transformers as tf
  torch.manual_seed(0)
  m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
  m.train()
  opt = torch.optim.AdamW(m.parameters(), lr=3e-5, betas=(0.9, 0.95), weight_decay=0.0)
  g = torch.Generator().manual_seed(0)
  for _ in range(steps):
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    m(input_ids=x, labels=x).loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the parent

def peak_rss(argv: list[str], env=None, cwd: str = ROOT) -> tuple[float, str]:
  """(peak RSS in MB of the child process, its stdout)."""
  p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd, text=True)
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  if status != 0:
    raise RuntimeError(f"{argv[:4]} failed (status {status}): {out[-2000:]}")
  return usage.ru_maxrss / 1024, out


def main(args=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--out", default="")
  ap.add_argument("--child", choices=("cl_jax", "transformers"), default=None)
  ap.add_argument("--model", default="")
  ap.add_argument("--corpus", default="")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--eval-batch", type=int, default=4, help="regression.eval_batch_size of the cl_jax run")
  ap.add_argument("--code", default=ROOT, help="the cl_jax checkout the cl_jax run imports (e.g. an older commit's "
                  "worktree: the before of a before/after)")
  ap.add_argument("--only", choices=("cl_jax", "transformers"), default=None)
  ap.add_argument("--step-analysis", action="store_true", help="print XLA's memory analysis of the train step of "
                  "the installed cl_jax (PYTHONPATH=<checkout> for another) "
                  "(needs --model and --corpus) and exit")
  a = ap.parse_args(args)
  if a.step_analysis:
    print("STEP " + json.dumps(step_analysis(a.model, a.corpus)))
    return None
  if a.child == "cl_jax":
    return child_cl_jax(cl_jax_argv(a.model, a.corpus, a.workdir, a.steps, a.eval_batch, a.code))
  if a.child == "transformers":
    return child_transformers(a.model, a.steps)
  tmp = tempfile.mkdtemp(prefix="lm_memory_")
  try:
    model, corpus = a.model or os.path.join(tmp, "model"), a.corpus or os.path.join(tmp, "corpus")
    if not a.model:
      make_model(model)
    if not a.corpus:
      make_corpus(corpus)
    code = os.path.abspath(a.code)
    env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    ours, theirs, probes = [], [], []
    for r in range(a.repeats):
      if a.only != "transformers":
        workdir = os.path.join(tmp, f"run{r}")
        mb, out = peak_rss([sys.executable, os.path.abspath(__file__), "--child", "cl_jax", "--model", model,
                            "--corpus", corpus, "--workdir", workdir, "--steps", str(a.steps), "--eval-batch",
                            str(a.eval_batch), "--code", code], env, cwd=code)
        ours.append(mb)
        probes.append(json.loads(out.split("PROBE ", 1)[1].splitlines()[0]))
        if "TIMELINE " in out:  # each phase entry with its own peak, in order (which step or save the peak is in)
          print("TIMELINE " + out.split("TIMELINE ", 1)[1].splitlines()[0], flush=True)
        ckpt = {}
        for kind in ("tasks", "rolling", "best"):
          d = os.path.join(workdir, "checkpoints", kind)
          if os.path.isdir(d):
            ckpt[kind] = {s: _du(os.path.join(d, s)) for s in sorted(os.listdir(d)) if s.isdigit()}
        probes[-1]["checkpoints"] = ckpt
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"repeat {r}: cl_jax ({code}) {ours[-1]:.0f} MB", flush=True)
      if a.only != "cl_jax":
        mb, _ = peak_rss([sys.executable, os.path.abspath(__file__), "--child", "transformers", "--model", model,
                          "--steps", str(a.steps)], env)
        theirs.append(mb)
        print(f"repeat {r}: transformers {theirs[-1]:.0f} MB", flush=True)
    text = report(a, ours, theirs, probes[-1] if probes else None)
    print("RESULT " + json.dumps({"cl_jax": ours, "transformers": theirs, "probe": probes[-1] if probes else None}))
    print(text)
    if a.out:
      with open(a.out, "w") as f:
        f.write(text)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def report(a, ours, theirs, probe) -> str:
  mb = lambda b: b / 2 ** 20
  o = statistics.median(ours) if ours else float("nan")
  t = statistics.median(theirs) if theirs else float("nan")
  lines = [f"Peak RSS (MB), median of {max(len(ours), len(theirs))}: cl_jax whole run {o:.0f} (runs: "
           f"{', '.join(f'{x:.0f}' for x in ours)}), transformers training step {t:.0f} (runs: "
           f"{', '.join(f'{x:.0f}' for x in theirs)}); ratio {o / t:.2f}", ""]
  if probe is None:
    return "\n".join(lines) + "\n"
  lines += ["| phase (in order of first entry) | peak RSS in phase (MB) | live JAX arrays at its end (MB) | "
            "/ param bytes | malloc: in use / held free (MB) |", "|---|---|---|---|---|"]
  p = probe["param_bytes"]
  for name in probe["order"]:
    live = probe["live"].get(name, 0)
    h = probe.get("heap", {}).get(name)
    heap = f"{mb(h['used']):.0f} / {mb(h['free']):.0f}" if h else "-"
    lines.append(f"| {name} | {mb(probe['peak'][name]):.0f} | {mb(live):.0f} | {live / p:.2f} | {heap} |")
  lines += ["", f"params: {mb(p):.0f} MB (float32)", "", "| checkpoint | size (MB) |", "|---|---|"]
  for kind, steps in probe.get("checkpoints", {}).items():
    for s, size in steps.items():
      lines.append(f"| {kind}/{s} | {mb(size):.0f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
