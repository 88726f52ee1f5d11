"""Long-context extension as a continual-pre-training stage (issue 10 item 5): stretch RoPE, train on longer text.

A model pre-trained on sequences of `lm.seq_len` tokens is adapted to `long_context.seq_len` (> lm.seq_len) tokens by
changing its rotary position encoding (Su et al. 2021; no parameter changes: RoPE has none) and continuing training
on sequences of the new length, with the regression monitor guarding the model's *short-context* general metrics
(the adaptation's usual evaluation at `lm.seq_len`). RoPE rotates the pair i of a head by `pos * f_i`,
`f_i = theta^(-2i/Dh)`; with s = `long_context.factor` (0: seq_len / lm.seq_len) the stage sets

  none     theta and f unchanged: only the training length grows (the control);
  ntk      "NTK-aware" scaling (bloc97 2023; Peng et al. 2023, YaRN, sec. 3.1): theta' = theta * s^(Dh / (Dh - 2)),
           so the lowest frequency is interpolated by s while the highest is kept;
  linear   position interpolation (Chen et al. 2023): f_i' = f_i / s, positions squeezed into the trained range;
  llama3   interpolation by parts (the Llama 3.1 recipe, YaRN's "NTK-by-parts" without its attention temperature):
           wavelengths above lm.seq_len are divided by s, those below lm.seq_len / 4 kept, a ramp between;
  and `long_context.rope_base` > 0 sets theta itself ("adjusted base frequency": Xiong et al. 2023 raise it to 5e5),
  on top of which a scaling above still applies.

The stage is the adaptation phase of the LM run (`cl_jax.lm.runner`): the same mixture, strategies, monitor and
checkpoints, with the training data re-packed at the long length, `long_context.batch_size` sequences per step
(0: as many tokens per step as the short adaptation), and two more evaluation roles, `long_general` and
`long_domain` (perplexity at the long length; not guarded: the monitor's general metrics are the `general/` ones).
Select the kept checkpoint by long-context quality with `regression.select='long_domain/perplexity'`.
The monitor's baseline is the model *before* the RoPE change (`adapt_phase(baseline_model=...)` evaluates the original
at the first evaluation), so a scaling that hurts short context is caught from the start; `<workdir>/long_context.json`
records the RoPE settings before and after. An imported model's Hugging Face export carries the new RoPE parameters.
"""
from __future__ import annotations

import copy
import json
import os

import ml_collections
import numpy as np

SCALINGS = ("none", "ntk", "linear", "llama3")
LONG_ROLES = {"general": "long_general", "domain": "long_domain"}


def default_long_context_config() -> ml_collections.ConfigDict:
  """The `long_context` section of an LM config (`cl_jax.lm.config.default_config`)."""
  return ml_collections.ConfigDict(dict(
      seq_len=0,            # 0: off; else the adaptation trains on sequences of this many tokens (> lm.seq_len)
      scaling="none",       # none | ntk | linear | llama3 (module docstring)
      factor=0.0,           # the scaling's s (0: seq_len / lm.seq_len)
      rope_base=0.0,        # > 0: set RoPE's theta to this (0: keep the model's)
      batch_size=0,         # sequences per step (0: adapt.batch_size * lm.seq_len // seq_len, the same tokens)
      eval_sequences=64))   # long sequences per role in validation / test (0: all)


def stage_batch_size(c) -> int:
  lc = c.long_context
  return int(lc.batch_size) or max(1, int(c.adapt.batch_size) * int(c.lm.seq_len) // int(lc.seq_len))


def check_long_context_config(c) -> None:
  lc = c.long_context
  for key in ("seq_len", "batch_size", "eval_sequences"):
    v = lc[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"long_context.{key}={v!r}: must be an integer >= 0")
  if lc.scaling not in SCALINGS:
    raise ValueError(f"long_context.scaling={lc.scaling!r}: expected one of {SCALINGS}")
  if not lc.factor >= 0:
    raise ValueError(f"long_context.factor={lc.factor}: must be >= 0 (0: seq_len / lm.seq_len)")
  if not lc.rope_base >= 0:
    raise ValueError(f"long_context.rope_base={lc.rope_base}: must be >= 0 (0: keep the model's theta)")
  if not lc.seq_len:
    if lc.scaling != "none" or lc.rope_base:
      raise ValueError(f"long_context.scaling={lc.scaling!r} / rope_base={lc.rope_base}: set long_context.seq_len "
                       "(the stage's sequence length) too")
    return
  if lc.seq_len <= c.lm.seq_len:
    raise ValueError(f"long_context.seq_len={lc.seq_len}: must exceed lm.seq_len={c.lm.seq_len} (the base's length)")
  if c.lm.init_from:
    from cl_jax.models import hf_checkpoint
    cfg = hf_checkpoint.transformer_config(hf_checkpoint.read_config(c.lm.init_from), "lm.init_from")
    if cfg.positions != "rope":
      raise ValueError(f"long_context.seq_len={lc.seq_len}: lm.init_from={c.lm.init_from!r} has learned positions "
                       f"(a table of {cfg.max_len}); only RoPE models can be stretched")
    if cfg.rope_scaling != "none" and lc.scaling in ("linear", "llama3"):
      raise ValueError(f"long_context.scaling={lc.scaling!r}: lm.init_from already uses rope_scaling="
                       f"{cfg.rope_scaling!r}; use 'ntk' or long_context.rope_base instead")
  from cl_jax import sharding
  data, fsdp = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp)
  per = data * fsdp * int(c.train.grad_accum)
  if stage_batch_size(c) % per:
    raise ValueError(f"long_context.batch_size: {stage_batch_size(c)} sequences per step (0 means "
                     f"adapt.batch_size * lm.seq_len // long_context.seq_len) is not divisible by {per} (mesh devices "
                     "x train.grad_accum)")


def stretched_config(cfg, short_len: int, long_len: int, scaling: str = "none", factor: float = 0.0,
                     rope_base: float = 0.0):
  """`cfg` (a TransformerConfig) with RoPE changed for `long_len`-token context (see the module docstring)."""
  if cfg.positions != "rope":
    raise ValueError("long_context: only RoPE models can be stretched (this one has learned positions)")
  s = float(factor) or long_len / short_len
  changes = {"max_len": int(max(long_len, cfg.max_len))}
  base = float(rope_base) or cfg.rope_base
  if scaling == "ntk":
    dh = cfg.head_dim
    base = base * s ** (dh / (dh - 2))
  elif scaling == "linear":
    changes.update(rope_scaling="linear", rope_factor=s)
  elif scaling == "llama3":
    changes.update(rope_scaling="llama3", rope_factor=s, rope_original_max_len=int(short_len))
  elif scaling != "none":
    raise ValueError(f"long_context.scaling={scaling!r}: expected one of {SCALINGS}")
  changes["rope_base"] = base
  return cfg.replace(**changes)


def model_with_config(cfg):
  """A FunctionalModel (graph only) of `TransformerLM(cfg)`: the same params fit any RoPE setting."""
  from flax import nnx
  from cl_jax.models import functional
  from cl_jax.models.transformer import TransformerLM
  return functional(nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0))))[0]


def config_of(model, params):
  from flax import nnx
  return nnx.merge(model.graphdef, params).config


def rope_record(cfg) -> dict:
  return {k: getattr(cfg, k) for k in ("max_len", "rope_base", "rope_scaling", "rope_factor",
                                       "rope_original_max_len")}


def stage_for_run(c, data, model, base_params, workdir: str, imported=None):
  """The long-context step of an LM run, between the base and the adaptation (`cl_jax.lm.runner.run`).

  Returns `(config for the adaptation phase, data, model, imported)`: the config with `lm.seq_len` and
  `adapt.batch_size` set to the stage's, the training data re-packed at `long_context.seq_len` with the long
  evaluation roles added, the stretched model, and the import record with the new RoPE for export. Unchanged
  (the config itself) when `long_context.seq_len` is 0.
  """
  lc = c.long_context
  if not lc.seq_len:
    return c, data, model, imported
  from cl_jax.lm.data import CPTData, load_data
  from cl_jax.workdir import is_writer
  old = config_of(model, base_params)
  cfg = stretched_config(old, int(c.lm.seq_len), int(lc.seq_len), lc.scaling, float(lc.factor), float(lc.rope_base))
  stage = copy.deepcopy(c)
  stage.lm.seq_len = int(lc.seq_len)
  stage.adapt.batch_size = stage_batch_size(c)
  stage.text.eval_sequences = int(lc.eval_sequences)
  if "general_eval_sequences" in stage.text:
    stage.text.general_eval_sequences = int(lc.eval_sequences)
  long = load_data(stage, tokenizer=data.tokenizer)
  evals = {split: {**data.eval[split], **{LONG_ROLES[r]: long.eval[split][r] for r in LONG_ROLES}}
           for split in data.eval}
  data = CPTData(data.tokenizer, long.train, long.doc_index, evals, data.cloze, long.num_docs, long.roles, data.parts)
  model = model_with_config(cfg)
  if imported is not None:
    from cl_jax.models import hf_checkpoint
    hf = hf_checkpoint.hf_config(cfg, imported.hf_config.get("model_type"), imported.hf_config)
    imported = imported._replace(model=model, config=cfg, hf_config=hf)
  if is_writer():
    with open(os.path.join(workdir, "long_context.json"), "w") as f:
      json.dump({"before": rope_record(old), "after": rope_record(cfg), "short_seq_len": int(c.lm.seq_len),
                 "long_seq_len": int(lc.seq_len), "batch_size": stage.adapt.batch_size,
                 "train_sequences": {r: int(len(t)) for r, t in long.train.items()},
                 "eval_sequences": {r: int(len(long.eval["validation"][r])) for r in LONG_ROLES}},
                f, indent=1, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
  return stage, data, model, imported


__all__ = ["SCALINGS", "LONG_ROLES", "default_long_context_config", "check_long_context_config", "stretched_config",
           "model_with_config", "config_of", "stage_for_run", "stage_batch_size"]
