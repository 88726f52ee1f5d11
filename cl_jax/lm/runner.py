"""Continual pre-training (CPT) of a causal LM on the one task loop: `run(config, workdir)` for `kind='lm'`.

The run is two task-loop runs (`cl_jax.train.loop.run_tasks`) over the same machinery as a classic run: the pure
train step (`make_train_step`), the strategy registry, `cl_jax.checkpoint`, the workdir lock and metrics log
(`cl_jax.workdir`), the schedule builder and the evaluator (`cl_jax.eval.evaluator`):

  1. pretrain  the base: a `TransformerLM` trained `pretrain.steps` steps on general text (cosine with warmup, peak
               `optim.lr`), checkpointed under `<workdir>/pretrain/checkpoints`; or the base of another LM run
               (`pretrain.base_dir`), or the fresh initialisation (`pretrain.steps=0`).
  2. adapt     the strategy chain's plan (`config.strategy`; `lora` wraps the model through `prepare`), two tasks:
                 task 1 'general'  0 steps: its end is the base. `after_task` hands the strategies the general
                                   training sequences (EWC's Fisher and anchor, distillation's teacher, generative
                                   replay's pool), and its boundary evaluation is the monitor's baseline;
                 task 2 'domain'   `adapt.steps` steps on the mixture over the run's sources (`data.stages`, or
                                   the preset `adapt.mixture` over the roles: `adaptation_stages`), peak
                                   LR `adapt.lr_ratio * optim.lr` (continual pre-training re-warms to a fraction of
                                   the pre-training LR: Gupta et al. 2023; Ibrahim et al. 2024), the `optim.schedule`.
               Every `regression.eval_every` steps the evaluator measures general / domain perplexity, next-token
               accuracy and general cloze accuracy on the validation split, per sequence (per item for cloze); the
               regression monitor (`cl_jax.lm.monitor`) is the per-evaluation hook: it pairs each item with the
               base's, and a general metric whose `regression.confidence` interval on the relative regression lies
               wholly beyond `regression.threshold` is a hard stop; the best keepable evaluation (`regression.keep`)
               is kept as the `best` checkpoint. Every decision (estimate, interval, verdict) is in metrics.jsonl.
               `regression.benchmarks` (cl_jax.lm.benchmarks) adds benchmark scores to each evaluation, step 0's
               included: general ones guarded in absolute points with their own thresholds, domain ones recorded.
  3. report    test-split metrics of the base, the kept (best) and the final model, with paired intervals against
               the base: results.json (`Results`, kind 'lm', the record in `extra`), summary.md (with the evaluation
               sets' sizes and the regression size they resolve; with benchmarks, their before / after / kept
               table), monitor.png; metrics.jsonl holds both phases
               (records carry `phase`), with the realised mixture per evaluation interval.

Rerunning on the same workdir resumes either phase from its newest intact checkpoint (the sampler is a pure
function of seed and step, so the data order is the same) and ends with the same numbers.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax import sharding
from cl_jax.data import mixture as mx
from cl_jax.lm.config import DOMAIN, GENERAL
from cl_jax.lm.data import (ROLES, CPTData, eval_sizes, general_sample, load_data, roles_of, run_sources,
                            sampler_batch, source_metric, source_metrics, source_order,
                            with_source_metrics)

TASKS = (GENERAL, DOMAIN)


def model_config(c, vocab_size: int):
  from cl_jax.models.transformer import SIZES, model_config as named
  overrides = {k: int(c.lm[k]) for k in ("d_model", "num_layers", "num_heads") if c.lm[k]}
  if c.lm.get("mlp", ""):  # 'swiglu': a Llama-family model, exportable to the Hugging Face layout
    overrides["mlp"] = c.lm.mlp
  # lm.compute_dtype '' keeps the size's own (bfloat16 for 1b): an explicit value overrides it.
  dtype = c.lm.compute_dtype or SIZES[c.lm.size].get("compute_dtype", "float32")
  return named(c.lm.size, vocab_size=vocab_size, max_len=c.lm.seq_len, compute_dtype=dtype,
               tied_embeddings=c.lm.tied_embeddings, remat=c.lm.get("remat", "none"),
               scan_layers=bool(c.lm.get("scan_layers", False)), attn_chunk=int(c.lm.get("attn_chunk", 0)),
               **overrides)


def no_logit_mask(task, task_index):
  del task, task_index
  return None


class MixtureSource:
  """The task loop's batch source: this process's rows of the mixture's batch at each step (resumable by step).
  `data_by_source`: {source: rows} for each of the sampler's domains (the run's sources)."""

  def __init__(self, sampler, data_by_source: dict, task: int, state: dict | None = None):
    self.sampler, self.data, self.task = sampler, data_by_source, task
    self.step = 0 if state is None else int(state["step"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = sampler_batch(self.sampler, self.step, self.data, self.task)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}


def adaptation_stages(c, sizes: dict | None = None) -> list:
  """The adaptation mixture's stages `[(start_step, {source: weight})]` over the run's sources: `data.stages` as
  given, else the preset `adapt.mixture` over the two roles (the two-phase switch exactly at the WSD decay start),
  each role's weight spread over its sources in proportion to `sizes` (their train sequences; needed only when a
  role has several sources). With one source per role (`text.general` / `text.domain`) the preset's stages are
  the sources' own, unchanged."""
  sources = run_sources(c)
  if c.data.stages:
    return mx.check_stages(c.data.stages, [s.name for s in sources], int(c.adapt.steps))
  steps = c.adapt.steps
  decay_start = steps - int(round(c.optim.decay_fraction * steps))
  stages = mx.from_spec(c.adapt.mixture, steps, domain=DOMAIN, general=GENERAL, stable_fraction=decay_start / steps)
  return mx.expand_roles(stages, {r: [s.name for s in sources if s.role == r] for r in ROLES}, sizes)


def mixture_label(c) -> str:
  """The adaptation mixture as the record and summary name it: the preset, or 'stages' for `data.stages`."""
  return ("stages" if c.data.stages else c.adapt.mixture) + ("+difficulty" if c.adapt.difficulty else "")


def difficulty_order_for(apply, params, data: CPTData, batch_size: int, mesh, source: str = DOMAIN) -> np.ndarray:
  """A domain source's train sequences ordered by their document's base-model perplexity (moderate first)."""
  from cl_jax.eval.evaluator import pad_rows, padded_size
  from cl_jax.losses import token_cross_entropy
  tokens, doc = data.train[source], data.doc_index[source]

  def seq_nll(p, t):
    return jnp.mean(token_cross_entropy(apply(p, t[:, :-1]), t[:, 1:]), -1)

  size = padded_size(batch_size, mesh)
  seq_nll = jax.jit(seq_nll, out_shardings=sharding.replicated(mesh))  # every process reads every value
  nll = []
  for i in range(0, len(tokens), size):
    chunk = tokens[i:i + size]
    nll.append(np.asarray(seq_nll(params, sharding.put_global_batch(pad_rows(chunk, size), mesh)))[:len(chunk)])
  nll = np.concatenate(nll)
  num_docs = int(doc.max()) + 1
  sums = np.bincount(doc, weights=nll, minlength=num_docs)
  n = np.maximum(np.bincount(doc, minlength=num_docs), 1)
  return mx.difficulty_order(doc, np.exp(sums / n))


# ----------------------------------------------------------------------------- the two plans

class Phase(NamedTuple):
  plan: Any               # cl_jax.train.loop.Plan
  learner: Any            # the model as the strategies see it (apply may be LoRA-wrapped)
  strategy: Any
  schedule: Any
  hook: Any = None        # the adaptation's monitor hook
  sampler: Any = None     # the adaptation's mixture sampler
  evaluator: Any = None   # the LM evaluator on this phase's params


def _compiled_step(loss_fn, optimizer, schedule, state_sh, mesh, c, model_cfg, batch_size: int, strategy):
  """The shared jitted step (`compile_step`: the strategy's hooks, `train.grad_accum` micro-batches) traced under
  the mesh, with tokens/s and MFU in its metrics, computed from the model that trains (`model_cfg`: the imported
  checkpoint's architecture, not the `lm.size` preset)."""
  from cl_jax.train.step import compile_step
  from cl_jax.train.throughput import lm_throughput
  step, _ = compile_step(loss_fn, optimizer, schedule, strategy, state_sh, mesh, log_norms=bool(c.train.log_norms),
                         grad_accum=int(c.train.get("grad_accum", 1)), under_mesh=True)
  return lm_throughput(model_cfg, batch_size, c.lm.seq_len, window=c.train.log_every_steps).wrap(step)


def _optimizer(c, optim, schedule, trainable=None, wrap=None):
  """optim's optimizer, on a float32 master copy when the params are bfloat16 (`lm.param_dtype`)."""
  from cl_jax.train.optim import build_optimizer
  from cl_jax.train.precision import optimizer_for
  tx = build_optimizer(optim, schedule, trainable)
  if wrap is not None:  # e.g. old vocabulary rows frozen after vocab.extend (cl_jax.lm.vocab.row_scaling)
    tx = wrap(tx)
  return optimizer_for(tx, c.lm.get("param_dtype", "float32"))


def _common_plan_fields(c, mesh) -> dict:
  return dict(put_batch=lambda b, stacked: sharding.put_batch(b, mesh, stacked=stacked),
              log_every=c.train.log_every_steps, divergence_factor=float(c.train.divergence_factor))


def pretrain_mixture(c, data: CPTData) -> tuple:
  """(sampler, {source: rows}) of pre-training: the general sources, each drawn in proportion to its size (as one
  corpus of them all would be); with one general source, that source alone."""
  general = {n: data.train[n] for n in roles_of(data)[GENERAL]}
  sizes = {n: len(rows) for n, rows in general.items()}
  return mx.MixtureSampler(mx.constant(sizes), sizes, c.pretrain.batch_size, seed=c.seed + 1000), general


def pretrain_phase(c, data: CPTData, model, params, mesh, model_cfg=None) -> Phase:
  """Task 'general' of the base: next-token loss on general text, cosine schedule with peak `optim.lr`."""
  from cl_jax.losses import next_token_loss
  from cl_jax.strategies import Learner, TaskInfo, build_strategy, naive, parse_strategy_spec
  from cl_jax.train.loop import Plan
  from cl_jax.train.schedules import cosine_schedule
  from cl_jax.train.state import build_state
  steps = int(c.pretrain.steps)
  schedule = cosine_schedule(c.optim.lr, max(steps, 1), c.pretrain.warmup_fraction, c.pretrain.end_lr_fraction)
  optimizer = _optimizer(c, c.optim, schedule)
  learner = Learner(model.apply, no_logit_mask)
  # SI's importance of the general task is the path integral of the base's own training: it runs here (Ω = 0, so
  # its penalty is 0) and the adaptation's SI starts from its state (`adapt_phase(pretrain_path=...)`).
  strategy = build_strategy("si", c, learner) if "si" in parse_strategy_spec(c.strategy) else naive()
  strategy_state = strategy.init(params, TaskInfo(1, int(data.tokenizer.vocab_size), (int(c.lm.seq_len) - 1,),
                                                  (int(c.lm.seq_len) - 1,), "int32"))
  state, state_sh = build_state(params, optimizer, strategy_state, jax.random.fold_in(jax.random.PRNGKey(c.seed), 1),
                                mesh)
  sampler, general = pretrain_mixture(c, data)
  plan = Plan(state=state, state_sharding=state_sh, steps=[steps],
              batches=lambda t, it: MixtureSource(sampler, general, 0, it),
              train_step=_compiled_step(strategy.loss(next_token_loss(learner)), optimizer, schedule, state_sh, mesh,
                                        c, model_cfg or model_config(c, data.tokenizer.vocab_size),
                                        c.pretrain.batch_size, strategy),
              eval_before=False, checkpoint_every=int(c.checkpoint.every_steps), names=["pretrain (general)"],
              record={"phase": "pretrain"}, **_common_plan_fields(c, mesh))
  return Phase(plan, learner, strategy, schedule)


class _MonitorHook:
  """The adaptation's per-evaluation hook state: the regression monitor and the realised-mixture log (JSON)."""

  def __init__(self, c, benchmarks: dict | None = None):
    self.c = c
    self.benchmarks = benchmarks or {}  # RegressionMonitor(benchmarks=...): the guarded benchmark metrics
    self.bench_specs: list = []         # cl_jax.lm.benchmarks.specs, as loaded (for the report)
    self.bench_items: dict = {}         # benchmark label -> its item count
    self.monitor = None
    self.mixture: list = []
    self.last_eval = 0
    self.verdict = None

  def make(self, baseline: dict, base_items: dict | None = None):
    from cl_jax.lm.monitor import RegressionMonitor
    r = self.c.regression
    return RegressionMonitor(baseline, r.threshold, select=r.select, patience=r.patience, base_items=base_items,
                             confidence=r.confidence, interval=r.interval, samples=r.bootstrap_samples,
                             seed=self.c.seed, keep=r.keep, hard_stop=r.hard_stop, stop_threshold=r.stop_threshold,
                             benchmarks=self.benchmarks)

  def meta(self) -> dict:
    return {"monitor": None if self.monitor is None else self.monitor.state_dict(), "mixture": self.mixture,
            "last_eval": self.last_eval}

  def load_meta(self, d: dict) -> None:
    if d.get("monitor") is not None:
      self.monitor = self.make(d["monitor"]["baseline"], d["monitor"].get("base_items"))
      self.monitor.load_state_dict(d["monitor"])
    self.mixture, self.last_eval = list(d.get("mixture", [])), int(d.get("last_eval", 0))


# One evaluation batch's float32 logits [rows, seq_len - 1, vocab] stay under this many bytes: at a 49,152-token
# vocabulary and 128 tokens a row is 25 MB, so `regression.eval_batch_size=64` alone would be a 1.6 GB buffer (and
# its log-softmax another) on top of the train state; 16 rows still fill a matrix unit. Per-item scores do not
# depend on the batch (each row is scored alone), so the cap changes memory, not numbers.
EVAL_LOGITS_BYTES = 512 * 2 ** 20


def eval_rows(c, apply, params) -> int:
  """`regression.eval_batch_size`, capped so one batch's logits fit `EVAL_LOGITS_BYTES` (at least one row)."""
  width = int(c.lm.seq_len) - 1
  logits = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1, width), jnp.int32))
  row = 4 * width * int(logits.shape[-1])
  return max(1, min(int(c.regression.eval_batch_size), EVAL_LOGITS_BYTES // row))


def adapt_phase(c, data: CPTData, model, base_params, mesh, baseline_model=None, pretrain_path=None,
                model_cfg=None, own_base: bool = False) -> Phase:
  """Tasks 'general' (0 steps: the base, handed to the strategies) and 'domain' (the mixture); see the docstring.
  `pretrain_path`: SI's state at the end of pre-training (its path integral), which SI in the chain starts from;
  `model_cfg`: the architecture that trains (its throughput and MFU). `own_base`: the caller hands over
  `base_params` (the train state starts from those very buffers and the first step donates them) instead of
  keeping them: one copy of the params fewer for the whole run."""
  from cl_jax.eval.evaluator import make_lm_evaluator
  from cl_jax.losses import next_token_loss
  from cl_jax.strategies import Learner, TaskData, TaskInfo, build_strategy, parse_strategy_spec
  from cl_jax.train.loop import Plan, Verdict, task_start
  from cl_jax.train.schedules import build_schedule
  from cl_jax.train.state import build_state
  key = jax.random.PRNGKey(c.seed)
  learner = Learner(model.apply, no_logit_mask)
  strategy = build_strategy(c.strategy, c, learner)
  task_info = TaskInfo(len(TASKS), int(data.tokenizer.vocab_size), (int(c.lm.seq_len) - 1,), (int(c.lm.seq_len) - 1,),
                       "int32")
  # A copy unless the caller hands the base over: the step donates its state.
  params = base_params if own_base else jax.tree.map(lambda p: jnp.array(p, copy=True), base_params)
  trainable = None
  if strategy.prepare is not None:  # LoRA: the model becomes base + adapter, only the adapter trains
    apply, params, trainable = strategy.prepare(model, params, task_info, jax.random.fold_in(key, 2))
    learner = Learner(apply, no_logit_mask)
    strategy = build_strategy(c.strategy, c, learner)
  steps = int(c.adapt.steps)
  optim = ml_collections.ConfigDict(c.optim.to_dict())
  optim.lr = float(c.optim.lr) * float(c.adapt.lr_ratio)
  schedule = build_schedule(optim, steps, 1)
  from cl_jax.lm.vocab import row_scaling
  optimizer = _optimizer(c, optim, schedule, trainable, wrap=row_scaling(c, params))
  strategy_state = strategy.init(params, task_info)
  if pretrain_path is not None:
    from cl_jax.strategies.si import with_path
    strategy_state = with_path(strategy_state, parse_strategy_spec(c.strategy), pretrain_path)
  state, state_sh = build_state(params, optimizer, strategy_state, jax.random.fold_in(key, 3), mesh)

  orders = None
  if c.adapt.difficulty:
    orders = {n: difficulty_order_for(model.apply, base_params, data, eval_rows(c, model.apply, base_params),
                                      mesh, n) for n in roles_of(data)[DOMAIN]}
  sizes = {n: len(data.train[n]) for n in source_order(data)}
  sampler = mx.MixtureSampler(adaptation_stages(c, sizes), sizes, c.adapt.batch_size, seed=c.seed, orders=orders)
  rows = eval_rows(c, learner.apply, params)
  evaluator = with_source_metrics(make_lm_evaluator(lambda p, x: learner.apply(p, x), rows, mesh), data)
  # `regression.benchmarks` (cl_jax.lm.benchmarks): scored by one engine at every evaluation, step 0 included (the
  # baseline, before the first step); an adapter's run is scored on its merged params (W + (alpha / r) A B), the
  # plain model's, so that its KV-cache generation serves generate_until benchmarks too.
  from cl_jax.lm.benchmarks import Scorer, load_all, monitor_settings
  loaded = load_all(c.regression.get("benchmarks"))
  plain = None
  if strategy.prepare is not None:
    from cl_jax.strategies.lora import merged_params
    plain = lambda p: merged_params(p, c)  # noqa: E731
  bench = Scorer(loaded, model.apply if plain else learner.apply, data.tokenizer, max_len=int(c.lm.seq_len),
                 mesh=mesh, model=model, batch_size=rows, plain=plain)
  hook = _MonitorHook(c, monitor_settings(loaded))
  hook.bench_specs, hook.bench_items = [spec for spec, _ in loaded], {spec["label"]: len(b.items) for spec, b in loaded}

  def batches(t, iterator_state):
    return MixtureSource(sampler, data.train, t, iterator_state)

  def after_task(state, t):
    if t != 0:  # the adapted model's own consolidation would only serve a further task
      return state
    general = general_sample(data)  # a prepared cache: the consolidation sample, not the whole corpus
    task_data = TaskData(general[:, :-1], general[:, 1:], np.zeros(len(general), np.int32), 0)
    new = strategy.after_task(state.strategy_state, state.params, task_data, jax.random.fold_in(key, 1000))
    return state._replace(strategy_state=sharding.put_global(new, state_sh.strategy_state))

  def evaluate(state, t):
    step = int(jax.device_get(state.step))
    items = {}
    metrics = evaluator(state.params, data.eval["validation"], data.cloze["validation"], per_item=items)
    scores = bench(state.params, per_item=items) if bench else {}
    metrics.update(scores)
    if hook.monitor is None and baseline_model is not None:
      # A long-context stage (cl_jax.lm.long_context): the baseline is the model before its RoPE changed (its
      # benchmarks are scored at the new context, as every later evaluation is).
      base_items = {}
      reference = make_lm_evaluator(baseline_model.apply, rows, mesh)(
          state.params, data.eval["validation"], data.cloze["validation"], per_item=base_items)
      reference.update(scores)
      base_items.update({k: items[k] for k in scores})
      hook.monitor = hook.make(reference, base_items)
    if hook.monitor is None:
      hook.monitor = hook.make(metrics, items)
    v = hook.verdict = hook.monitor.check(step, metrics, items)
    # Every decision in metrics.jsonl: the estimate, its interval, the call per metric and for the evaluation.
    fields = {**metrics, "regressions": v.regressions,
              "regression_intervals": {m: [iv["lo"], iv["hi"]] for m, iv in v.intervals.items()},
              "regression_decisions": {m: h for m, h in hook.monitor.history[-1]["decisions"].items()},
              "regression_decision": v.decision, "keepable": v.within, "kept": v.is_best}
    if step > 0:
      realised = sampler.realised(hook.last_eval, step)
      configured = sampler.weights_at(step - 1)
      hook.mixture.append({"start": hook.last_eval, "end": step, "realised": realised,
                           "configured_at_end": configured})
      fields.update(crossed=hook.verdict.crossed, realised_mixture=realised, lr=float(schedule(step - 1)))
      hook.last_eval = step
    return fields

  def on_eval(state, step, record):
    del state, record, step
    v = hook.verdict
    return Verdict(stop=bool(c.regression.hard_stop and hook.monitor.should_stop), best=bool(v.is_best))

  plan = Plan(state=state, state_sharding=state_sh, steps=[0, steps], batches=batches,
              train_step=_compiled_step(strategy.loss(next_token_loss(learner)), optimizer, schedule, state_sh,
                                        mesh, c, model_cfg or model_config(c, data.tokenizer.vocab_size),
                                        c.adapt.batch_size, strategy),
              evaluate=evaluate, begin_task=task_start(strategy, optimizer, state_sh), after_task=after_task,
              on_eval=on_eval, meta=hook.meta,
              load_meta=hook.load_meta, eval_before=False, eval_every=int(c.regression.eval_every),
              checkpoint_every=int(c.regression.eval_every), names=["adapt: general (the base)", "adapt: domain"],
              record={"phase": "adapt"}, **_common_plan_fields(c, mesh))
  return Phase(plan, learner, strategy, schedule, hook, sampler, evaluator)


# ----------------------------------------------------------------------------- the run

def _pct(base: float, value: float, higher_better: bool) -> float | None:
  """Improvement in percent relative to base (> 0: better); None where the base is 0 (no relative change exists:
  e.g. a tiny model's cloze accuracy on a small general set)."""
  if base == 0:
    return None
  return 100.0 * ((value - base) if higher_better else (base - value)) / base


def _regression_pct(base: float, value: float, higher_better: bool) -> float | None:
  """Regression in percent relative to base (> 0: worse); None where the base is 0."""
  gain = _pct(base, value, higher_better)
  return None if gain is None else -gain


def table_row(record: dict) -> dict:
  """The experiment-table row of a finished run (test split): domain gain and general regression in %."""
  base, kept, final = record["test"]["base"], record["test"]["best"], record["test"]["final"]
  return {
      "mixture": record["mixture"], "schedule": record["schedule"], "method": record["method"],
      "strategy": record["strategy"], "seed": record["seed"],
      "domain_ppl_gain_pct": _pct(base["domain/perplexity"], kept["domain/perplexity"], False),
      "general_ppl_regression_pct": _regression_pct(base["general/perplexity"], kept["general/perplexity"], False),
      "general_acc_regression_pct": _regression_pct(base["general/accuracy"], kept["general/accuracy"], True),
      "cloze_regression_pct": _regression_pct(base["general/cloze_accuracy"], kept["general/cloze_accuracy"], True),
      "final_domain_ppl_gain_pct": _pct(base["domain/perplexity"], final["domain/perplexity"], False),
      "final_general_ppl_regression_pct": _regression_pct(base["general/perplexity"], final["general/perplexity"],
                                                          False),
      "stopped": record["stopped"] is not None,
      "stopped_step": None if record["stopped"] is None else record["stopped"]["step"],
      "stopped_metrics": None if record["stopped"] is None else record["stopped"]["metrics"],
      "best_step": record["best_step"], "steps_run": record["steps_run"],
  }


def _base_params(c, data, model, params, mesh, workdir: str, resume: bool, progress: bool, hooks=(), model_cfg=None):
  """The base: pre-trained here (resuming), restored from `pretrain.base_dir`, or the initialisation; with the
  seconds it took and the pre-training's SI state (its path integral; None without SI)."""
  from cl_jax.checkpoint import Checkpoints, abstract_like, retention
  from cl_jax.train.loop import run_tasks
  from cl_jax.workdir import MetricsLog
  if not c.pretrain.base_dir and c.pretrain.steps == 0:
    return params, 0.0, None
  phase = pretrain_phase(c, data, model, params, mesh, model_cfg)
  plan = phase.plan
  abstract = abstract_like(plan.state, plan.state_sharding)
  if c.pretrain.base_dir:
    source = Checkpoints(os.path.join(os.path.abspath(c.pretrain.base_dir), "pretrain"))
    try:
      restored = source.restore(abstract, kind="tasks")
    finally:
      source.close()
    if restored is None:
      raise FileNotFoundError(f"pretrain.base_dir={c.pretrain.base_dir!r}: no pre-trained base under "
                              f"{os.path.join(c.pretrain.base_dir, 'pretrain', 'checkpoints', 'tasks')}")
    return restored[0].params, 0.0, None
  path = lambda s: s.strategy_state if phase.strategy.name == "si" else None
  checkpoints = Checkpoints(os.path.join(workdir, "pretrain"), keep=c.checkpoint.keep).retain(
      **retention(c.checkpoint))
  try:
    done = resume and checkpoints.tasks.latest_step() == int(c.pretrain.steps)
    if done:  # the base exists: no loop run (it would reopen, and trim, the metrics log)
      done_state = checkpoints.restore(abstract, kind="tasks")[0]
      return done_state.params, 0.0, path(done_state)
    keep_pretrain = lambda s: (lambda r: r.get("phase") == "pretrain" and s is not None and r["step"] <= s)
    out = run_tasks(plan, workdir, checkpoints, resume, progress,
                    open_log=lambda s: MetricsLog(workdir, s, keep=keep_pretrain(s)), hooks=hooks)
  finally:
    checkpoints.close()
  return out.state.params, out.seconds, path(out.state)


class Built(NamedTuple):
  """An LM run before it writes anything: the corpora, the mesh and the model (new, or imported from HF)."""
  data: CPTData
  mesh: Any
  cfg: Any           # the model's TransformerConfig (the imported one for an HF checkpoint)
  model: Any
  params: Any
  imported: Any      # cl_jax.models.hf_checkpoint.Loaded, or None
  t0: float


def build(c, data: CPTData | None = None) -> Built:
  """Loads the corpora (`data` skips it) and builds or imports the model, straight into the params' shardings."""
  from cl_jax.models.transformer import init_lm
  t0 = time.time()
  data = data or load_data(c)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
  imported = None
  if c.lm.init_from:  # a Hugging Face checkpoint, streamed straight into the params' shardings
    from cl_jax.models import hf_checkpoint
    imported = hf_checkpoint.load(
        c.lm.init_from, mesh=mesh, dtype=jnp.dtype(c.lm.get("param_dtype", "float32")),
        compute_dtype=c.lm.compute_dtype or "float32", remat=c.lm.get("remat", "none"),
        scan_layers=bool(c.lm.get("scan_layers", False)), attn_chunk=int(c.lm.get("attn_chunk", 0)))
    cfg, model, params = imported.config, imported.model, imported.params
  else:
    cfg = model_config(c, data.tokenizer.vocab_size)
    model, params = init_lm(cfg, c.seed, mesh, c.lm.get("param_dtype", "float32"))
  return Built(data, mesh, cfg, model, params, imported, t0)


def execute(built: Built, ctx):
  """Continual pre-training end to end in the opened workdir (see the module docstring); returns the Results."""
  from cl_jax.checkpoint import Checkpoints, abstract_like, params_only, retention
  from cl_jax.lm.monitor import BENCH, paired_interval
  from cl_jax.results import Results
  from cl_jax.train.loop import run_tasks, strategy_record
  from cl_jax.workdir import MetricsLog
  c, workdir, progress = ctx.config, ctx.workdir, ctx.progress
  data, mesh, cfg, model, params, imported, t0 = built
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  names = c.strategy.split("+")
  adapter = next((n for n in ("lora", "olora") if n in names), None)  # base + adapter(s): the base stays frozen
  base, pretrain_seconds, pretrain_path = _base_params(c, data, model, params, mesh, workdir, ctx.resume, progress,
                                                       ctx.hooks, cfg)
  # Stages between the base and the adaptation (issue 10 items 4-5; no-ops unless configured): vocabulary
  # extension (tokenizer, data, embedding rows: cl_jax.lm.vocab) and long context (RoPE, sequence length).
  from cl_jax.lm.long_context import stage_for_run
  from cl_jax.lm.vocab import extend_for_run
  data, model, base, imported = extend_for_run(c, data, model, base, workdir, imported)
  before_stage = model
  stage_c, data, model, imported = stage_for_run(c, data, model, base, workdir, imported)
  # MFU counts the model that trains: the imported architecture, its vocabulary after an extension.
  adapt_cfg = dataclasses.replace(cfg, vocab_size=int(data.tokenizer.vocab_size), max_len=int(stage_c.lm.seq_len))
  # The run hands the base over (`own_base`): nothing below reads it again (the test split's base is restored from
  # step 0's checkpoint), so the state starts from its buffers instead of a copy (one params' bytes for the run).
  phase = adapt_phase(stage_c, data, model, base, mesh, baseline_model=None if stage_c is c else before_stage,
                      pretrain_path=pretrain_path, model_cfg=adapt_cfg, own_base=True)
  del base, params
  plan, hook = phase.plan, phase.hook
  # Step 0's boundary is the base the test split compares with: kept whatever `checkpoint.keep_tasks` says.
  with Checkpoints(workdir, keep=c.checkpoint.keep).retain(**retention(c.checkpoint), pin=(0,)) as checkpoints:
    keep = lambda s: (lambda r: r.get("phase") == "pretrain" or (s is not None and r["step"] <= s))
    out = run_tasks(plan, workdir, checkpoints, ctx.resume, progress,
                    open_log=lambda s: MetricsLog(workdir, s, keep=keep(s)), hooks=ctx.hooks)
    abstract = abstract_like(plan.state, plan.state_sharding)
    # The base and the kept model as params alone (`ParamsOnly`): evaluation and export read nothing else, and
    # restoring whole states would allocate two optimizer states (2 x 2 params' bytes for AdamW) at the run's end.
    base_state = checkpoints.restore_params(abstract, "tasks", 0)
    if checkpoints.keep_best:
      try:
        best_state, _ = checkpoints.restore(params_only(abstract), kind="best")
      except (ValueError, RuntimeError):  # a best saved whole (by a run begun before bests were params-only)
        best_state = checkpoints.restore_params(abstract, "best", checkpoints.best.latest_step())
    else:  # `checkpoint.keep_best=False`: the kept model is the final one
      best_state = params_only(out.state)
    best_step = int(jax.device_get(best_state.step))
  # The final optimizer state is in its checkpoint; evaluation needs the params alone, so the rest is let go
  # before the test split's three evaluations (2 params' bytes for AdamW).
  final_state = params_only(out.state)
  out = dataclasses.replace(out, state=final_state)
  monitor = hook.monitor
  test, test_items = {}, {}
  # A kept model saved at the final step is the final model: scored once (a whole test-split pass saved; with
  # `checkpoint.keep_best=False` it always is).
  same = best_step == int(jax.device_get(out.state.step))
  for name, s in (("base", base_state), ("best", None if same else best_state), ("final", out.state)):
    if s is not None:
      test_items[name] = {}
      test[name] = phase.evaluator(s.params, data.eval["test"], data.cloze["test"], per_item=test_items[name])
  if same:
    test = {"base": test["base"], "best": dict(test["final"]), "final": test["final"]}
    test_items["best"] = test_items["final"]
  # The same paired intervals on the test split: the kept and the final model against the base.
  test_intervals = {name: {m: paired_interval(m, test_items["base"][m], test_items[name][m],
                                              confidence=monitor.confidence, interval=monitor.interval,
                                              samples=monitor.samples, seed=[c.seed, 1 << 30],
                                              threshold=monitor.threshold)
                           for m in [g for g in monitor.general if BENCH not in g] + source_metrics(data)}
                    for name in ("best", "final")}
  record = {
      "mixture": mixture_label(c),
      "stages": [[s, dict(zip(phase.sampler.domains, w))] for s, w in phase.sampler.stages],
      "schedule": c.optim.schedule, "method": adapter or "full", "strategy": c.strategy,
      "seed": c.seed, "adapt_lr": float(c.optim.lr * c.adapt.lr_ratio), "pretrain_lr": c.optim.lr,
      "num_params": num_params, "model": dataclasses.asdict(cfg), "baseline": monitor.baseline,
      "threshold": c.regression.threshold, "stopped": monitor.stopped, "best_step": best_step,
      "best_checkpoint": os.path.join(checkpoints.root, "best", str(best_step)) if checkpoints.keep_best else None,
      "steps_run": int(jax.device_get(out.state.step)), "monitor": monitor.describe(), "history": monitor.history,
      "realised_mixture": hook.mixture, "test": test, "test_intervals": test_intervals,
      "monitor_rule": monitor.rule(), "eval_sets": eval_sizes(data),
      "timing": {"pretrain_seconds": pretrain_seconds, "adapt_seconds": out.seconds,
                 "total_seconds": time.time() - t0},
      **strategy_record(c),
  }
  if hook.bench_specs:  # absent without benchmarks: such a run's record is what it always was
    record["benchmarks"] = benchmark_table(hook.bench_specs, hook.bench_items, monitor.history, best_step)
  if adapter:
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), out.state.params["base"],
                        base_state.params["base"])
    record["lora_base_unchanged"] = bool(all(jax.tree.leaves(same)))
  if c.lm.export_hf:
    record.update(export_hf(c, workdir, cfg, imported, best_state.params, adapter, data.tokenizer))
  record["row"] = table_row(record)
  return Results("lm", workdir, extra=record)


def benchmark_table(specs: list, sizes: dict, history: list, best_step: int) -> list[dict]:
  """Each benchmark's guarded metric before adaptation (step 0), after it (the last evaluation) and in the kept
  checkpoint, with the monitor's paired interval and call at those two evaluations (from its history)."""
  from cl_jax.lm.benchmarks import metric_name
  by_step = {h["step"]: h for h in history}
  first, last = history[0], history[-1]
  kept = by_step.get(best_step, last)

  def at(h, name):
    return {"step": h["step"], "score": h["metrics"][name], "interval": h["intervals"].get(name),
            "decision": h["decisions"].get(name, "recorded")}
  rows = []
  for s in specs:
    name = metric_name(s)
    rows.append({"benchmark": s["label"], "source": s["source"], "role": s["role"], "metric": s["metric"],
                 "name": name, "items": sizes[s["label"]], "threshold": s["threshold"],
                 "stop_threshold": s["stop_threshold"] or s["threshold"], "relative": s["relative"],
                 "before": first["metrics"][name], "after": at(last, name), "kept": at(kept, name)})
  return rows


def benchmark_lines(record: dict) -> list[str]:
  """summary.md's benchmark table: before / after / kept, the change and its interval in points (or %)."""
  rows = record.get("benchmarks")
  if not rows:
    return []

  def change(cell, relative):
    iv, unit = cell["interval"], "%" if relative else ""
    if iv is None:
      return "-"
    # The monitor's r is a regression (> 0 worse); the table shows the change (> 0 better), in points or %.
    pts = lambda r: f"{-100 * r + 0.0:+.2f}"  # + 0.0: no '-0.00'  # noqa: E731
    text = pts(iv["estimate"]) + unit
    return text + (f" [{pts(iv['hi'])}, {pts(iv['lo'])}]" if iv.get("se") is not None else "")
  lines = ["## Benchmarks", "",
           "Scores (%) before adaptation (step 0), after it (the last evaluation) and in the kept checkpoint; change: "
           "points (% where relative) with the monitor's paired interval "
           "over the same items; a general benchmark is guarded at its threshold, a domain one recorded.", "",
           "| benchmark | role | metric | items | threshold | before | after | change [interval] | call | kept | "
           "change [interval] | call |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    a, k = r["after"], r["kept"]
    thr = f"{r['threshold']:g}{'%' if r['relative'] else ' pts'}"
    lines.append(f"| {r['benchmark']} | {r['role']} | {r['metric']} | {r['items']:,} | {thr} | "
                 f"{100 * r['before']:.1f} | {100 * a['score']:.1f} (step {a['step']}) | "
                 f"{change(a, r['relative'])} | {a['decision']} | {100 * k['score']:.1f} (step {k['step']}) | "
                 f"{change(k, r['relative'])} | {k['decision']} |")
  return lines + ["", "Every benchmark over the steps: monitor.png (right panel).", ""]


def export_hf(c, workdir: str, cfg, imported, kept, adapter: str | None, tokenizer) -> dict:
  """`lm.export_hf`: the kept (best) model in the Hugging Face layout, for an imported or a new model.

  <workdir>/hf          the model (adapters merged: W + (alpha / r) sum_k A_k B_k, O-LoRA's inference rule), its
                        tokenizer and chat template (`hf_checkpoint.export`); an imported model keeps its
                        config.json fields, a new one is written as the family that holds it (`family_of`);
  <workdir>/hf_adapter  with `lora` / `olora`: the adapter(s) in PEFT's format (`export_peft_adapter`; O-LoRA's
                        slots as one adapter of their summed rank), on the unchanged base: the imported checkpoint
                        (lm.init_from) or, for a new model, <workdir>/hf_base.
  A new model no family holds (cl_jax's default gelu MLP with RoPE), or a tokenizer with no file (byte), is not
  exported: a one-line notice says why and the record holds `hf_export_skipped`."""
  from cl_jax.errors import ConfigError
  from cl_jax.models import hf_checkpoint, hf_tokenizer
  from cl_jax.strategies.lora import base_params, merged_params
  if imported is not None:
    model_config, tok = imported.hf_config, imported.tokenizer
    template, _ = hf_tokenizer.chat_template_source(c.lm.init_from)
  else:
    model_config, tok, template = cfg, tokenizer, None
    try:
      hf_checkpoint.family_of(cfg)
      if getattr(tok, "path", None) is None:
        raise ConfigError(f"the {getattr(tok, 'name', 'byte')} tokenizer has no tokenizer file to ship with it "
                          "(use lm.tokenizer=<a tokenizers .json file> for an exportable model)")
    except ConfigError as e:
      print(f"notice: lm.export_hf: the model is not exported to the Hugging Face layout: {e}")
      return {"hf_export": None, "hf_export_skipped": str(e)}
  out = {"hf_export": os.path.join(workdir, "hf")}
  merged = merged_params(kept, c) if adapter else kept
  hf_checkpoint.export(out["hf_export"], model_config, merged, tokenizer=tok, chat_template=template)
  if adapter:
    from cl_jax.models import lora as lora_lib
    base_model = os.path.abspath(c.lm.init_from) if imported is not None else os.path.join(workdir, "hf_base")
    if imported is None:
      hf_checkpoint.export(base_model, model_config, base_params(kept), tokenizer=tok)
    out["hf_adapter"] = os.path.join(workdir, "hf_adapter")
    hf_checkpoint.export_peft_adapter(out["hf_adapter"], kept, lora_lib.adapter_names(kept),
                                      lora_lib.spec_from_config(c.lora), model_config, base_model=base_model)
  return out


def report(results, workdir: str, config) -> None:
  """summary.md (the monitor's rule, evaluation sets, test metrics) and monitor.png."""
  from cl_jax.lm.monitor import plot_monitor
  record = results.extra
  plot_monitor(record["history"], record["baseline"], config.regression.threshold,
               os.path.join(workdir, "monitor.png"), title=f"{record['mixture']} / {record['schedule']} / {config.strategy}",
               stopped_step=None if record["stopped"] is None else record["stopped"]["step"],
               best_step=record["best_step"], benchmarks=record.get("benchmarks"))
  write_summary(workdir, record)


def power_lines(record: dict) -> list[str]:
  """summary.md's account of the monitor: its rule, its evaluation sets and the regression size they resolve."""
  sizes, thr = record.get("eval_sets"), 100 * record["threshold"]
  if not sizes:
    return []
  lines = ["## The regression monitor", "", f"Rule: {record.get('monitor_rule', '')}.", "",
           "| split | general sequences | general tokens | cloze items | domain sequences | domain tokens |",
           "|---|---|---|---|---|---|"]
  for split in ("validation", "test"):
    g, d = sizes[split]["general"], sizes[split]["domain"]
    lines.append(f"| {split} | {g['sequences']:,} | {g['tokens']:,} | {sizes[split]['cloze_items']:,} | "
                 f"{d['sequences']:,} | {d['tokens']:,} |")
  last = record["history"][-1].get("intervals", {}) if record["history"] else {}
  test = record.get("test_intervals", {}).get("final", {})
  rows = []
  for m in sorted(m for m in set(last) | set(test) if "/bench/" not in m):  # benchmarks: their own table
    cells = []
    for iv in (last.get(m), test.get(m)):
      if not iv or iv.get("se") is None:
        cells.append("- | -")
      else:
        cells.append(f"{100 * iv['estimate']:+.2f} [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}] | "
                     f"{100 * iv['detectable']:.2f}")
    rows.append(f"| {m} | {cells[0]} | {cells[1]} |")
  if rows:
    lines += ["", f"What these sets resolve at the last evaluation (final model vs base): the relative regression "
                  f"(%) with its interval, and the true regression (%) that would be called beyond the {thr:g}% "
                  "threshold with 80% power at this set size (`detectable`; cl_jax.lm.monitor).", "",
              "| general metric | validation estimate [interval] | validation detectable | test estimate [interval] "
              "| test detectable |", "|---|---|---|---|---|", *rows]
  return lines + source_lines(record) + [""]


def source_lines(record: dict) -> list[str]:
  """summary.md's per-source account when a role has several sources: each source's share of its role's
  evaluation sets and, on the test split, its own perplexity change (final vs base) with the regression that set
  size resolves; recorded, not guarded (the monitor decides on the role's whole set)."""
  sizes = record.get("eval_sets") or {}
  if "sources" not in sizes.get("test", {}):
    return []
  test = record.get("test_intervals", {}).get("final", {})
  lines = ["", "Per source (the role's evaluation set is its sources' sets concatenated; each source is capped by "
               "its `eval_sequences`, by default `data.eval_tokens` tokens):", "",
           "| source | role | validation sequences | validation tokens | test sequences | test tokens | "
           "test perplexity change (%) [interval] | test detectable (%) |", "|---|---|---|---|---|---|---|---|"]
  for name, t in sizes["test"]["sources"].items():
    v = sizes["validation"]["sources"].get(name, {"sequences": 0, "tokens": 0})
    iv = test.get(source_metric(name))
    cells = ("- | -" if not iv or iv.get("se") is None else
             f"{100 * iv['estimate']:+.2f} [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}] | {100 * iv['detectable']:.2f}")
    lines.append(f"| {name} | {t['role']} | {v['sequences']:,} | {v['tokens']:,} | {t['sequences']:,} | "
                 f"{t['tokens']:,} | {cells} |")
  return lines


def write_summary(workdir: str, record: dict) -> str:
  row = record["row"]
  lines = [f"# Continual pre-training: {row['mixture']}, {row['schedule']}, {row['strategy']}",
           "", record["monitor"], "",
           "Test split; best = the kept checkpoint (the best by validation domain perplexity among the evaluations "
           f"the monitor did not call regressed; step {row['best_step']}), final = step {row['steps_run']}.", "",
           "| model | general ppl | general acc | cloze acc | domain ppl | domain acc |",
           "|---|---|---|---|---|---|"]
  for name in ("base", "best", "final"):
    m = record["test"][name]
    lines.append(f"| {name} | {m['general/perplexity']:.3f} | {100 * m['general/accuracy']:.2f} | "
                 f"{100 * m['general/cloze_accuracy']:.1f} | {m['domain/perplexity']:.3f} | "
                 f"{100 * m['domain/accuracy']:.2f} |")
  lines += ["", f"Kept model: domain perplexity gain {row['domain_ppl_gain_pct']:+.2f}%, general perplexity "
                f"regression {row['general_ppl_regression_pct']:+.2f}%.", ""]
  lines += power_lines(record)
  lines += benchmark_lines(record)
  path = os.path.join(workdir, "summary.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


__all__ = ["model_config", "adaptation_stages", "mixture_label", "power_lines", "source_lines", "benchmark_table",
           "benchmark_lines", "difficulty_order_for", "pretrain_mixture", "pretrain_phase",
           "adapt_phase", "MixtureSource", "table_row", "write_summary", "build", "execute", "report", "Built"]
