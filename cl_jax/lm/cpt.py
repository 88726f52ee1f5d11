"""Continual pre-training (CPT) of a causal LM: pre-train on general text, adapt to a domain with a mixture.

`run(config, workdir)` (what `run.py` calls for `config.kind == 'lm'`):

  1. data     the `general` and `domain` corpora (`cl_jax.data.text`), packed into `lm.seq_len` tokens;
              fixed evaluation subsets of their validation / test splits and cloze items on held-out prose.
  2. base     pre-train a `TransformerLM` on general text for `pretrain.steps` steps (cosine schedule,
              peak `optim.lr`), or load the base of another run (`pretrain.base_dir`).
  3. baseline measure the base: general perplexity, next-token accuracy, cloze accuracy; domain perplexity
              and accuracy (validation splits).
  4. adapt    train `adapt.steps` steps on the mixture `adapt.mixture` (stages, `cl_jax.data.mixture`) with
              peak LR `adapt.lr_ratio * optim.lr` (continual pre-training re-warms to a small fraction of
              the pre-training LR: Gupta et al. 2023; Ibrahim et al. 2024), `optim.warmup_fraction` (5%)
              warmup and the `optim.schedule` (`wsd` | `cosine`). Optional retention: distillation to the
              base (`strategy='distill'`: token-level KL with temperature, Hinton et al. 2015) or a LoRA
              adapter on a frozen base (`adapt.method='lora'`, Hu et al. 2021).
  5. monitor  every `regression.eval_every` steps re-measure; a relative regression beyond
              `regression.threshold` on any general metric is a hard stop (`cl_jax.lm.monitor`); the best
              in-threshold checkpoint is kept in `checkpoints/best` and named in results.json.
  6. report   test-split metrics of the base, the kept (best) and the final model; results.json,
              summary.md (the table row), metrics.jsonl (train / eval records, realised mixture per
              eval interval), monitor.png.

Rerunning on the same workdir resumes: the base is restored, the adaptation continues from its newest
checkpoint with the monitor's history, and the data order is the same (the sampler is a pure function of
seed and step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from cl_jax import sharding
from cl_jax.data import mixture as mx
from cl_jax.data import text as textdata
from cl_jax.data.tokenizer import load_tokenizer
from cl_jax.strategies.ewc import ewc_penalty
from cl_jax.lm.losses import distillation_kl, next_token_metrics, token_cross_entropy
from cl_jax.lm.monitor import RegressionMonitor, plot_monitor
from cl_jax.strategies.base import LossContext
from cl_jax.train.optim import build_optimizer
from cl_jax.train.schedules import cosine_schedule, wsd_schedule
from cl_jax.train.state import TrainState
from cl_jax.train.step import compile_train_step, make_train_step

GENERAL, DOMAIN = "general", "domain"

# Test hook: raise SimulatedCrash right after the adaptation checkpoint of this step is written.
CRASH_ENV = "CL_JAX_CPT_CRASH_AT_STEP"


class SimulatedCrash(RuntimeError):
  pass


# ----------------------------------------------------------------------------- config

def default_config() -> ml_collections.ConfigDict:
  """The full LM config (locked: a misspelt key is an error). `configs/cpt_lm.py` starts from this."""
  c = ml_collections.ConfigDict()
  c.kind = "lm"
  c.seed = 0
  c.strategy = "naive"  # naive | distill (to the pre-adaptation model) | generative_replay | ewc
  c.lm = ml_collections.ConfigDict(dict(
      size="tiny", d_model=0, num_layers=0, num_heads=0,  # 0: the size's default
      seq_len=128, tokenizer="byte", compute_dtype="float32", tied_embeddings=True))
  c.text = ml_collections.ConfigDict(dict(
      general="general", domain="code",  # domain specs (cl_jax.data.text.load_domain)
      split_seed=0, validation=0.05, test=0.05,
      max_train_sequences=0,             # 0: all; else a fixed random subset of each domain's train split
      eval_sequences=256,                # fixed random subset of validation / test per domain
      cloze_items=400, cloze_context=48, cloze_choices=4))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, b1=0.9, b2=0.95, momentum=0.9, weight_decay=0.0, grad_clip=1.0,
      schedule="wsd", warmup_fraction=0.05, decay_fraction=0.25, end_lr_fraction=0.0,
      decay_shape="linear", scope="global"))
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, warmup_fraction=0.05, end_lr_fraction=0.1,
      base_dir=""))  # a workdir whose checkpoints/base to start from instead of pre-training
  c.adapt = ml_collections.ConfigDict(dict(
      steps=400, batch_size=16, lr_ratio=0.1, mixture="70_30", difficulty=False,
      method="full", lora_rank=8, lora_alpha=16.0))
  c.distill = ml_collections.ConfigDict(dict(alpha=1.0, temperature=2.0))
  # ewc: lam/2 * sum_i F_i (theta_i - theta*_i)^2 with F the empirical Fisher of the base on `num_sequences`
  # general training sequences (per-sequence gradients of the mean token NLL, squared and averaged).
  c.ewc = ml_collections.ConfigDict(dict(lam=1000.0, num_sequences=256))
  # generative_replay: the pre-adaptation model continues `num_prompts` stored general prompts of
  # `prompt_len` tokens; those samples take the place of the real general data in the mixture.
  c.generative_replay = ml_collections.ConfigDict(dict(num_prompts=256, prompt_len=16, temperature=1.0,
                                                       batch_size=64))
  c.regression = ml_collections.ConfigDict(dict(
      threshold=0.02, eval_every=500, hard_stop=True, patience=1, min_z=0.0, select="domain/perplexity",
      eval_batch_size=64))
  c.train = ml_collections.ConfigDict(dict(log_every_steps=25))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.lock()
  return c


def check_config(c) -> None:
  """Raises ValueError naming the key for every value that would waste a run."""
  if c.kind != "lm":
    raise ValueError(f"kind={c.kind!r}: cl_jax.lm.cpt runs kind='lm' configs")
  if c.strategy not in ("naive", "distill", "generative_replay", "ewc"):
    raise ValueError(f"strategy={c.strategy!r}: LM continual pre-training supports 'naive', 'distill', "
                     "'generative_replay' and 'ewc' (replay of real general data is the mixture itself: "
                     "adapt.mixture)")
  if c.strategy == "ewc" and (c.ewc.lam < 0 or c.ewc.num_sequences < 1):
    raise ValueError(f"ewc.lam={c.ewc.lam}, ewc.num_sequences={c.ewc.num_sequences}: need lam >= 0 and "
                     "num_sequences >= 1")
  if c.strategy == "ewc" and c.adapt.method == "lora":
    raise ValueError("adapt.method='lora' with strategy='ewc': the LoRA base is frozen already")
  g = c.generative_replay
  if c.strategy == "generative_replay":
    if not 1 <= g.prompt_len < c.lm.seq_len:
      raise ValueError(f"generative_replay.prompt_len={g.prompt_len}: must be in [1, lm.seq_len={c.lm.seq_len})")
    if g.num_prompts < 1 or g.batch_size < 1 or not g.temperature >= 0:
      raise ValueError(f"generative_replay: num_prompts={g.num_prompts}, batch_size={g.batch_size}, "
                       f"temperature={g.temperature}: need positive counts and temperature >= 0")
  for key in ("steps", "batch_size"):
    if not isinstance(c.adapt[key], int) or c.adapt[key] < 1:
      raise ValueError(f"adapt.{key}={c.adapt[key]!r}: must be a positive integer")
    if not isinstance(c.pretrain[key], int) or c.pretrain[key] < 0 or (key == "batch_size" and
                                                                       c.pretrain[key] < 1):
      raise ValueError(f"pretrain.{key}={c.pretrain[key]!r}: must be a non-negative integer")
  if not c.adapt.lr_ratio > 0:
    raise ValueError(f"adapt.lr_ratio={c.adapt.lr_ratio}: must be positive (adaptation peak LR = "
                     "lr_ratio * optim.lr)")
  if c.optim.schedule not in ("wsd", "cosine", "constant"):
    raise ValueError(f"optim.schedule={c.optim.schedule!r}: expected 'wsd', 'cosine' or 'constant'")
  for key in ("warmup_fraction", "decay_fraction", "end_lr_fraction"):
    if not 0 <= c.optim[key] <= 1:
      raise ValueError(f"optim.{key}={c.optim[key]}: must be in [0, 1]")
  if c.optim.schedule == "wsd" and c.optim.warmup_fraction + c.optim.decay_fraction > 1:
    raise ValueError("optim.warmup_fraction + optim.decay_fraction exceeds 1")
  if c.adapt.method not in ("full", "lora"):
    raise ValueError(f"adapt.method={c.adapt.method!r}: expected 'full' or 'lora'")
  if c.adapt.method == "lora" and c.strategy == "distill":
    raise ValueError("adapt.method='lora' with strategy='distill': the LoRA base is frozen already; "
                     "use strategy='naive'")
  mx.from_spec(c.adapt.mixture, c.adapt.steps)  # raises naming adapt.mixture's value
  if not isinstance(c.regression.eval_every, int) or c.regression.eval_every < 1:
    raise ValueError(f"regression.eval_every={c.regression.eval_every!r}: must be a positive integer")
  if not 0 < c.regression.threshold < 1:
    raise ValueError(f"regression.threshold={c.regression.threshold}: must be a fraction in (0, 1)")
  if c.lm.seq_len < 2 or c.text.cloze_context + 1 > c.lm.seq_len:
    raise ValueError(f"lm.seq_len={c.lm.seq_len}, text.cloze_context={c.text.cloze_context}: need "
                     "2 <= cloze_context + 1 <= seq_len")
  data, fsdp = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp)
  for section in ("pretrain", "adapt"):
    if c[section].batch_size % (data * fsdp):
      raise ValueError(f"{section}.batch_size={c[section].batch_size}: not divisible by the {data * fsdp} devices "
                       f"of the mesh (mesh.data={data}, mesh.fsdp={fsdp})")
  if c.distill.temperature <= 0 or c.distill.alpha < 0:
    raise ValueError(f"distill.alpha={c.distill.alpha}, distill.temperature={c.distill.temperature}: "
                     "need alpha >= 0 and temperature > 0")


# ----------------------------------------------------------------------------- data

class CPTData(NamedTuple):
  tokenizer: Any
  train: dict      # role -> int32 [N, L] train sequences
  doc_index: dict  # role -> int32 [N] document of each train sequence
  eval: dict       # split -> role -> int32 [n, L] fixed evaluation sequences
  cloze: dict      # split -> ClozeItems on held-out general prose
  num_docs: dict   # role -> number of train documents


def _subset(n: int, k: int, seed: int) -> np.ndarray:
  if k <= 0 or k >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def load_data(c) -> CPTData:
  """Both corpora, packed; fixed evaluation subsets and cloze items (all a function of the config)."""
  tok = load_tokenizer(c.lm.tokenizer)
  t = c.text
  domains = {role: textdata.load_domain(spec, tok, c.lm.seq_len, seed=t.split_seed, validation=t.validation,
                                        test=t.test, name=role)
             for role, spec in ((GENERAL, t.general), (DOMAIN, t.domain))}
  train, doc_index, evals = {}, {}, {"validation": {}, "test": {}}
  for i, (role, dom) in enumerate(domains.items()):
    tr = dom.splits["train"]
    keep = _subset(len(tr.tokens), t.max_train_sequences, 11 + i)
    train[role], doc_index[role] = tr.tokens[keep], tr.doc_index[keep]
    for j, split in enumerate(("validation", "test")):
      ev = dom.splits[split].tokens
      evals[split][role] = ev[_subset(len(ev), t.eval_sequences, 101 + 10 * i + j)]
  cloze = {split: textdata.make_cloze_items(domains[GENERAL].documents[split], tok, num_items=t.cloze_items,
                                            context_tokens=t.cloze_context, num_choices=t.cloze_choices,
                                            seed=7 + j)
           for j, split in enumerate(("validation", "test"))}
  return CPTData(tok, train, doc_index, evals, cloze,
                 {role: len(dom.documents["train"]) for role, dom in domains.items()})


# ----------------------------------------------------------------------------- model

def model_config(c, vocab_size: int):
  from cl_jax.models.transformer import model_config as named
  overrides = {k: int(c.lm[k]) for k in ("d_model", "num_layers", "num_heads") if c.lm[k]}
  return named(c.lm.size, vocab_size=vocab_size, max_len=c.lm.seq_len, compute_dtype=c.lm.compute_dtype,
               tied_embeddings=c.lm.tied_embeddings, **overrides)


class LM(NamedTuple):
  """The model as the loop sees it: how to build params from the base, and how to apply them."""
  apply: Callable        # (params, tokens) -> logits
  base_apply: Callable   # (base params, tokens) -> logits
  wrap: Callable         # base params -> trainable params pytree
  unwrap: Callable       # trainable params -> base params of the adapted model (for saving / reuse)
  trainable: Callable    # params -> bool pytree (None: all)


def make_lm(c, model, rng) -> LM:
  if c.adapt.method == "full":
    return LM(lambda p, x: model.apply(p, x), lambda p, x: model.apply(p, x), lambda p: p, lambda p: p,
              lambda p: None)
  from cl_jax.models import lora
  spec = lora.LoraSpec(rank=int(c.adapt.lora_rank), alpha=float(c.adapt.lora_alpha))
  lm = lora.LoraModel(model, spec)
  return LM(lambda p, x: lm.apply(p, x, adapter=DOMAIN), lambda p, x: model.apply(p, x),
            lambda base: lora.add_adapter(lora.lora_params(base), DOMAIN, rng, spec),
            lambda p: lora.merge_adapter(p, DOMAIN, spec)["base"],
            lambda p: lora.trainable_mask(p, DOMAIN))


def lm_fisher_diagonal(apply: Callable, params, sequences: np.ndarray) -> Any:
  """Empirical diagonal Fisher of an LM over sequences: F = mean_n (grad_theta l_n)^2, l_n the mean next-token
  NLL of sequence n (one per-example gradient per sequence, never the square of a batch gradient; see
  cl_jax.strategies.fisher). A `lax.scan` over sequences keeps memory at one gradient."""
  def seq_loss(p, tokens):
    logits = apply(p, tokens[None, :-1])
    loss, _ = next_token_metrics(logits, {"tokens": tokens[None]})
    return loss

  grad = jax.grad(seq_loss)

  @jax.jit
  def fisher(p, seqs):
    def body(acc, tokens):
      g = grad(p, tokens)
      return jax.tree.map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g), None
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p)
    total, _ = jax.lax.scan(body, zero, seqs)
    return jax.tree.map(lambda t: t / seqs.shape[0], total)

  return fisher(params, jnp.asarray(sequences))


def cpt_loss(apply: Callable, teacher_apply: Callable | None = None, alpha: float = 0.0,
             temperature: float = 1.0, ewc_lam: float = 0.0):
  """Next-token cross-entropy, plus `alpha * T^2 KL(teacher || student)` when distilling.

    L = CE(student) + alpha * T^2 * mean_t KL(softmax(z_base_t / T) || softmax(z_t / T))

  The teacher is the pre-adaptation model, held in the strategy state (`{'teacher': params}`), so it is
  sharded like the params and saved in every checkpoint.
  """

  def loss_fn(params, batch, ctx: LossContext):
    inputs = batch["tokens"][:, :-1]
    logits = apply(params, inputs)
    loss, aux = next_token_metrics(logits, batch)
    aux = {"ce": loss, "accuracy": aux["accuracy"]}
    if teacher_apply is not None and alpha > 0:
      kd = distillation_kl(logits, teacher_apply(ctx.strategy_state["teacher"], inputs), temperature)
      aux["distill_kl"] = kd
      loss = loss + alpha * kd
    if ewc_lam > 0:  # EWC (Kirkpatrick et al. 2017) around the base, Fisher over general text
      penalty = 0.5 * ewc_lam * ewc_penalty(params, ctx.strategy_state["ewc"])
      aux["ewc_penalty"] = penalty
      loss = loss + penalty
    return loss, aux

  return loss_fn


# ----------------------------------------------------------------------------- evaluation

def make_evaluator(apply: Callable, batch_size: int, mesh):
  """`evaluate(params, data, split) -> {'general/perplexity', ..., 'domain/accuracy', ...}`.

  Perplexity = exp(mean next-token NLL) over every predicted token of the fixed evaluation sequences;
  accuracy = top-1 next-token accuracy; cloze accuracy = fraction of cloze items whose true word has the
  highest summed log-likelihood among its choices (`cl_jax.data.text.make_cloze_items`).
  """
  size = -(-batch_size // mesh.size) * mesh.size

  @jax.jit
  def nll_batch(params, tokens, valid):
    logits = apply(params, tokens[:, :-1])
    targets = tokens[:, 1:]
    nll = token_cross_entropy(logits, targets)
    hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    w = valid[:, None].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(hit * w), jnp.sum(w) * targets.shape[1]

  @jax.jit
  def cloze_batch(params, context, choices, mask):
    b, k, w = choices.shape
    seq = jnp.concatenate([jnp.repeat(context[:, None], k, 1), choices], -1).reshape(b * k, -1)
    logits = apply(params, seq[:, :-1])
    c = context.shape[1]
    nll = token_cross_entropy(logits[:, c - 1:], seq[:, c:]).reshape(b, k, w)
    return -jnp.sum(nll * mask, -1)  # log-likelihood of each choice

  def pad(x, n):
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if len(x) < n else x

  def perplexity(params, tokens):
    s_nll = s_hit = s_n = 0.0
    for i in range(0, len(tokens), size):
      chunk = tokens[i:i + size]
      valid = pad(np.ones(len(chunk), bool), size)
      batch = sharding.put_batch({"t": pad(chunk, size), "v": valid}, mesh)
      a, h, n = nll_batch(params, batch["t"], batch["v"])
      s_nll, s_hit, s_n = s_nll + float(a), s_hit + float(h), s_n + float(n)
    return math.exp(s_nll / s_n), s_hit / s_n

  def cloze_accuracy(params, items):
    per = max(size // items.choices.shape[1], mesh.size)
    per = -(-per // mesh.size) * mesh.size
    scores = []
    for i in range(0, len(items.answer), per):
      sl = slice(i, i + per)
      n = len(items.answer[sl])
      batch = sharding.put_batch({"c": pad(items.context[sl], per), "x": pad(items.choices[sl], per),
                                  "m": pad(items.choice_mask[sl], per)}, mesh)
      scores.append(np.asarray(cloze_batch(params, batch["c"], batch["x"], batch["m"]))[:n])
    return float(np.mean(np.argmax(np.concatenate(scores), -1) == items.answer))

  def evaluate(params, data: CPTData, split: str = "validation") -> dict:
    out = {}
    for role in (GENERAL, DOMAIN):
      ppl, acc = perplexity(params, data.eval[split][role])
      out[f"{role}/perplexity"], out[f"{role}/accuracy"] = ppl, acc
    out["general/cloze_accuracy"] = cloze_accuracy(params, data.cloze[split])
    return out

  return evaluate


# ----------------------------------------------------------------------------- training

def _schedule(kind: str, lr: float, steps: int, warmup: float, decay: float, end: float, shape: str):
  if kind == "wsd":
    return wsd_schedule(lr, steps, warmup, decay, end, shape)
  if kind == "cosine":
    return cosine_schedule(lr, steps, warmup, end)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, max(int(round(warmup * steps)), 1)),
                               optax.constant_schedule(lr)], [int(round(warmup * steps))])


def generative_replay_pool(c, model, base_params, general_train: np.ndarray) -> np.ndarray:
  """Generative replay for LMs (Shin et al. 2017; Sun et al. 2020, LAMOL): the pre-adaptation model continues
  stored general prompts (the first `prompt_len` tokens of `num_prompts` general training sequences, chosen
  with the seed) to full sequence length, with the KV-cache sampler. The samples stand in for the general
  data during adaptation, so no real general text is replayed. Deterministic for a seed (resume regenerates
  the same pool)."""
  from cl_jax.lm.sampling import replay_batch
  g = c.generative_replay
  rows = _subset(len(general_train), g.num_prompts, 97 + c.seed)
  prompts = np.asarray(general_train[rows, :g.prompt_len])
  length = general_train.shape[1]
  key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 7)
  pool = []
  for i, start in enumerate(range(0, len(prompts), g.batch_size)):
    out = replay_batch(model, base_params, jnp.asarray(prompts[start:start + g.batch_size]),
                       jax.random.fold_in(key, i), max_new_tokens=length - g.prompt_len,
                       temperature=float(g.temperature))
    pool.append(np.asarray(out["tokens"], general_train.dtype))
  return np.concatenate(pool)


def adaptation_stages(c) -> list:
  """The adaptation mixture's stages; the two-phase switch sits exactly at the WSD decay start."""
  steps = c.adapt.steps
  decay_start = steps - int(round(c.optim.decay_fraction * steps))
  return mx.from_spec(c.adapt.mixture, steps, domain=DOMAIN, general=GENERAL,
                      stable_fraction=decay_start / steps)


@dataclasses.dataclass
class Phase:
  """One training phase's compiled pieces."""
  state: TrainState
  step_fn: Callable
  state_sh: Any
  sampler: mx.MixtureSampler
  schedule: Callable


def _init_phase(c, mesh, loss_fn, params, schedule, trainable, strategy_state, sampler, seed_offset) -> Phase:
  optimizer = build_optimizer(c.optim, schedule, trainable)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                     strategy_state=strategy_state,
                     rng=jax.random.fold_in(jax.random.PRNGKey(c.seed), seed_offset), task_index=jnp.int32(0))
  rep = sharding.replicated(mesh)
  state_sh = sharding.state_sharding(state, mesh)._replace(step=rep, rng=rep, task_index=rep)
  state = jax.device_put(state, state_sh)
  step_fn = compile_train_step(make_train_step(loss_fn, optimizer, schedule), state_sh,
                               sharding.batch_sharding(mesh), rep)
  return Phase(state, step_fn, state_sh, sampler, schedule)


def _progress(enabled: bool, total: int, initial: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def train_steps(phase: Phase, data_by_role: dict, mesh, start: int, end: int, log, name: str,
                log_every: int, progress: bool = False, on_step: Callable | None = None):
  """Runs steps [start, end) of a phase; `on_step(step_done, metrics) -> bool` (True: stop early)."""
  bar = _progress(progress, end, start, name)
  pending = []

  def flush():
    for step_no, m in jax.device_get(pending):
      rec = {"type": "train", "phase": name, "step": step_no, **{k: float(v) for k, v in m.items()}}
      if not np.isfinite(rec["loss"]):
        raise FloatingPointError(f"{name}: loss is {rec['loss']} at step {step_no}; stopping (lower optim.lr "
                                 "or adapt.lr_ratio, or set optim.grad_clip)")
      if log is not None:
        log(rec)
    if pending:
      bar.set_postfix(loss=f"{float(pending[-1][1]['loss']):.3f}")
    pending.clear()

  for s in range(start, end):
    batch = phase.sampler.batch(s, data_by_role)
    phase.state, metrics = phase.step_fn(phase.state, sharding.put_batch(batch, mesh))
    pending.append((s + 1, metrics))
    bar.update(1)
    if len(pending) >= log_every:
      flush()
    if on_step is not None and on_step(s + 1, batch):
      flush()
      bar.close()
      return s + 1
  flush()
  bar.close()
  return end


def pretrain(c, data: CPTData, model, params, mesh, log=None, progress=False):
  """Trains the base on general text only (cosine with warmup, peak `optim.lr`); returns params."""
  steps = c.pretrain.steps
  if steps == 0:
    return params
  schedule = cosine_schedule(c.optim.lr, steps, c.pretrain.warmup_fraction, c.pretrain.end_lr_fraction)
  sampler = mx.MixtureSampler(mx.constant({GENERAL: 1.0}), {GENERAL: len(data.train[GENERAL])},
                              c.pretrain.batch_size, seed=c.seed + 1000)
  loss_fn = cpt_loss(lambda p, x: model.apply(p, x))
  phase = _init_phase(c, mesh, loss_fn, params, schedule, None, (), sampler, 1)
  train_steps(phase, {GENERAL: data.train[GENERAL]}, mesh, 0, steps, log, "pretrain",
              c.train.log_every_steps, progress)
  return phase.state.params


# ----------------------------------------------------------------------------- checkpoints

def _params_manager(path: str, keep: int | None = None):
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=True, max_to_keep=keep))


def _latest_step(path: str):
  with _params_manager(path) as m:
    return m.latest_step()


def save_params(path: str, step: int, params) -> None:
  with _params_manager(path, 1) as m:
    if step in m.all_steps():  # a rerun writing the same step again (resume): replace it
      m.delete(step)
    m.save(step, args=ocp.args.StandardSave(params), force=True)
    m.wait_until_finished()


def load_params(path: str, like):
  """Restores the newest params under `path` into the structure / shardings of `like`."""
  with _params_manager(path) as m:
    step = m.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {path!r}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return m.restore(step, args=ocp.args.StandardRestore(abstract)), step


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class CPTResults:
  workdir: str
  record: dict

  def as_dict(self) -> dict:
    return self.record


def _pct(base: float, value: float, higher_better: bool) -> float:
  """Improvement in percent relative to base (> 0: better)."""
  return 100.0 * ((value - base) if higher_better else (base - value)) / base


def table_row(record: dict) -> dict:
  """The experiment-table row of a finished run (test split): domain gain and general regression in %."""
  base, kept, final = record["test"]["base"], record["test"]["best"], record["test"]["final"]
  return {
      "mixture": record["mixture"], "schedule": record["schedule"], "method": record["method"],
      "strategy": record["strategy"], "seed": record["seed"],
      "domain_ppl_gain_pct": _pct(base["domain/perplexity"], kept["domain/perplexity"], False),
      "general_ppl_regression_pct": -_pct(base["general/perplexity"], kept["general/perplexity"], False),
      "general_acc_regression_pct": -_pct(base["general/accuracy"], kept["general/accuracy"], True),
      "cloze_regression_pct": -_pct(base["general/cloze_accuracy"], kept["general/cloze_accuracy"], True),
      "final_domain_ppl_gain_pct": _pct(base["domain/perplexity"], final["domain/perplexity"], False),
      "final_general_ppl_regression_pct": -_pct(base["general/perplexity"], final["general/perplexity"], False),
      "stopped": record["stopped"] is not None,
      "stopped_step": None if record["stopped"] is None else record["stopped"]["step"],
      "stopped_metrics": None if record["stopped"] is None else record["stopped"]["metrics"],
      "best_step": record["best_step"], "steps_run": record["steps_run"],
  }


def _prepare_workdir(c, workdir: str, overwrite: bool) -> bool:
  from cl_jax.train.loop import prepare_workdir
  return prepare_workdir(c, workdir, overwrite)


def run(config, workdir: str, overwrite: bool = False, progress: bool = True,
        data: CPTData | None = None) -> CPTResults:
  """Continual pre-training end to end (see the module docstring); `data` skips reloading the corpora."""
  c = config
  check_config(c)
  resume = _prepare_workdir(c, workdir, overwrite)
  sharding.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  ckpt_root = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not resume:
    from cl_jax.train.loop import config_dict
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict(c), f, indent=2, sort_keys=True)

  data = data or load_data(c)
  from cl_jax.models.transformer import build_lm
  cfg = model_config(c, data.tokenizer.vocab_size)
  model, params = build_lm(cfg, seed=c.seed)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
  params = jax.device_put(params, sharding.state_sharding(params, mesh))
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))

  log_path = os.path.join(workdir, "metrics.jsonl")
  log_file = None

  def log(rec):
    log_file.write(json.dumps(rec) + "\n")

  def reopen_log(keep: Callable[[dict], bool]):
    """Keeps the records `keep` accepts (a rerun logs the rest again, identically) and reopens for append."""
    nonlocal log_file
    if log_file is not None:
      log_file.close()
    kept = []
    if os.path.exists(log_path):
      with open(log_path) as f:
        kept = [line for line in f if keep(json.loads(line))]
    with open(log_path, "w") as f:
      f.writelines(kept)
    log_file = open(log_path, "a")

  # --- the base model
  base_path = os.path.join(ckpt_root, "base")
  t_pre = time.time()
  have_base = os.path.isdir(base_path) and _latest_step(base_path) is not None
  if resume and have_base:
    params, _ = load_params(base_path, params)
  elif c.pretrain.base_dir:
    params, _ = load_params(os.path.join(os.path.abspath(c.pretrain.base_dir), "checkpoints", "base"), params)
    save_params(base_path, 0, params)
  else:
    reopen_log(lambda rec: False)
    params = pretrain(c, data, model, params, mesh, log, progress)
    save_params(base_path, c.pretrain.steps, params)
  base_params = params
  pretrain_seconds = time.time() - t_pre

  # --- adaptation set-up
  lm = make_lm(c, model, jax.random.fold_in(jax.random.PRNGKey(c.seed), 2))
  evaluate = make_evaluator(lm.apply, c.regression.eval_batch_size, mesh)
  # Full fine-tuning applies the model the same way before and after: one compiled evaluator serves both.
  evaluate_base = (evaluate if c.adapt.method == "full" else
                   make_evaluator(lm.base_apply, c.regression.eval_batch_size, mesh))
  baseline = evaluate_base(base_params, data, "validation")
  counts = {"general/cloze_accuracy": len(data.cloze["validation"].answer)}
  monitor = RegressionMonitor(baseline, c.regression.threshold, select=c.regression.select,
                              patience=c.regression.patience,
                              min_z=c.regression.min_z, counts=counts, hard_stop=c.regression.hard_stop)

  orders = None
  if c.adapt.difficulty:
    orders = {DOMAIN: difficulty_order_for(lm.base_apply, base_params, data, c.regression.eval_batch_size, mesh)}
  adapt_train = data.train
  if c.strategy == "generative_replay":
    adapt_train = {**data.train, GENERAL: generative_replay_pool(c, model, base_params, data.train[GENERAL])}
  stages = adaptation_stages(c)
  sampler = mx.MixtureSampler(stages, {GENERAL: len(adapt_train[GENERAL]), DOMAIN: len(adapt_train[DOMAIN])},
                              c.adapt.batch_size, seed=c.seed, orders=orders)
  steps = c.adapt.steps
  lr = c.optim.lr * c.adapt.lr_ratio
  schedule = _schedule(c.optim.schedule, lr, steps, c.optim.warmup_fraction, c.optim.decay_fraction,
                       c.optim.end_lr_fraction, c.optim.decay_shape)
  distill = c.strategy == "distill"
  use_ewc = c.strategy == "ewc"
  loss_fn = cpt_loss(lm.apply, lm.base_apply if distill else None, c.distill.alpha, c.distill.temperature,
                     float(c.ewc.lam) if use_ewc else 0.0)
  # Copies: the step donates its state, and the base must survive for the baseline, the teacher and the
  # final comparison.
  adapt_params = jax.tree.map(lambda p: jnp.array(p, copy=True), lm.wrap(base_params))
  sstate = {"teacher": jax.tree.map(lambda p: jnp.array(p, copy=True), base_params)} if distill else ()
  if use_ewc:
    rows = _subset(len(data.train[GENERAL]), int(c.ewc.num_sequences), 131 + c.seed)
    sstate = {"ewc": dict(fisher=lm_fisher_diagonal(lm.base_apply, base_params, data.train[GENERAL][rows]),
                          anchor=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), base_params),
                          const=jnp.zeros((), jnp.float32))}
  phase = _init_phase(c, mesh, loss_fn, adapt_params, schedule, lm.trainable(adapt_params), sstate, sampler, 3)

  adapt_mgr = ocp.CheckpointManager(os.path.join(ckpt_root, "adapt"), options=ocp.CheckpointManagerOptions(
      create=True, max_to_keep=c.checkpoint.keep))
  best_path = os.path.join(ckpt_root, "best")
  start = 0
  mixture_log = []
  if resume and adapt_mgr.latest_step() is not None:
    step = adapt_mgr.latest_step()
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), phase.state,
                            phase.state_sh)
    restored = adapt_mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
    phase.state = restored.state
    monitor.load_state_dict(restored.meta["monitor"])
    mixture_log = restored.meta["mixture"]
    start = int(phase.state.step)
    reopen_log(lambda rec: rec.get("phase") == "pretrain" or rec["step"] <= start)
    print(f"Resuming {workdir} at adaptation step {start}.")
  else:
    reopen_log(lambda rec: rec.get("phase") == "pretrain")
    monitor.check(0, baseline)  # the base itself is the in-threshold fallback
    log({"type": "eval", "phase": "adapt", "step": 0, **baseline, "regressions": monitor.history[-1]["regressions"]})
    save_params(best_path, 0, lm.unwrap(phase.state.params))

  counts_acc = np.zeros(2, np.int64)
  last_eval = [start]

  def on_step(step_done: int, batch) -> bool:
    counts_acc[:] += np.bincount(batch["domain"], minlength=2)
    if step_done % c.regression.eval_every and step_done != steps:
      return False
    metrics = evaluate(phase.state.params, data, "validation")
    verdict = monitor.check(step_done, metrics)
    realised = {d: float(n) / max(counts_acc.sum(), 1) for d, n in zip(sampler.domains, counts_acc)}
    configured = sampler.weights_at(step_done - 1)
    mixture_log.append({"start": last_eval[0], "end": step_done, "realised": realised,
                        "configured_at_end": configured})
    log({"type": "eval", "phase": "adapt", "step": step_done, **metrics, "regressions": verdict.regressions,
         "crossed": verdict.crossed, "realised_mixture": realised, "lr": float(schedule(step_done - 1))})
    counts_acc[:] = 0
    last_eval[0] = step_done
    if verdict.is_best:
      save_params(best_path, step_done, lm.unwrap(phase.state.params))
    log_file.flush()
    adapt_mgr.save(step_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(phase.state),
        meta=ocp.args.JsonSave({"monitor": monitor.state_dict(), "mixture": mixture_log})), force=True)
    if step_done == int(os.environ.get(CRASH_ENV, "-1")):
      adapt_mgr.wait_until_finished()
      log_file.flush()
      raise SimulatedCrash(f"{CRASH_ENV}={step_done}")
    return bool(c.regression.hard_stop and monitor.should_stop)

  t_adapt = time.time()
  steps_run = start
  if not (resume and monitor.should_stop and c.regression.hard_stop):
    steps_run = train_steps(phase, adapt_train, mesh, start, steps, log, "adapt", c.train.log_every_steps,
                            progress, on_step)
  adapt_mgr.wait_until_finished()
  adapt_mgr.close()
  adapt_seconds = time.time() - t_adapt

  # --- final measurements on the test split
  best_params, best_step = load_params(best_path, lm.unwrap(phase.state.params))
  test = {"base": evaluate_base(base_params, data, "test"), "best": evaluate_base(best_params, data, "test"),
          "final": evaluate(phase.state.params, data, "test")}
  record = {
      "mixture": c.adapt.mixture + ("+difficulty" if c.adapt.difficulty else ""),
      "stages": [[s, dict(zip(sampler.domains, w))] for s, w in sampler.stages],
      "schedule": c.optim.schedule, "method": c.adapt.method, "strategy": c.strategy, "seed": c.seed,
      "adapt_lr": lr, "pretrain_lr": c.optim.lr, "num_params": num_params, "model": dataclasses.asdict(cfg),
      "baseline": baseline, "threshold": c.regression.threshold,
      "stopped": monitor.stopped, "best_step": best_step,
      "best_checkpoint": os.path.join(best_path, str(best_step)), "steps_run": steps_run,
      "monitor": monitor.describe(), "history": monitor.history, "realised_mixture": mixture_log,
      "test": test, "timing": {"pretrain_seconds": pretrain_seconds, "adapt_seconds": adapt_seconds,
                               "total_seconds": time.time() - t0},
  }
  if c.adapt.method == "lora":
    base_now = phase.state.params["base"]
    record["lora_base_unchanged"] = bool(all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), base_now, base_params))))
  record["row"] = table_row(record)
  log_file.close()
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(record, f, indent=2)
  plot_monitor(monitor.history, baseline, c.regression.threshold, os.path.join(workdir, "monitor.png"),
               title=f"{record['mixture']} / {record['schedule']} / {c.adapt.method} / {c.strategy}",
               stopped_step=None if monitor.stopped is None else monitor.stopped["step"], best_step=best_step)
  print(open(write_summary(workdir, record)).read())
  return CPTResults(workdir, record)


def difficulty_order_for(apply, params, data: CPTData, batch_size: int, mesh) -> np.ndarray:
  """Domain train sequences ordered by their document's base-model perplexity (moderate first)."""
  tokens, doc = data.train[DOMAIN], data.doc_index[DOMAIN]

  @jax.jit
  def seq_nll(p, t):
    return jnp.mean(token_cross_entropy(apply(p, t[:, :-1]), t[:, 1:]), -1)

  size = -(-batch_size // mesh.size) * mesh.size
  nll = []
  for i in range(0, len(tokens), size):
    chunk = tokens[i:i + size]
    padded = np.concatenate([chunk, np.zeros((size - len(chunk), tokens.shape[1]), tokens.dtype)])
    nll.append(np.asarray(seq_nll(params, sharding.put_batch(padded, mesh)))[:len(chunk)])
  nll = np.concatenate(nll)
  num_docs = int(doc.max()) + 1
  sums = np.bincount(doc, weights=nll, minlength=num_docs)
  n = np.maximum(np.bincount(doc, minlength=num_docs), 1)
  return mx.difficulty_order(doc, np.exp(sums / n))


def write_summary(workdir: str, record: dict) -> str:
  row = record["row"]
  lines = [f"# Continual pre-training: {row['mixture']}, {row['schedule']}, {row['method']}, {row['strategy']}",
           "", record["monitor"], "",
           "Test split; kept = the best checkpoint inside the regression threshold "
           f"(step {row['best_step']}), final = step {row['steps_run']}.", "",
           "| model | general ppl | general acc | cloze acc | domain ppl | domain acc |",
           "|---|---|---|---|---|---|"]
  for name in ("base", "best", "final"):
    m = record["test"][name]
    lines.append(f"| {name} | {m['general/perplexity']:.3f} | {100 * m['general/accuracy']:.2f} | "
                 f"{100 * m['general/cloze_accuracy']:.1f} | {m['domain/perplexity']:.3f} | "
                 f"{100 * m['domain/accuracy']:.2f} |")
  lines += ["", f"Kept model: domain perplexity gain {row['domain_ppl_gain_pct']:+.2f}%, general perplexity "
                f"regression {row['general_ppl_regression_pct']:+.2f}%.", ""]
  path = os.path.join(workdir, "summary.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


__all__ = ["default_config", "check_config", "load_data", "CPTData", "make_lm", "cpt_loss", "make_evaluator",
           "pretrain", "adaptation_stages", "run", "CPTResults", "table_row", "difficulty_order_for",
           "save_params", "load_params"]
