"""The language-model run's config (`kind='lm'`): its default and its validation.

The strategy sections are the classic path's own (`lora.*`, `ewc.*`, `fisher.*`, `distill.*`, and every other
section a registered strategy owns), so a strategy reads the same keys whichever kind of run it is in. What is
LM-specific:

  lm          the model (size preset and overrides, sequence length, tokenizer, compute dtype)
  text        the two corpora (`general`, `domain`: the shorthand for two sources), their splits, evaluation
              subsets and cloze items
  data        any number of sources (`data.sources`, each general or domain) and the adaptation mixture's stages
              over them (`data.stages`), with a default evaluation budget per source (`data.eval_tokens`)
  pretrain    task 1: the base, trained on general text (or loaded from `base_dir`)
  adapt       task 2: adaptation on the mixture `adapt.mixture`, peak LR `adapt.lr_ratio * optim.lr`
  regression  the regression monitor (cl_jax.lm.monitor): threshold, evaluation interval, hard stop, benchmarks
"""
from __future__ import annotations

import ml_collections

from cl_jax import sharding
from cl_jax.config import COMMON_SCHEMA, integer, number, one_of
from cl_jax.data import mixture as mx
from cl_jax.data import prepare
from cl_jax.models.transformer import SIZES
from cl_jax.train.optim import OPTIMIZERS

from cl_jax.lm.data import DOMAIN, EVAL_TOKENS, GENERAL  # noqa: F401  (the two roles of an LM run's sources)

# What an LM run gives a strategy (cl_jax.strategies.CAPABILITIES); the strategies it chains are those whose needs
# these meet (`lm_strategies()`). Token logits [B, L, V] and fixed-length sequences (a buffer can keep them, and each
# is one example for per-example gradients), a mixture with each row's corpus, the step's hooks, `prepare` with
# its trainable mask, the optimizer reset. No class labels or class logits (replay of real general data is the
# mixture itself), no task id at evaluation, no `predict` in the LM evaluator, no `train_tasks` (the mixture decides).
LM_PROVIDES = frozenset({"token_logits", "per_example", "input_buffer", "mixture", "step_hooks", "model_rewrite",
                         "reset_optimizer"})
# Penalties on every parameter: with an adapter (`prepare`) the base is frozen already.
PARAM_PENALTIES = ("ewc", "online_ewc", "si", "mas")


def lm_strategies() -> list[str]:
  """The registered strategies an LM run can chain (computed from their needs and LM_PROVIDES)."""
  from cl_jax.strategies import allowed
  return allowed(LM_PROVIDES)
FISHER_KINDS = ("empirical", "sampled", "batched")


def default_config() -> ml_collections.ConfigDict:
  """The full LM config (locked: a misspelt key is an error). `configs/cpt_lm.py` starts from this."""
  from cl_jax.models.lora import default_config as lora_config
  from cl_jax.strategies import default_configs
  c = ml_collections.ConfigDict()
  c.kind = "lm"
  c.seed = 0
  c.strategy = "naive"  # a '+' chain of lm_strategies(), e.g. 'lora', 'distill', 'ewc', 'si', 'agem', 'olora'
  c.lm = ml_collections.ConfigDict(dict(
      size="tiny", d_model=0, num_layers=0, num_heads=0,  # 0: the size's default
      seq_len=128, tokenizer="byte", tied_embeddings=True,
      mlp="",  # '' = the size's own (gelu); 'swiglu' (with rmsnorm + RoPE: a Llama model lm.export_hf can write)
      # '' = the size's own (bfloat16 for 1b, float32 below); 'float32' | 'bfloat16' override it.
      compute_dtype="",
      # Scale (H9, issue 9 item 2): remat none|full|dots, layers under one lax.scan, params float32 (default) or
      # bfloat16 with a float32 master copy in the optimizer (cl_jax.train.precision).
      # attn_chunk > 0: attention over query blocks of that size, each rematerialised (long sequences).
      remat="none", scan_layers=False, param_dtype="float32", attn_chunk=0,
      # A Hugging Face checkpoint directory to start from (cl_jax.models.hf_checkpoint): its architecture and
      # tokenizer replace size / d_model / num_layers / num_heads / tokenizer / tied_embeddings; '' = a new model.
      init_from="",
      # The token packed between documents: '' = the tokenizer's end-of-text (an instruct checkpoint's too, not its
      # chat end-of-turn token; cl_jax.lm.data.run_tokenizer), else a token string of the vocabulary.
      doc_separator="",
      # Write the kept (best) model to <workdir>/hf in the Hugging Face layout (+ <workdir>/hf_adapter, PEFT, for
      # lora / olora): an imported model in its own layout, a new one when a family holds it (lm.runner.export_hf).
      export_hf=True))
  c.text = ml_collections.ConfigDict(dict(
      general="general", domain="code",  # domain specs (cl_jax.data.text.load_domain)
      # Document groups (source files) per split; 15% each gives the general corpus ~40-50 groups and ~150K
      # tokens per evaluation split at seq_len 128 (5% gave 10-18 groups: validation and test disagreed in sign).
      split_seed=0, validation=0.15, test=0.15,
      max_train_sequences=0,             # 0: all; else a fixed random subset of each domain's train split
      eval_sequences=256,                # fixed random subset of the domain's validation / test (0: all)
      general_eval_sequences=0,          # the same for general text (0: all; the monitor's power grows with it)
      cloze_items=400, cloze_context=48, cloze_choices=4))
  # The classic `optim` keys; `schedule` / fractions shape the adaptation LR (pre-training is cosine).
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, b1=0.9, b2=0.95, momentum=0.9, weight_decay=0.0, grad_clip=1.0,
      schedule="wsd", scope="task", warmup_fraction=0.05, decay_fraction=0.25, end_lr_fraction=0.0,
      decay_shape="linear"))
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, warmup_fraction=0.05, end_lr_fraction=0.1,
      base_dir=""))  # a finished LM run's workdir whose base to start from instead of pre-training
  c.adapt = ml_collections.ConfigDict(dict(steps=400, batch_size=16, lr_ratio=0.1, mixture="70_30",
                                           difficulty=False))
  # Sources beyond the two of `text` (cl_jax.lm.data.run_sources): `sources = {name: spec}` or `{name: {'spec',
  # 'role': 'general' | 'domain', 'eval_sequences'}}` (empty: text.general / text.domain); `stages` = [[start_step,
  # {source: weight}], ...] (levanter's convention; empty: the preset `adapt.mixture` over the roles); a source
  # that states no eval_sequences is scored on floor(eval_tokens / lm.seq_len) sequences per split.
  c.data = ml_collections.ConfigDict(dict(sources=ml_collections.ConfigDict(), stages=[],
                                          eval_tokens=EVAL_TOKENS))
  c.lora = lora_config()
  for name, default in default_configs().items():
    c[name] = default()
  # EWC on the LM: Fisher of the base over general training sequences (per-sequence gradients of the mean
  # token NLL, squared and averaged: the empirical kind), anchored at the base.
  c.ewc.lam = 1000.0
  c.fisher.kind = "empirical"
  c.fisher.num_samples = 256
  # MAS the same way: per-sequence gradients of the squared norm of the token logits, over 256 general sequences.
  c.mas.num_examples = 256
  # A-GEM: a reservoir memory of general sequences (a sequence has no class label to balance on), and a reference
  # gradient on as many memory sequences as a batch holds (the classic 256 would cost 16 steps' compute per step).
  c.agem.policy = "reservoir"
  c.agem.batch_size = 16
  # DER on an LM keeps every stored row's next-token logits [seq_len - 1, vocab]: capacity x L x V floats (128 x 127 x
  # 256 x 4 bytes = 17 MB for the byte model); keep it small for a large vocabulary.
  c.der.capacity = 128
  c.regression = ml_collections.ConfigDict(dict(
      threshold=0.02, eval_every=500, hard_stop=True, patience=1, select="domain/perplexity",
      eval_batch_size=64,
      # The paired decision (cl_jax.lm.monitor): an evaluation whose `confidence` interval on a general metric's
      # relative regression lies beyond `threshold` is never kept; beyond `stop_threshold` the run stops (a re-warmed
      # LR makes general loss dip past 2% and recover: stopping there returned the base); `keep` picks the kept one.
      confidence=0.95, interval="bootstrap", bootstrap_samples=2000, keep="not_regressed", stop_threshold=0.05,
      # Benchmarks measured before the first adaptation step and at every evaluation (cl_jax.lm.benchmarks):
      # None, a list of builtin names / .jsonl paths (general, 2 points each), a mapping name -> settings or a list
      # of settings with 'name' ({'threshold': 2.0, 'role': 'general' | 'domain', 'metric': None, ...}).
      benchmarks=None))
  # divergence_factor > 0: stop when a loss exceeds that many times its early value (cl_jax.train.loop).
  # grad_accum: micro-batches per optimizer step (the batch is split k ways; same update, 1/k activations).
  c.train = ml_collections.ConfigDict(dict(log_every_steps=25, log_norms=True, divergence_factor=100.0,
                                           grad_accum=1))
  # every_steps: rolling checkpoints of pre-training (0: none mid-way; adaptation saves at every evaluation).
  # Retention (cl_jax.checkpoint.Checkpoints.retain): keep the newest `keep` rolling (mid-task) checkpoints and
  # `keep_tasks` task-boundary ones (0: all; step 0's, the base the test split compares with, always stays), and
  # the best (`keep_best`), which holds the params alone: it serves the test split and the HF export, never a
  # resume. keep_best=False keeps none and the kept model is the final one.
  # async_save=False: each save's write finishes before training goes on (its buffers never overlap a step's);
  # on the CPU backend saves are synchronous whatever it says (cl_jax.checkpoint.host_is_device).
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2, keep_tasks=0, keep_best=True,
                                                async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.distributed = sharding.distributed_config()  # multi-host timeouts (cl_jax/sharding.py)
  # Issue 10 items 4-5 (stages before the adaptation): vocabulary extension, long-context extension.
  from cl_jax.lm.long_context import default_long_context_config
  from cl_jax.lm.vocab import default_vocab_config
  c.vocab = default_vocab_config()
  c.long_context = default_long_context_config()
  c.lock()
  c.data.sources.unlock()  # named by the user: `c.data.sources.code = "cache:/path"`
  return c


# One rule per key (cl_jax.config.check_schema, run by cl_jax.kinds.validate before `check_config`).
SCHEMA = {
    **COMMON_SCHEMA,
    "adapt.steps": integer(1), "adapt.batch_size": integer(1), "adapt.lr_ratio": number(0, low_open=True),
    "pretrain.steps": integer(0), "pretrain.batch_size": integer(1),
    "pretrain.warmup_fraction": number(0, 1), "pretrain.end_lr_fraction": number(0, 1),
    "optim.name": one_of(OPTIMIZERS),
    "regression.eval_every": integer(1), "regression.eval_batch_size": integer(1), "regression.patience": integer(1),
    "regression.threshold": number(0, 1, low_open=True, high_open=True),
    "regression.bootstrap_samples": integer(100),
    "text.validation": number(0, 0.5, low_open=True, high_open=True),
    "text.test": number(0, 0.5, low_open=True, high_open=True),
    "text.eval_sequences": integer(0), "text.general_eval_sequences": integer(0), "data.eval_tokens": integer(1),
    "lm.attn_chunk": integer(0), "train.grad_accum": integer(1), "checkpoint.keep_tasks": integer(0),
    "lm.size": one_of(tuple(SIZES)),
}


def check_config(c) -> None:
  """What one key's rule cannot say (SCHEMA has those): the strategy chain, keys that must agree, files; raises
  ValueError whose message starts with the full key."""
  from cl_jax.strategies import REGISTRY, check_allowed
  from cl_jax.train.schedules import check_schedule
  if c.kind != "lm":
    raise ValueError(f"kind={c.kind!r}: cl_jax.lm runs kind='lm' configs")
  names = check_allowed(c.strategy, LM_PROVIDES, "lm", config=c,
                        hint=" (replay of real general data is the mixture itself: adapt.mixture)")
  penalties = [n for n in names if n in PARAM_PENALTIES]
  adapters = [n for n in names if "model_rewrite" in REGISTRY[n].needs]
  if penalties and adapters:
    raise ValueError(f"strategy={c.strategy!r}: {penalties[0]} with {adapters[0]}; the adapter's base is frozen "
                     "already")
  if "si" in names and (c.pretrain.base_dir or c.lm.init_from or int(c.pretrain.steps) == 0
                        or int(c.vocab.extend) > 0):
    raise ValueError(f"strategy={c.strategy!r}: SI's importance is the path integral of the base's own pre-training "
                     "(Zenke et al. 2017), so the base must be pre-trained in this run: pretrain.steps > 0, no "
                     "pretrain.base_dir or lm.init_from, no vocab.extend (it reshapes the params)")
  if {"ewc", "online_ewc"} & set(names) and c.fisher.kind not in FISHER_KINDS:
    raise ValueError(f"fisher.kind={c.fisher.kind!r}: an LM predicts a label per token, so the exact Fisher "
                     f"(a sum over every label sequence) is out of reach; expected one of {FISHER_KINDS}")
  check_schedule(c.optim)
  mx.from_spec(c.adapt.mixture, c.adapt.steps)  # raises naming adapt.mixture's value
  sources = check_data_keys(c)
  check_regression_keys(c)
  if c.lm.seq_len < 2 or c.text.cloze_context + 1 > c.lm.seq_len:
    raise ValueError(f"lm.seq_len={c.lm.seq_len}, text.cloze_context={c.text.cloze_context}: need "
                     "2 <= cloze_context + 1 <= seq_len")
  if not c.text.validation + c.text.test < 0.9:
    raise ValueError(f"text.validation + text.test = {c.text.validation + c.text.test}: leave at least 10% to train")
  check_scale_keys(c)
  # The corpora's files are listed (not read) here, so a missing directory or an empty glob fails before the
  # workdir is made; a file that is not UTF-8 is found when the corpus is read (build, still before any write).
  for s in sources:
    prepare.check_spec(s.spec, f"text.{s.name}" if not c.data.sources else f"data.sources.{s.name}")
  from cl_jax.lm.long_context import check_long_context_config
  from cl_jax.lm.vocab import check_vocab_config
  check_vocab_config(c)
  check_long_context_config(c)
  if c.lm.init_from:
    from cl_jax.models import hf_checkpoint
    hf_checkpoint.check(c.lm.init_from, "lm.init_from", seq_len=int(c.lm.seq_len))
  if c.lm.mlp not in ("", "gelu", "swiglu"):
    raise ValueError(f"lm.mlp={c.lm.mlp!r}: expected '' (the size's own), 'gelu' or 'swiglu'")
  if c.lm.doc_separator:
    from cl_jax.lm.data import run_tokenizer
    run_tokenizer(c)  # the token exists (reads the tokenizer file only)
  data, fsdp = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp)
  accum = int(c.train.grad_accum)
  for section in ("pretrain", "adapt"):
    if c[section].batch_size % (data * fsdp * accum):
      raise ValueError(f"{section}.batch_size={c[section].batch_size}: not divisible by the {data * fsdp} devices "
                       f"of the mesh (mesh.data={data}, mesh.fsdp={fsdp}) times train.grad_accum={accum}")
  seen = set()
  for name in names:
    check = REGISTRY[name].check_config if name in REGISTRY else None
    if check is not None and check not in seen:
      seen.add(check)
      check(c)


def check_data_keys(c) -> tuple:
  """`data.sources` / `data.stages` (cl_jax.lm.data.run_sources, cl_jax.data.mixture.check_stages): returns the
  run's sources; ConfigError naming the key on a bad entry, an unknown source or weight in a stage, a corpus named
  both ways, or a stage that could not apply."""
  from cl_jax.errors import ConfigError
  from cl_jax.lm.data import run_sources
  sources = run_sources(c)
  if c.data.sources:
    ref = default_config().text
    both = [k for k in ("general", "domain") if c.text[k] != ref[k]]
    if both:
      raise ConfigError(f"text.{both[0]}={c.text[both[0]]!r} and data.sources both name corpora; with data.sources "
                        "set, name every source there (text.general / text.domain are its two-source shorthand)")
    if int(c.vocab.extend) > 0:
      raise ConfigError(f"vocab.extend={c.vocab.extend}: the extension learns its tokens on text.domain; with "
                        "data.sources set, leave vocab.extend=0")
  if c.data.stages:
    mx.check_stages(c.data.stages, [s.name for s in sources], int(c.adapt.steps))
  return sources


def check_regression_keys(c) -> None:
  """regression.confidence / interval / bootstrap_samples / keep / stop_threshold (cl_jax.lm.monitor), benchmarks
  (cl_jax.lm.benchmarks)."""
  from cl_jax.lm.monitor import INTERVALS, KEEP_RULES
  r = c.regression
  if not 0 < r.confidence < 1:
    raise ValueError(f"regression.confidence={r.confidence}: must be in (0, 1), e.g. 0.95")
  if r.interval not in INTERVALS:
    raise ValueError(f"regression.interval={r.interval!r}: expected one of {INTERVALS}")
  if not 0 < r.stop_threshold < 1:
    raise ValueError(f"regression.stop_threshold={r.stop_threshold}: must be a fraction in (0, 1) (the stop uses "
                     "max(regression.threshold, regression.stop_threshold))")
  if r.keep not in KEEP_RULES:
    raise ValueError(f"regression.keep={r.keep!r}: expected one of {KEEP_RULES}")
  if r.get("benchmarks") is not None:  # every set loaded (a user's file read) and its metric checked, before work
    from cl_jax.lm.benchmarks import load_all
    from cl_jax.lm.data import run_tokenizer
    load_all(r.benchmarks, max_len=int(c.lm.seq_len), tokenizer=run_tokenizer(c))


def check_scale_keys(c) -> None:
  """lm.compute_dtype / remat / scan_layers / param_dtype and train.grad_accum (cl_jax.models.transformer)."""
  from cl_jax.models.transformer import REMAT_POLICIES
  from cl_jax.train.precision import check_param_dtype
  if c.lm.compute_dtype not in ("", "float32", "bfloat16"):
    raise ValueError(f"lm.compute_dtype={c.lm.compute_dtype!r}: expected '' (the size's own), 'float32' or "
                     "'bfloat16'")
  if c.lm.remat not in REMAT_POLICIES:
    raise ValueError(f"lm.remat={c.lm.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
  check_param_dtype(c.lm.param_dtype, "lm.param_dtype")


__all__ = ["default_config", "check_config", "check_scale_keys", "check_regression_keys", "check_data_keys", "GENERAL",
           "DOMAIN", "LM_PROVIDES", "lm_strategies", "FISHER_KINDS"]
