"""Hugging Face checkpoints in and out: config.json + safetensors <-> `TransformerLM` params.

    loaded = hf_checkpoint.load("path/to/Llama-3.2-1B", mesh=mesh, dtype=jnp.bfloat16)
    loaded.model.apply(loaded.params, tokens)         # logits, as transformers' LlamaForCausalLM gives them
    hf_checkpoint.export("out/", loaded.hf_config, params, tokenizer=loaded.tokenizer)

Families (config.json's `model_type`): `llama` (Llama 2 / 3 / 3.1+, RoPE scalings 'linear' and 'llama3',
optional attention / MLP biases), `mistral` (sliding-window attention), `qwen2` (q/k/v biases), `gpt2`
(learned positions, LayerNorm, gelu, biases everywhere, Conv1D weights stored [in, out]), `qwen3` (per-head q/k
norms), `gemma2` (sandwich norms with `1 + w` gains, scaled embeddings, soft-capped scores and logits,
query_pre_attn_scalar, GeGLU, alternating sliding / global layers), `phi3` (fused qkv_proj and gate_up_proj),
`olmo2` (post-norms, q/k norms over the whole projection) and `gemma3_text` (Gemma 2's layer with q/k norms, no
soft-caps by default, and the sliding layers' own RoPE theta). All with grouped-query attention where the config
has it, sliding windows per layer where the family states them so, tied or untied embeddings. Each family is one entry of
`cl_jax.models.hf_families.FAMILIES` (its config.json keys, conventions and tensor names); every function here
reads that table, so a new family is a new entry, not new code.

Layouts. A torch `nn.Linear` weight is stored [out, in]; cl_jax kernels are [in..., out...] with named axes
(`q: [D, H, Dh]`, `o: [H, Dh, D]`, see `cl_jax.models.transformer`), so `q_proj.weight [H Dh, D]` becomes
`q.kernel = W^T.reshape(D, H, Dh)`, head-major as transformers splits heads (`view(..., H, Dh)`). GPT-2's
Conv1D weights are already [in, out]; its fused `c_attn` [D, 3D] holds q, k and v side by side (projections
whose entry names one tensor are fused in role order). Every mapping is one `Piece`: an HF tensor, the cl_jax
param path, and for each HF axis the cl_jax axes it splits into (and an offset along it, for a fused tensor).
`layout` builds the pieces from the family's entry; import and export both read them, so they cannot disagree,
and export -> import is a pure data move (bit-exact).

Streaming. `load(..., mesh=m)` builds each param with `jax.make_array_from_callback`: for every device's
shard, the callback reads only the rows / columns of the HF tensor that shard needs (safetensors
`safe_open(...).get_slice`, which reads from the memory-mapped file), transposes and reshapes them on the
host, and hands them to that device: a device only ever receives its own shard. The file read is the
bounding range of the shard along each HF axis: exactly the shard whenever the sharded cl_jax axis leads its
group (every weight matrix under the project's rule, which shards the largest axis: D, F or V), a little more
for a bias [H, Dh] split along Dh. The target shardings are the project's rule
(`cl_jax.sharding.state_sharding`), so the params come out exactly as the trainer would shard them.

Either params layout of `cl_jax.models.transformer` loads and exports: with `scan_layers=True` a stacked param
`stacked_blocks/...` [L, ...] is built from the L per-layer HF tensors (a device's shard callback reads its slice
of each layer's tensor and stacks them), and export reads one layer's slice of it at a time.

Export writes `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards of at most
`max_shard_bytes` plus `model.safetensors.index.json` (the layout `save_pretrained` writes and
`from_pretrained` reads); each tensor is gathered to the host one at a time. A LoRA params pytree
(`cl_jax.models.lora`) is exported with its named adapter merged into the base (W + alpha/r A B).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.errors import ConfigError
from cl_jax.models import FunctionalModel, hf_families, hf_tokenizer, scan_layout
from cl_jax.models.hf_families import Family
from cl_jax.models.hf_tokenizer import HFTokenizer
from cl_jax.models.transformer import TransformerConfig, abstract_lm

# model_type -> its `hf_families.Family` entry (the table itself: an entry added there is supported here).
FAMILIES = hf_families.FAMILIES
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Files that travel with tokenizer.json (transformers' AutoTokenizer reads them when present).
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                        "chat_template.jinja")


class Loaded(NamedTuple):
  """What `load` returns: the model (graph), its params, the tokenizer (None without tokenizer.json),
  config.json as a dict, and the `TransformerConfig` it maps to."""
  model: FunctionalModel
  params: Any
  tokenizer: Any
  hf_config: dict
  config: TransformerConfig


@dataclasses.dataclass(frozen=True)
class Piece:
  """One cl_jax param <- (part of) one HF tensor.

  groups: in cl_jax axis order, (hf_axis, cl_jax axes' sizes, offset): the cl_jax axes `sizes` are the
  row-major split of HF axis `hf_axis` over [offset, offset + prod(sizes)).
  """
  path: tuple[str, ...]
  name: str
  groups: tuple[tuple[int, tuple[int, ...], int], ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(s for _, sizes, _ in self.groups for s in sizes)


# ----------------------------------------------------------------------------------------------- configs

def _fail(path: str, message: str):
  raise ConfigError(f"{path}: {message}")


def _rope_settings(hf: dict, path: str, max_len_key: str, by_layer_type: bool = False) -> dict:
  """theta and scaling from either transformers layout: v5 `rope_parameters` (theta inside) or v4
  `rope_theta` + `rope_scaling`. `by_layer_type` (Gemma 3): v5 nests one such dict per layer type, v4 gives the
  sliding layers' theta as `rope_local_base_freq`; the global layers' settings are read as above, the sliding
  layers' theta becomes `rope_local_base` (unscaled)."""
  params = dict(hf.get("rope_parameters") or {})
  if by_layer_type:
    nested = "full_attention" in params or "sliding_attention" in params
    local = dict(params.get("sliding_attention") or {}) if nested else {}
    if local.get("rope_type", "default") != "default":
      _fail(path, f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r}: only 'default' RoPE is "
                  "supported on the sliding layers")
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    glob = dict(params.get("full_attention") or {}) if nested else params
    return {**_rope_settings({**hf, "rope_parameters": glob}, path, max_len_key),
            "rope_local_base": float(local_theta)}
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  merged = {**params, **scaling}
  kind = merged.get("rope_type", merged.get("type", "default"))
  partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    _fail(path, f"partial_rotary_factor={partial}: only full rotary embeddings are supported")
  out = {"rope_base": float(theta)}

  def need(key):
    if merged.get(key) is None:
      _fail(path, f"RoPE scaling {kind!r} needs {key!r} in rope_parameters / rope_scaling")
    return merged[key]

  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_factor": float(need("factor"))}
  if kind == "llama3":
    original = merged.get("original_max_position_embeddings") or hf.get(max_len_key)
    return {**out, "rope_scaling": "llama3", "rope_factor": float(need("factor")),
            "rope_low_freq_factor": float(need("low_freq_factor")),
            "rope_high_freq_factor": float(need("high_freq_factor")), "rope_original_max_len": int(original)}
  _fail(path, f"RoPE scaling type {kind!r} is not supported; supported: 'default', 'linear', 'llama3'")


def _activation(family: Family, cfg: TransformerConfig) -> str | None:
  """The name `family` gives `cfg`'s MLP activation (None: it has none for it)."""
  for name, fields in family.activations.items():
    if all(getattr(cfg, k) == v for k, v in fields.items()):
      return name
  return None


def transformer_config(hf: Mapping, path: str = "config.json", **overrides) -> TransformerConfig:
  """The `TransformerConfig` of an HF config.json dict (`overrides`: e.g. compute_dtype='bfloat16'), read through
  its family's entry in `hf_families.FAMILIES`."""
  hf = dict(hf)
  family = hf_families.lookup(hf.get("model_type"), path)
  keys = family.keys

  def value(key, default=None):
    """config.json's `key`; null or absent reads as the family's default (transformers' own), then `default`."""
    v = hf.get(key)
    v = family.defaults.get(key, default) if v is None else v
    if v is None:
      _fail(path, f"{family.model_type} config.json needs {key!r}")
    return v

  for key, want in family.fixed.items():
    if key in hf and hf[key] != want:
      _fail(path, f"{key}={hf[key]!r} is not supported (cl_jax holds {family.model_type} models with {want!r})")
  act = value(keys.activation)
  if act not in family.activations:
    _fail(path, f"{keys.activation}={act!r}: supported for {family.model_type}: {', '.join(family.activations)}")
  d, heads = int(value(keys.d_model)), int(value(keys.num_heads))
  head_dim = int((hf.get(keys.head_dim) if keys.head_dim else None) or d // heads)
  fields = dict(
      vocab_size=int(value("vocab_size")), d_model=d, num_layers=int(value(keys.num_layers)), num_heads=heads,
      attn_head_dim=0 if head_dim * heads == d else head_dim, max_len=int(value(keys.max_len)),
      mlp_hidden=int(value(keys.mlp_hidden, family.default_mlp_ratio * d or None)),
      tied_embeddings=bool(value("tie_word_embeddings")),
      norm=family.norm, norm_eps=float(value(keys.norm_eps)), positions=family.positions,
      **(family.window.read(hf, path) if family.window else {}), **family.activations[act], **family.conventions)
  for key, field in family.scalars.items():  # null turns the option off; absent means the family's default
    v = hf[key] if key in hf else family.defaults.get(key)
    fields[field] = float(v) if v else 0.0
  if keys.num_kv_heads:  # absent: one key / value head per query head
    fields["num_kv_heads"] = int(hf.get(keys.num_kv_heads) or heads)
  for field, setting in family.bias_settings():  # a flag that is absent reads as false, as in transformers
    fields[field] = setting if isinstance(setting, bool) else bool(hf.get(setting))
  if family.positions == "rope":
    fields.update(_rope_settings(hf, path, keys.max_len, family.rope_by_layer_type))
  try:
    return TransformerConfig(**{**fields, **overrides})
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{path}: {e}") from e


def _fits(cfg: TransformerConfig, family: Family) -> bool:
  """Whether `family`'s modeling code computes exactly `cfg`'s function (a bias-free Llama is also a valid
  Mistral without a window, and so on)."""
  if (cfg.norm, cfg.positions) != (family.norm, family.positions) or _activation(family, cfg) is None:
    return False
  if cfg.sliding_window and family.window is None:
    return False
  if len(set(cfg.layer_windows())) > 1 and not family.window.per_layer:
    return False
  defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
  if any(getattr(cfg, f) != family.conventions.get(f, defaults[f]) for f in hf_families.CONVENTION_FIELDS):
    return False
  if any(getattr(cfg, f) for f in hf_families.SCALAR_FIELDS if f not in family.scalars.values()):
    return False
  if family.rope_by_layer_type:  # its sliding layers have their own unscaled theta: no scaling shared with them
    if not cfg.rope_local_base and cfg.rope_scaling != "none" and any(cfg.layer_windows()):
      return False
  elif any(cfg.layer_is_local()):
    return False
  # A dialect without these keys has plain multi-head attention with head dim d_model / heads.
  if not family.keys.num_kv_heads and cfg.kv_heads != cfg.num_heads:
    return False
  if not family.keys.head_dim and cfg.head_dim * cfg.num_heads != cfg.d_model:
    return False
  flags: dict[str, bool] = {}
  for field, setting in family.bias_settings():
    have = getattr(cfg, field)
    if isinstance(setting, bool) and have != setting:
      return False
    if isinstance(setting, str) and flags.setdefault(setting, have) != have:  # one flag, two different biases
      return False
  return True


def family_of(cfg: TransformerConfig) -> str:
  """The HF family a config exports as: the first entry of `hf_families.FAMILIES` that holds it exactly;
  ConfigError when none can (e.g. cl_jax's own byte model: RoPE with a gelu MLP)."""
  for name, family in FAMILIES.items():
    if _fits(cfg, family):
      return name
  kinds: dict[str, list[str]] = {}
  for name, family in FAMILIES.items():
    mlps = "/".join(dict.fromkeys(fields["mlp"] for fields in family.activations.values()))
    kinds.setdefault(f"{family.norm} + {mlps} + {family.positions} positions", []).append(name)
  options = ", ".join(f"{f}={getattr(cfg, f)!r}" for f in (*hf_families.CONVENTION_FIELDS, *hf_families.SCALAR_FIELDS))
  raise ConfigError(f"TransformerConfig(norm={cfg.norm!r}, mlp={cfg.mlp!r}, positions={cfg.positions!r}, "
                    f"biases q/k/v={cfg.qkv_bias} o={cfg.o_bias} mlp={cfg.mlp_bias}, "
                    f"sliding_window={cfg.sliding_window}, global_layers={cfg.global_layers}, {options}) matches "
                    "no Hugging Face family; exportable: "
                    + "; ".join(f"{'/'.join(names)} ({kind})" for kind, names in kinds.items()))


def hf_config(cfg: TransformerConfig, family: str | None = None, base: Mapping | None = None) -> dict:
  """config.json for `cfg` in `family`'s layout; fields of `base` (e.g. the imported config: token ids,
  generation settings) are kept unless `cfg` determines them."""
  family = family or family_of(cfg)
  if family not in FAMILIES:
    raise ConfigError(f"family={family!r}: supported families: {hf_families.supported()}")
  entry = FAMILIES[family]
  if not _fits(cfg, entry):
    raise ConfigError(f"family={family!r} cannot hold this model exactly (it exports as {family_of(cfg)!r})")
  keys = entry.keys
  out = {k: v for k, v in dict(base or {}).items()
         if k not in ("rope_scaling", "rope_parameters", "rope_theta", "rope_local_base_freq")}
  out.update(model_type=entry.model_type, architectures=[entry.architecture], vocab_size=cfg.vocab_size,
             tie_word_embeddings=cfg.tied_embeddings)
  # Stated, not left to the family's default, which may lie outside a cl_jax-built model's vocabulary (Phi-3: 32000).
  out.setdefault("pad_token_id", None)
  out.update({keys.d_model: cfg.d_model, keys.num_layers: cfg.num_layers, keys.num_heads: cfg.num_heads,
              keys.max_len: cfg.max_len, keys.mlp_hidden: cfg.mlp_dim, keys.norm_eps: cfg.norm_eps,
              keys.activation: _activation(entry, cfg)})
  if keys.num_kv_heads:
    out[keys.num_kv_heads] = cfg.kv_heads
  if keys.head_dim:
    out[keys.head_dim] = cfg.head_dim
  out.update(entry.fixed)
  out.update({setting: getattr(cfg, field) for field, setting in entry.bias_settings() if isinstance(setting, str)})
  for key, field in entry.scalars.items():  # 0 (off) is written as transformers states it: null, or the head dim
    value = getattr(cfg, field)
    if field == "attn_scale_dim":
      value = value or cfg.head_dim
      value = int(value) if float(value).is_integer() else value  # transformers types it int
    out[key] = value or None
  if entry.window:
    out.update(entry.window.write(cfg))
  if entry.positions == "rope":
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling == "linear":
      rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
      rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor,
                  original_max_position_embeddings=cfg.rope_original_max_len)
    # Both layouts: transformers >= 5 reads `rope_parameters`, 4.x reads `rope_theta` + `rope_scaling`.
    out["rope_parameters"] = rope
    out["rope_theta"] = cfg.rope_base
    out["rope_scaling"] = (None if cfg.rope_scaling == "none" else
                           {k: v for k, v in rope.items() if k != "rope_theta"})
    if entry.rope_by_layer_type:  # Gemma 3: one dict per layer type; 4.x: `rope_local_base_freq`
      local = cfg.rope_local_base or cfg.rope_base
      out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": local}}
      out["rope_local_base_freq"] = local
  return out


# ----------------------------------------------------------------------------------------------- layout

def layout(cfg: TransformerConfig, family: str, prefix: str | None = None) -> list[Piece]:
  """Every cl_jax param of `cfg` and where it lives in `family`'s checkpoint (see `Piece`), from the family's
  tensor names (`hf_families.Family.tensors`)."""
  entry = FAMILIES[family]
  d, h, kv, dh, f, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  p = entry.prefix if prefix is None else prefix
  pieces: list[Piece] = []

  def add(path, name, *groups):
    pieces.append(Piece(tuple(path.split("/")), name, tuple((a, tuple(s), o) for a, s, o in groups)))

  def vector(path, name, sizes, offset=0):
    add(path, name, (0, sizes, offset))

  def matrix(path, name, fan_in, fan_out, offset=0, stored=entry.weight_layout):
    """kernel [in..., out...] <- a weight stored [out, in] (nn.Linear) or [in, out] (Conv1D); `offset` along
    the output axis, where several projections share one fused tensor."""
    in_axis, out_axis = (1, 0) if stored == "out_in" else (0, 1)
    add(path, name, (in_axis, fan_in, 0), (out_axis, fan_out, offset))

  def norm(path, name, size=d, rms=False):
    vector(path + "/scale", name + ".weight", (size,))
    if cfg.norm == "layernorm" and not rms:
      vector(path + "/bias", name + ".bias", (size,))

  # Embedding tables are [rows, D] in every family (nn.Embedding / wte): no transpose.
  add("embed/embedding", p + entry.tensors["embed"] + ".weight", (0, (v,), 0), (1, (d,), 0))
  if cfg.positions == "learned":
    add("pos_embed/embedding", p + entry.tensors["pos_embed"] + ".weight", (0, (cfg.max_len,), 0), (1, (d,), 0))
  # (module, role, fan_in, fan_out, has a bias): every projection of a block, in ROLES order.
  projections = [("attn", "q", (d,), (h, dh), cfg.qkv_bias), ("attn", "k", (d,), (kv, dh), cfg.qkv_bias),
                 ("attn", "v", (d,), (kv, dh), cfg.qkv_bias), ("attn", "o", (h, dh), (d,), cfg.o_bias),
                 ("mlp", "gate", (d,), (f,), cfg.mlp_bias), ("mlp", "up", (d,), (f,), cfg.mlp_bias),
                 ("mlp", "down", (f,), (d,), cfg.mlp_bias)]
  if cfg.mlp not in hf_families.GATED_MLPS:
    projections = [proj for proj in projections if proj[1] != "gate"]
  for i in range(cfg.num_layers):
    b = f"block_{i}/"
    names = {role: p + entry.tensors[role].format(i=i) for role in hf_families.LAYER_ROLES if role in entry.tensors}
    for role in hf_families.BLOCK_NORM_ROLES[cfg.block_norms]:
      norm(b + role, names[role])
    if cfg.qk_norm != "none":  # RMSNorms (every family): a gain per head dim shared by the heads, or per unit
      norm(b + "attn/q_norm", names["q_norm"], dh if cfg.qk_norm == "head" else h * dh, rms=True)
      norm(b + "attn/k_norm", names["k_norm"], dh if cfg.qk_norm == "head" else kv * dh, rms=True)
    filled: dict[str, int] = {}  # fused tensor -> output rows the projections before this one take
    for module, role, fan_in, fan_out, bias in projections:
      offset = filled.get(names[role], 0)
      filled[names[role]] = offset + math.prod(fan_out)
      matrix(f"{b}{module}/{role}/kernel", names[role] + ".weight", fan_in, fan_out, offset)
      if bias:
        vector(f"{b}{module}/{role}/bias", names[role] + ".bias", fan_out, offset)
  norm("final_norm", p + entry.tensors["final_norm"])
  if not cfg.tied_embeddings:  # the output head is an nn.Linear in every family
    matrix("lm_head/kernel", entry.lm_head + ".weight", (d,), (v,), stored="out_in")
  return pieces


def _hf_shapes(pieces) -> dict[str, tuple[int, ...]]:
  """The shape of every HF tensor the pieces cover."""
  shapes: dict[str, list[int]] = {}
  for piece in pieces:
    rank = len(piece.groups)
    shape = shapes.setdefault(piece.name, [0] * rank)
    for axis, sizes, offset in piece.groups:
      shape[axis] = max(shape[axis], offset + math.prod(sizes))
  return {k: tuple(v) for k, v in shapes.items()}


def _flat_params(tree, prefix=()):
  for k, sub in tree.items():
    if isinstance(sub, Mapping):
      yield from _flat_params(sub, (*prefix, k))
    else:
      yield (*prefix, k), sub


def _set(tree: dict, path: tuple, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _targets(pieces, stacked: bool) -> list[tuple[tuple, list[Piece]]]:
  """(cl_jax param path, its pieces): one piece per param in the per-block layout; in the stacked layout
  (`scan_layers`) a `stacked_blocks/...` param gathers its L per-block pieces, in layer order
  (`scan_layout.split_layer`)."""
  if not stacked:
    return [(p.path, [p]) for p in pieces]
  groups: dict[tuple, dict[int, Piece]] = {}
  for piece in pieces:
    path, layer = scan_layout.split_layer(piece.path)
    groups.setdefault(path, {})[0 if layer is None else layer] = piece
  return [(path, [by_layer[i] for i in sorted(by_layer)]) for path, by_layer in groups.items()]


def _target_shape(path: tuple, group: list[Piece]) -> tuple[int, ...]:
  return ((len(group),) if scan_layout.layer_axes(path) else ()) + group[0].shape


def _check_layout(pieces, abstract_params) -> None:
  expected = {path: tuple(x.shape) for path, x in _flat_params(abstract_params)}
  mapped = {path: _target_shape(path, group)
            for path, group in _targets(pieces, scan_layout.is_stacked(abstract_params))}
  if expected != mapped:  # an internal inconsistency between transformer.py and this table
    differ = [(k, expected[k], mapped[k]) for k in expected.keys() & mapped.keys() if expected[k] != mapped[k]]
    raise AssertionError(f"hf_checkpoint layout does not match the model's params: "
                         f"only in the model {sorted(set(expected) - set(mapped))}, only in the layout "
                         f"{sorted(set(mapped) - set(expected))}, shape differences {differ}")


# ----------------------------------------------------------------------------------------------- import

def _read_piece(tensor, piece: Piece, index: tuple[slice, ...], dtype) -> np.ndarray:
  """The part `index` (slices over the cl_jax param's axes) of `piece`, read from a safetensors slice object.

  Each HF axis is read over the bounding range of the flat indices the requested box covers (the whole
  box when only the leading cl_jax axis of a group is sliced, as the sharding rule does for kernels), then the
  box is picked out, the axes put in cl_jax order and split.
  """
  hf_sel, picks, box_shapes, axis = {}, {}, [], 0
  for hf_axis, sizes, offset in piece.groups:
    ranges = [np.arange(*index[axis + j].indices(sizes[j])) for j in range(len(sizes))]
    axis += len(sizes)
    flat = np.ravel_multi_index(np.ix_(*ranges), sizes).ravel() if sizes else np.zeros(1, np.int64)
    lo, hi = int(flat.min()), int(flat.max()) + 1
    hf_sel[hf_axis] = slice(offset + lo, offset + hi)
    if len(flat) != hi - lo:
      picks[hf_axis] = flat - lo
    box_shapes.append([len(r) for r in ranges])
  block = np.asarray(tensor[tuple(hf_sel[a] for a in range(len(piece.groups)))])
  for hf_axis, where in picks.items():
    block = np.take(block, where, axis=hf_axis)
  block = np.transpose(block, [hf_axis for hf_axis, _, _ in piece.groups])
  return block.reshape([s for shape in box_shapes for s in shape]).astype(dtype)


def _read_json(file: str):
  """A checkpoint's JSON file; a ConfigError naming the file when it is not JSON (a torn download)."""
  try:
    with open(file, encoding="utf-8") as fh:
      return json.load(fh)
  except (ValueError, UnicodeDecodeError) as e:
    _fail(file, f"not valid JSON ({' '.join(str(e).split())})")


def _open_weights(stack: ExitStack, file: str):
  """`safe_open(file)` entered in `stack` (memory-mapped: only the header is read); a ConfigError naming the file
  when its header is not a safetensors header (overwritten, truncated or not a safetensors file at all), instead of
  the library's SafetensorError traceback."""
  from safetensors import SafetensorError, safe_open
  try:
    return stack.enter_context(safe_open(file, framework="numpy"))
  except SafetensorError as e:
    _fail(file, f"not a readable safetensors file ({' '.join(str(e).split())}); re-download or re-export it")


def _check_weight_headers(files) -> None:
  """Opens every weight file's header (no tensor is read), so a corrupt shard fails at validation."""
  for file in sorted(set(files)):
    with ExitStack() as stack:
      _open_weights(stack, file)


def _weight_files(path: str) -> dict[str, str]:
  """{tensor name: file} from the index of a sharded checkpoint, or from the single file."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    loaded = _read_json(index)
    weight_map = loaded.get("weight_map") if isinstance(loaded, dict) else None
    if not isinstance(weight_map, dict):
      _fail(index, "no 'weight_map' object")
    missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(path, f))})
    if missing:
      _fail(index, f"names shard files that do not exist in {path}: {missing}")
    return {k: os.path.join(path, f) for k, f in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    _fail(path, f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read; convert a "
                "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))")
  with ExitStack() as stack:
    return dict.fromkeys(_open_weights(stack, single).keys(), single)


def read_config(path: str) -> dict:
  """config.json of a checkpoint directory (ConfigError naming the path when it is not one)."""
  if not os.path.isdir(path):
    _fail(path, f"not a directory; expected a Hugging Face checkpoint directory ({CONFIG_FILE} + "
                f"{SINGLE_FILE} or {INDEX_FILE}) of a supported family: {hf_families.supported()}")
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    _fail(path, f"no {CONFIG_FILE}; expected a Hugging Face checkpoint directory of a supported family: "
                f"{hf_families.supported()}")
  config = _read_json(config_path)
  if not isinstance(config, dict):
    _fail(config_path, f"expected a JSON object, got {type(config).__name__}")
  return config


def _prefix(names, family: str) -> str:
  """The family's prefix ('model.', 'transformer.') for *ForCausalLM checkpoints, '' for bare-model ones (the
  original gpt2)."""
  root = FAMILIES[family].prefix
  return root if any(n.startswith(root) for n in names) else ""


def _token_id(value):
  return value[0] if isinstance(value, list) and value else value


def load_tokenizer(path: str, hf: Mapping | None = None, *, separator: str | None = None):
  """tokenizer.json of a checkpoint directory through `tokenizers`, else its SentencePiece tokenizer.model
  converted (`hf_tokenizer.sentencepiece_tokenizer`, with tokenizer_config.json's `legacy` / `add_prefix_space`);
  None when it has neither. The eos / bos / pad
  ids come from config.json where it names them, else from tokenizer_config.json's token strings (what
  transformers' tokenizer uses), else the usual spellings. separator: the document separator's token string
  (`HFTokenizer.separator_id`; default the family's end-of-text token)."""
  file, spm_file = os.path.join(path, TOKENIZER_FILE), os.path.join(path, hf_tokenizer.SPM_FILE)
  hf = dict(hf or {})
  try:
    strings = hf_tokenizer.special_tokens(path)
    if os.path.exists(file):
      from tokenizers import Tokenizer
      backend = Tokenizer.from_file(file)
    elif os.path.exists(spm_file):  # SentencePiece only (Llama 2, Mistral v0.1): converted, as transformers does
      settings = hf_tokenizer.read_json_object(os.path.join(path, hf_tokenizer.TOKENIZER_CONFIG_FILE))
      backend = hf_tokenizer.sentencepiece_tokenizer(spm_file, legacy=bool(settings.get("legacy", False)),
                                                     add_prefix_space=settings.get("add_prefix_space") is not False)
      file = spm_file
    else:
      return None
  except ValueError as e:
    raise ConfigError(str(e)) from None
  vocab = backend.get_vocab(with_added_tokens=True)
  ids = {}
  for attr, key in (("eos_id", "eos"), ("bos_id", "bos"), ("pad_id", "pad")):
    ident = _token_id(hf.get(f"{key}_token_id"))
    if ident is None and strings.get(f"{key}_token") in vocab:
      ident = vocab[strings[f"{key}_token"]]
    ids[attr] = ident
  try:
    return HFTokenizer(file, separator=separator, tokenizer=backend, **ids)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None


def check(path: str, key: str = "lm.init_from", *, seq_len: int | None = None,
          need_tokenizer: bool = True) -> TransformerConfig:
  """Validates a checkpoint directory without reading any weight (for a config's validation step): config.json
  of a supported family, its weight files and their safetensors headers (a corrupt shard fails here, not mid-load),
  tokenizer.json, and `seq_len` within learned positions. Raises
  ConfigError starting with `key=path:`; returns the `TransformerConfig`."""
  try:
    hf = read_config(path)
    cfg = transformer_config(hf, os.path.join(path, CONFIG_FILE))
    _check_weight_headers(_weight_files(path).values())
    if need_tokenizer and not any(os.path.exists(os.path.join(path, f))
                                  for f in (TOKENIZER_FILE, hf_tokenizer.SPM_FILE)):
      _fail(path, f"no {TOKENIZER_FILE} or {hf_tokenizer.SPM_FILE} (the run tokenizes its text with the "
                  "checkpoint's own tokenizer)")
    if seq_len is not None and cfg.positions == "learned" and seq_len > cfg.max_len:
      _fail(path, f"sequences of {seq_len} tokens exceed the model's {cfg.max_len} learned positions")
  except ConfigError as e:
    raise ConfigError(f"{key}={path!r}: {e}") from None
  return cfg


def load(path: str, mesh=None, dtype=jnp.float32, *, tokenizer: bool = True, **overrides) -> Loaded:
  """Reads an HF checkpoint directory into a `TransformerLM`: (model, params, tokenizer, hf_config, config).

  mesh: a `jax.sharding.Mesh` with the project's ('data', 'fsdp') axes: each param is built straight into
    its sharding (`cl_jax.sharding.state_sharding`), one device's shard at a time. None: the default device.
  dtype: the params' dtype (float32, or bfloat16 to halve their memory).
  overrides: `TransformerConfig` fields that do not change the params, e.g. compute_dtype='bfloat16'.
  """
  hf = read_config(path)
  cfg = transformer_config(hf, os.path.join(path, CONFIG_FILE), **overrides)
  family = hf["model_type"]
  files = _weight_files(path)
  pieces = layout(cfg, family, _prefix(files, family))
  model, abstract = abstract_lm(cfg)
  _check_layout(pieces, abstract)
  expected = _hf_shapes(pieces)
  missing = sorted(set(expected) - set(files))
  if missing:
    _fail(path, f"the checkpoint lacks tensors a {family} model with this config.json needs: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}")
  entry = FAMILIES[family]
  # A tied checkpoint may still store its output head (a copy of the embedding): it is not read.
  unexpected = sorted(n for n in set(files) - set(expected) if not n.endswith(entry.buffers)
                      and not (cfg.tied_embeddings and n == entry.lm_head + ".weight"))
  if unexpected:
    _fail(path, f"tensors this {family} config.json does not account for: {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''} (is config.json from the same model?)")
  if mesh is None:
    device = jax.devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
  else:
    from cl_jax import sharding
    shardings = sharding.state_sharding(abstract, mesh)
  np_dtype = np.dtype(dtype)
  params: dict = {}
  with ExitStack() as stack:
    handles = {f: _open_weights(stack, f) for f in sorted(set(files.values()))}

    def open_tensor(piece):
      tensor = handles[files[piece.name]].get_slice(piece.name)
      shape = tuple(tensor.get_shape())
      if shape != expected[piece.name]:
        _fail(files[piece.name], f"tensor {piece.name} has shape {list(shape)}, but config.json implies "
                                 f"{list(expected[piece.name])}")
      return tensor

    for param, group in _targets(pieces, cfg.scan_layers):
      tensors = [open_tensor(piece) for piece in group]
      if scan_layout.layer_axes(param):  # stacked: a shard's layers are read one HF tensor each, then stacked
        def read(index, tensors=tensors, group=group):
          layers = range(*index[0].indices(len(group)))
          return np.stack([_read_piece(tensors[i], group[i], index[1:], np_dtype) for i in layers])
      else:
        def read(index, tensor=tensors[0], piece=group[0]):
          return _read_piece(tensor, piece, index, np_dtype)
      _set(params, param, jax.make_array_from_callback(_target_shape(param, group), _get(shardings, param), read))
  tok = load_tokenizer(path, hf) if tokenizer else None
  return Loaded(model, params, tok, hf, cfg)


# ----------------------------------------------------------------------------------------------- export

def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _merged_base(params, adapter: str | None, lora_spec):
  """The plain params to export: `params` itself, or a LoRA pytree's base with `adapter` merged."""
  if isinstance(params, Mapping) and set(params) == {"base", "adapters"}:
    if adapter is None:
      if params["adapters"]:
        raise ConfigError(f"export: params hold LoRA adapters {sorted(params['adapters'])}; name the one to "
                          "merge with adapter=... (and its lora_spec), or pass params['base'] to export the base")
      return params["base"]
    if lora_spec is None:
      raise ConfigError(f"export: adapter={adapter!r} needs lora_spec (its alpha sets the merge scale)")
    from cl_jax.models import lora
    return lora.merge_adapter(params, adapter, lora_spec)["base"]
  if adapter is not None:
    raise ConfigError(f"export: adapter={adapter!r} given, but params are not a LoRA pytree "
                      "({'base': ..., 'adapters': ...})")
  return params


def _tokenizer_source(tokenizer) -> str:
  if isinstance(tokenizer, str):
    source = tokenizer if tokenizer.endswith(".json") else os.path.join(tokenizer, TOKENIZER_FILE)
    if not os.path.exists(source):
      raise ConfigError(f"export: tokenizer={tokenizer!r}: no such tokenizer.json")
    return source
  source = getattr(tokenizer, "path", None)
  if source is None or not os.path.exists(source):
    raise ConfigError(f"export: tokenizer {tokenizer!r} has no tokenizer.json to copy (expected a "
                      "cl_jax.models.hf_tokenizer.HFTokenizer or a path)")
  return source


def write_tokenizer(path: str, tokenizer, chat_template=None) -> list[str]:
  """Writes a tokenizer beside a checkpoint (or into a run's workdir) the way transformers reads it: tokenizer.json,
  the side files that travel with it (tokenizer_config.json, special_tokens_map.json, generation_config.json,
  chat_template.jinja) and the chat template.

  chat_template: a `cl_jax.lm.templates.HFChatTemplate`, a Jinja string, or None for the one beside the
    tokenizer's own file (either place transformers keeps it). A template is written to both chat_template.jinja
    (transformers >= 5 reads it first) and tokenizer_config.json["chat_template"] (older readers), so every
    transformers version's `apply_chat_template` on the written directory renders it. Without any, the directory
    has none (and `cl_jax.lm.templates.template_for` says so when it is read).
  A tokenizer without its own tokenizer_config.json gets a minimal one naming its special tokens. Returns the files
  written (process 0 writes)."""
  source = _tokenizer_source(tokenizer)
  source_dir = os.path.dirname(os.path.abspath(source))
  if chat_template is None:
    chat_template, _ = hf_tokenizer.chat_template_source(source_dir)
  text = getattr(chat_template, "source", chat_template)
  if text is not None and not isinstance(text, str):
    raise ConfigError(f"export: chat_template must be an HFChatTemplate or a Jinja string, got "
                      f"{type(chat_template).__name__}")
  written = [TOKENIZER_FILE]
  if jax.process_index() != 0:
    return written
  os.makedirs(path, exist_ok=True)
  if source.endswith(".model"):  # a converted SentencePiece model: its tokenizer.json, and the model file beside it
    tokenizer.save(os.path.join(path, TOKENIZER_FILE))
    if os.path.abspath(source) != os.path.abspath(os.path.join(path, hf_tokenizer.SPM_FILE)):
      shutil.copyfile(source, os.path.join(path, hf_tokenizer.SPM_FILE))
    written.append(hf_tokenizer.SPM_FILE)
  elif os.path.abspath(source) != os.path.abspath(os.path.join(path, TOKENIZER_FILE)):
    shutil.copyfile(source, os.path.join(path, TOKENIZER_FILE))
  for side in TOKENIZER_SIDE_FILES:
    other = os.path.join(source_dir, side)
    if os.path.exists(other) and os.path.abspath(other) != os.path.abspath(os.path.join(path, side)):
      shutil.copyfile(other, os.path.join(path, side))
      written.append(side)
  config_path = os.path.join(path, hf_tokenizer.TOKENIZER_CONFIG_FILE)
  config = _read_json(config_path) if os.path.exists(config_path) else {}
  if not config:  # e.g. the byte model's file: name its specials as transformers' TokenizersBackend expects
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers"}
    with open(os.path.join(path, TOKENIZER_FILE), encoding="utf-8") as fh:
      added = json.load(fh).get("added_tokens", [])
    vocab = {int(t["id"]): t["content"] for t in added if isinstance(t, dict)}
    for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
      ident = getattr(tokenizer, attr, None)
      if ident is not None and int(ident) in vocab:
        config[key] = vocab[int(ident)]
  jinja = os.path.join(path, hf_tokenizer.CHAT_TEMPLATE_FILE)
  if text is not None:
    config["chat_template"] = text
    with open(jinja, "w", encoding="utf-8") as fh:
      fh.write(text)
  else:
    config.pop("chat_template", None)
    if os.path.exists(jinja):
      os.remove(jinja)
  with open(config_path, "w", encoding="utf-8") as fh:
    json.dump(config, fh, indent=2, ensure_ascii=False)
  if hf_tokenizer.TOKENIZER_CONFIG_FILE not in written:
    written.append(hf_tokenizer.TOKENIZER_CONFIG_FILE)
  if text is not None:
    written.append(hf_tokenizer.CHAT_TEMPLATE_FILE)
  return written


def export(path: str, model_config, params, tokenizer=None, *, family: str | None = None,
           max_shard_bytes: int = 5 * 2**30, dtype=None, adapter: str | None = None, lora_spec=None,
           chat_template=None) -> list[str]:
  """Writes `params` as an HF checkpoint directory: config.json + safetensors (+ tokenizer.json).

  model_config: the imported config.json dict (`Loaded.hf_config`: its family and token ids are kept) or a
    `TransformerConfig` (the family is `family`, or the one that holds it: `family_of`).
  params: TransformerLM params, or a LoRA pytree {'base', 'adapters'} with `adapter` merged into the base
    (`lora_spec`: its `cl_jax.models.lora.LoraSpec`).
  max_shard_bytes: larger checkpoints are split into shards with model.safetensors.index.json.
  dtype: the stored dtype (default: each param's own, so export -> import is bit-exact).
  chat_template: with `tokenizer`, the template to write (`write_tokenizer`; default: the tokenizer's own).
  Only process 0 writes. Returns the files written.
  """
  from safetensors.numpy import save_file
  if isinstance(model_config, TransformerConfig):
    cfg, base = model_config, None
  elif isinstance(model_config, Mapping):
    base = dict(model_config)
    cfg = transformer_config(base, "export: model_config")
    family = family or base["model_type"]
  else:
    raise ConfigError(f"export: model_config must be a config.json dict or a TransformerConfig, got "
                      f"{type(model_config).__name__}")
  params = _merged_base(params, adapter, lora_spec)
  vocab = _get(params, ("embed", "embedding")).shape[0]
  if vocab != cfg.vocab_size:  # e.g. after cl_jax.lm.vocab.extend_vocab
    cfg = cfg.replace(vocab_size=int(vocab))
  out_config = hf_config(cfg, family, base)
  for key, attr in (("eos_token_id", "eos_id"), ("bos_token_id", "bos_id"), ("pad_token_id", "pad_id")):
    if base is None and getattr(tokenizer, attr, None) is not None:
      out_config[key] = int(getattr(tokenizer, attr))
  family = out_config["model_type"]
  pieces = layout(cfg, family)
  _check_layout(pieces, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  if max_shard_bytes < 1:
    raise ConfigError(f"export: max_shard_bytes={max_shard_bytes}: must be positive")
  by_name: dict[str, list[Piece]] = {}
  for piece in pieces:
    by_name.setdefault(piece.name, []).append(piece)
  shapes = _hf_shapes(pieces)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
    # A checkpoint written here before (sharded differently) would shadow or contradict this one.
    for stale in os.listdir(path):
      if stale in (SINGLE_FILE, INDEX_FILE) or (stale.startswith("model-") and stale.endswith(".safetensors")):
        os.remove(os.path.join(path, stale))
  shard_files: list[tuple[str, list[str]]] = []  # (temporary file, tensor names), in order
  current: dict[str, np.ndarray] = {}
  total = 0

  def flush():
    name = f".shard-{len(shard_files):05d}.safetensors"
    if writer:
      save_file(current, os.path.join(path, name), metadata={"format": "pt"})
    shard_files.append((name, list(current)))
    current.clear()

  for name, group in by_name.items():
    first = _to_host(scan_layout.get_layer(params, group[0].path))
    out_dtype = np.dtype(dtype) if dtype is not None else first.dtype
    tensor = np.empty(shapes[name], out_dtype)
    for piece in group:  # in the stacked layout, one layer's slice of the stacked leaf at a time
      x = first if piece is group[0] else _to_host(scan_layout.get_layer(params, piece.path))
      # cl_jax axes -> HF axes: merge each group's axes, then order the groups by their HF axis.
      merged = x.reshape([math.prod(sizes) for _, sizes, _ in piece.groups])
      merged = np.transpose(merged, np.argsort([hf_axis for hf_axis, _, _ in piece.groups]))
      where = [slice(None)] * len(piece.groups)
      for hf_axis, sizes, offset in piece.groups:
        where[hf_axis] = slice(offset, offset + math.prod(sizes))
      tensor[tuple(where)] = merged.astype(out_dtype)
    if current and sum(t.nbytes for t in current.values()) + tensor.nbytes > max_shard_bytes:
      flush()
    current[name] = tensor
    total += tensor.nbytes
  flush()
  written = [CONFIG_FILE]
  if writer:
    n = len(shard_files)
    if n == 1:
      os.replace(os.path.join(path, shard_files[0][0]), os.path.join(path, SINGLE_FILE))
      written.append(SINGLE_FILE)
    else:
      weight_map = {}
      for k, (tmp, names) in enumerate(shard_files):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(path, tmp), os.path.join(path, final))
        weight_map.update({t: final for t in names})
        written.append(final)
      with open(os.path.join(path, INDEX_FILE), "w") as fh:
        json.dump({"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))},
                  fh, indent=2)
      written.append(INDEX_FILE)
    with open(os.path.join(path, CONFIG_FILE), "w") as fh:
      json.dump(out_config, fh, indent=2, sort_keys=True)
  if tokenizer is not None:
    written += write_tokenizer(path, tokenizer, chat_template)
  return written


# ----------------------------------------------------------------------------------------------- PEFT adapters
#
# PEFT (huggingface/peft) stores a LoRA adapter as adapter_config.json + adapter_model.safetensors, one pair of
# tensors per adapted nn.Linear `module` of the *ForCausalLM model:
#
#   base_model.model.<module>.lora_A.weight  [r, in]     base_model.model.<module>.lora_B.weight  [out, r]
#
# and adds (lora_alpha / r) * x A^T B^T (alpha / sqrt(r) with use_rslora; per-module r and alpha from
# rank_pattern / alpha_pattern, regexes matched against the module name's tail). cl_jax's adapter on the same
# module is A [in, r], B [r, out] with scale alpha / r (`cl_jax.models.lora`): the same convention, so
# A_cl = lora_A^T, and B_cl = lora_B^T times (PEFT's scale / cl_jax's) -- exactly 1 unless the adapter used
# rslora or an alpha_pattern, whose scales cl_jax's single `alpha` cannot hold otherwise. The in / out axes are
# the HF weight's, flattened as `layout` maps them (q: out = head-major H*Dh, o: in = H*Dh), which is the
# row-major flattening of the cl_jax kernel's axes that `lora.init_adapter` uses.

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _config_and_family(model_config, family: str | None, what: str) -> tuple[TransformerConfig, str]:
  if isinstance(model_config, TransformerConfig):
    return model_config, family or family_of(model_config)
  if isinstance(model_config, Mapping):
    return transformer_config(model_config, f"{what}: model_config"), family or model_config["model_type"]
  raise ConfigError(f"{what}: model_config must be a config.json dict or a TransformerConfig, got "
                    f"{type(model_config).__name__}")


def _adaptable_modules(cfg: TransformerConfig, family: str, prefix: str | None = None) -> dict[str, tuple]:
  """{cl_jax module path ('block_0/attn/q'): (HF module name, d_in, d_out)} of every projection stored as a whole
  HF tensor of its own (not a slice of a fused one, e.g. GPT-2's c_attn, which a per-projection adapter cannot
  be written as)."""
  pieces = layout(cfg, family, prefix)
  count: dict[str, int] = {}
  for piece in pieces:
    count[piece.name] = count.get(piece.name, 0) + 1
  out = {}
  for piece in pieces:
    if piece.path[-1] != "kernel" or count[piece.name] != 1 or len(piece.groups) != 2:
      continue
    (_, fan_in, _), (_, fan_out, _) = piece.groups
    out["/".join(piece.path[:-1])] = (piece.name[:-len(".weight")], math.prod(fan_in), math.prod(fan_out))
  return out


def _target_modules(modules: Sequence[str], all_modules: Sequence[str]):
  """PEFT's `target_modules`: the modules' last names when those select exactly these modules among all the
  model's, else one regex PEFT fullmatches against module names."""
  tails = sorted({m.rsplit(".", 1)[-1] for m in modules})
  if {m for m in all_modules if m.rsplit(".", 1)[-1] in tails} == set(modules):
    return tails
  return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def export_peft_adapter(path: str, params, adapter, spec, model_config, *, family: str | None = None,
                        base_model: str = "", dtype=None) -> list[str]:
  """Writes LoRA adapter(s) of a cl_jax params pytree {'base', 'adapters'} as a PEFT adapter directory that
  `peft.PeftModel.from_pretrained(<the exported base>, path)` loads.

  adapter: a name, or several (O-LoRA's slots): written as one adapter of rank sum r_k holding their sum
    (`lora.combined_factors`), the function `LoraModel.apply(..., adapter=names)` computes.
  spec: the adapters' `lora.LoraSpec` (its alpha sets the scale). model_config: the base's config.json dict or
    `TransformerConfig` (as `export`). base_model: written as base_model_name_or_path (the exported base's
    directory or hub id). dtype: the stored dtype (default float32).
  lora_alpha is alpha * R / rank for the common combined rank R (so one adapter of rank `spec.rank` is written
  with lora_alpha = alpha and its B unchanged); a module of another rank gets a rank_pattern entry and its scale
  folded into lora_B. Only process 0 writes. Returns the files written.
  """
  from cl_jax.models import lora
  from safetensors.numpy import save_file
  cfg, family = _config_and_family(model_config, family, "export_peft_adapter")
  names = (adapter,) if isinstance(adapter, str) else tuple(adapter)
  try:
    factors = lora.combined_factors(params, names, spec)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"export_peft_adapter: {e}") from None
  modules = _adaptable_modules(cfg, family)
  unknown = sorted(set(factors) - set(modules))
  if unknown:
    raise ConfigError(f"export_peft_adapter: adapters on {unknown} have no whole {family} weight to sit on "
                      f"(adaptable: {sorted(modules)[:7]} ...)")
  ranks = {p: a.shape[-1] for p, (a, _) in factors.items()}
  common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
  lora_alpha = float(spec.alpha) * common / spec.rank
  out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
  tensors, rank_pattern = {}, {}
  for p, (a, s) in factors.items():
    name, d_in, d_out = modules[p]
    if a.shape[0] != d_in or s.shape[-1] != d_out:
      raise ConfigError(f"export_peft_adapter: adapter at {p!r} is [{a.shape[0]}, r] x [r, {s.shape[-1]}], but "
                        f"{name} is [{d_out}, {d_in}] ([out, in])")
    r = a.shape[-1]
    if r != common:
      rank_pattern[re.escape(name)] = int(r)
    # PEFT adds (lora_alpha / r) A B: B = S / that scale (exactly the stored B when r = rank and one adapter).
    b = s / np.float32(lora_alpha / r)
    tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(out_dtype))
    tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(out_dtype))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
      "r": int(common), "lora_alpha": lora_alpha, "lora_dropout": float(spec.dropout),
      "target_modules": _target_modules([modules[p][0] for p in factors], [m for m, _, _ in modules.values()]),
      "rank_pattern": rank_pattern, "alpha_pattern": {}, "bias": "none", "use_rslora": False, "use_dora": False,
      "fan_in_fan_out": FAMILIES[family].weight_layout != "out_in", "modules_to_save": None,
      "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
      "revision": None}
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w") as fh:
      json.dump(config, fh, indent=2, sort_keys=True)
  return [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]


def _pattern_value(patterns: Mapping, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module name's tail."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


def import_peft_adapter(path: str, model_config, base_params=None, *, family: str | None = None):
  """Reads a PEFT LoRA adapter directory into a cl_jax adapter: (adapter {module path: {'A', 'B'}}, LoraSpec).

  The spec's alpha is PEFT's lora_alpha and its rank PEFT's r; a module whose PEFT scale differs from
  alpha / r_module (rslora, alpha_pattern) has the ratio folded into B, so `LoraModel(model, spec).apply(
  lora_params(base, {name: adapter}), x, adapter=name)` computes PEFT's model. `base_params` given: the adapter
  is checked against its kernels, cast to their dtype and put in their layout (stacked under scan_layers).
  Refused with ConfigError naming the file: another PEFT type, DoRA, trained biases, modules_to_save, or a
  tensor on a module the model does not have.
  """
  from safetensors.numpy import load_file
  from cl_jax.models import lora
  cfg, family = _config_and_family(model_config, family, "import_peft_adapter")
  config_file, weights_file = os.path.join(path, PEFT_CONFIG_FILE), os.path.join(path, PEFT_WEIGHTS_FILE)
  if not os.path.exists(config_file):
    _fail(path, f"no {PEFT_CONFIG_FILE}; expected a PEFT adapter directory ({PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE})")
  if not os.path.exists(weights_file):
    _fail(path, f"no {PEFT_WEIGHTS_FILE} (only safetensors adapters are read; re-save with "
                "save_pretrained(safe_serialization=True))")
  pc = _read_json(config_file)
  if not isinstance(pc, dict):
    _fail(config_file, "expected a JSON object")
  checks = (("peft_type", lambda v: v in (None, "LORA"), "'LORA'"), ("use_dora", lambda v: not v, "false"),
            ("bias", lambda v: v in (None, "none"), "'none'"), ("lora_bias", lambda v: not v, "false"),
            ("modules_to_save", lambda v: not v, "null"), ("target_parameters", lambda v: not v, "null"),
            ("layer_replication", lambda v: not v, "null"), ("trainable_token_indices", lambda v: not v, "null"))
  for key, ok, allowed in checks:
    if not ok(pc.get(key)):
      _fail(config_file, f"{key}={pc.get(key)!r}: only plain LoRA adapters are imported ({key} must be {allowed})")
  r, alpha = int(pc.get("r", 8)), float(pc.get("lora_alpha", 8))
  rslora = bool(pc.get("use_rslora"))
  modules = {}
  for prefix in (None, ""):  # *ForCausalLM module names, or a bare model's
    for p, (name, d_in, d_out) in _adaptable_modules(cfg, family, prefix).items():
      modules.setdefault(name, (p, d_in, d_out))
  try:
    raw = load_file(weights_file)
  except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
    _fail(weights_file, f"not a readable safetensors file ({' '.join(str(e).split())})")
  factors: dict[str, dict[str, np.ndarray]] = {}
  for key, value in raw.items():
    m = _PEFT_KEY.match(key)
    if m is None:
      _fail(weights_file, f"tensor {key!r} is not a LoRA factor (<module>.lora_A.weight / lora_B.weight)")
    if m["module"] not in modules:
      _fail(weights_file, f"tensor {key!r} adapts {m['module']!r}, which this {family} model has no whole linear "
                          f"weight for (adaptable: {sorted(modules)[:4]} ...)")
    factors.setdefault(m["module"], {})[m["factor"]] = np.asarray(value, np.float32)
  adapter = {}
  for name, f in sorted(factors.items()):
    p, d_in, d_out = modules[name]
    if set(f) != {"A", "B"}:
      _fail(weights_file, f"{name} has lora_{''.join(f)} without its partner")
    a, b = f["A"], f["B"]
    rm = a.shape[0]
    if a.shape != (rm, d_in) or b.shape != (d_out, rm):
      _fail(weights_file, f"{name}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected [r, {d_in}] / "
                          f"[{d_out}, r]")
    am = float(_pattern_value(pc.get("alpha_pattern"), name, alpha))
    peft_scale = am / math.sqrt(rm) if rslora else am / rm
    ratio = np.float32(peft_scale / (alpha / rm))
    adapter[p] = {"A": a.T.copy(), "B": b.T * ratio if ratio != 1 else b.T.copy()}
  if not adapter:
    _fail(weights_file, "holds no LoRA factors")
  spec = lora.LoraSpec(targets=tuple(sorted(adapter)), rank=r, alpha=alpha, dropout=float(pc.get("lora_dropout") or 0))
  if base_params is None:
    return adapter, spec
  dtypes = {}
  for p, layer in adapter.items():
    kernel = scan_layout.get_layer(base_params, (*p.split("/"), "kernel"))
    if kernel.size != layer["A"].shape[0] * layer["B"].shape[1]:
      _fail(weights_file, f"{p}: the adapter is [{layer['A'].shape[0]}, r] x [r, {layer['B'].shape[1]}] but the "
                          f"base kernel has shape {tuple(kernel.shape)}")
    dtypes[p] = kernel.dtype
  if scan_layout.is_stacked(base_params):  # one adapter per layer along the stacked kernel's layer axis
    groups: dict[str, dict[int, str]] = {}
    for p in adapter:
      stacked_path, i = scan_layout.split_layer(p)
      groups.setdefault(stacked_path, {})[i] = p
    layers = scan_layout.num_layers(base_params)
    stacked = {}
    for stacked_path, by_layer in groups.items():
      if sorted(by_layer) != list(range(layers)):
        _fail(weights_file, f"adapts {stacked_path} in layers {sorted(by_layer)} only; the stacked layout "
                            f"(scan_layers) needs all {layers} (load the base with scan_layers=False)")
      paths = [by_layer[i] for i in range(layers)]
      stacked[stacked_path] = {f: jnp.asarray(np.stack([adapter[q][f] for q in paths]), dtypes[paths[0]])
                               for f in "AB"}
    return stacked, dataclasses.replace(spec, targets=tuple(sorted(stacked)))
  return {p: {f: jnp.asarray(v, dtypes[p]) for f, v in layer.items()} for p, layer in adapter.items()}, spec


__all__ = ["FAMILIES", "Loaded", "Piece", "check", "export", "export_peft_adapter", "family_of", "hf_config",
           "import_peft_adapter", "layout", "load", "load_tokenizer", "read_config", "transformer_config",
           "write_tokenizer"]
