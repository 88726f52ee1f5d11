"""Hugging Face model families as data: one `Family` entry per config.json `model_type`.

An entry states everything `cl_jax.models.hf_checkpoint` needs to read and write that family's checkpoints:

  * its config.json dialect: the key that holds each architecture number (`ConfigKeys`: `hidden_size` in Llama,
    `n_embd` in GPT-2, ...), the value transformers assumes when a key is absent (`defaults`), and flags that
    cl_jax supports at one value only (`fixed`, e.g. GPT-2's `scale_attn_weights=true`);
  * its architecture conventions: the norm (RMSNorm or LayerNorm), the positions (RoPE or a learned table), the
    activation names it uses and the MLP each one means, which biases it has (always, never, or as a config.json
    flag says), how it states a sliding window (`WindowStyle`: one for every layer, or per layer), the
    `TransformerConfig` options all its models have (`conventions`: q/k norms, where the block norms sit, Gemma's
    `1 + w` gains and scaled embeddings) and the config.json numbers that switch others on (`scalars`:
    soft-caps, Gemma's query_pre_attn_scalar);
  * its tensors: the name of each weight per role (`ROLES`, `{i}` standing for the layer index), the prefix of
    `*ForCausalLM` checkpoints, buffers to skip, and how weight matrices are stored: torch `nn.Linear` keeps
    [out, in], GPT-2's `Conv1D` keeps [in, out]. Projections whose roles share one tensor name are fused along
    its output axis in role order, so GPT-2's `c_attn` [D, 3D] = [q | k | v] needs no code of its own.

Import, export, validation and `family_of` all read FAMILIES, so adding a family is one entry here (plus a
reference fixture in scripts/make_hf_fixtures.py that checks the entry against transformers' own logits).
Entries are tried in table order by `family_of`: a config several families can hold exactly (a bias-free
RoPE model fits Llama and Mistral) exports as the earliest one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from cl_jax.errors import ConfigError

if TYPE_CHECKING:
  from cl_jax.models.transformer import TransformerConfig

# Tensor roles an entry names, in the order pieces are laid out. Model roles occur once; layer roles once per
# block (their names hold `{i}`). cl_jax's param for each: embed -> embed/embedding, pos_embed ->
# pos_embed/embedding, final_norm -> final_norm/{scale,bias}, attn_norm / mlp_norm (before each branch) and
# attn_post_norm / mlp_post_norm (on its output) -> block_i/<role>/..., q, k, v, o and q_norm, k_norm ->
# block_i/attn/<role>/..., gate, up, down -> block_i/mlp/<role>/... (cl_jax.models.transformer).
MODEL_ROLES = ("embed", "pos_embed", "final_norm")
LAYER_ROLES = ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm", "q", "k", "v", "o", "q_norm", "k_norm",
               "gate", "up", "down")
ROLES = MODEL_ROLES + LAYER_ROLES
# The block norms each `TransformerConfig.block_norms` has, in ROLES order.
BLOCK_NORM_ROLES = {"pre": ("attn_norm", "mlp_norm"),
                    "sandwich": ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"),
                    "post": ("attn_post_norm", "mlp_post_norm")}
# `TransformerConfig` options an entry's `conventions` may fix (any other value is the config's default), and the
# fields its `scalars` may read from config.json (0: off).
CONVENTION_FIELDS = ("qk_norm", "block_norms", "norm_plus_one", "embed_scale")
SCALAR_FIELDS = ("attn_scale_dim", "attn_softcap", "final_softcap")
GATED_MLPS = ("swiglu", "geglu")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
WEIGHT_LAYOUTS = ("out_in", "in_out")


@dataclasses.dataclass(frozen=True)
class ConfigKeys:
  """config.json's key for each architecture number. `num_kv_heads` / `head_dim` None: the dialect has no
  such key, so the family only holds multi-head attention with head dim d_model / heads."""
  d_model: str
  num_layers: str
  num_heads: str
  max_len: str
  mlp_hidden: str
  norm_eps: str
  activation: str
  num_kv_heads: str | None
  head_dim: str | None


class WindowStyle(NamedTuple):
  """How a family's config.json states sliding-window attention. read(hf, path) -> the `TransformerConfig` fields
  `sliding_window` (0: none) and, where layers differ, `global_layers`; ConfigError through `path` for what cl_jax
  cannot hold. write(cfg) -> the config.json keys for `cfg`'s windows. per_layer: whether the style can say that
  some layers slide and others do not. A family without a WindowStyle holds no windowed model."""
  read: Callable[[dict, str], dict]
  write: Callable[[TransformerConfig], dict]
  per_layer: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face family: its config.json dialect, its conventions and its tensor names (module docstring).

  activations: config.json activation name -> the `TransformerConfig` fields it means; the first entry that
    matches a config is the one export writes.
  qkv_bias / o_bias / mlp_bias: True / False when the family always / never has those biases, or the name of the
    config.json flag that switches them (absent: false). Biases sharing one flag must agree to be exported.
  tensors: role (ROLES) -> tensor name without the prefix and the '.weight' / '.bias' suffix.
  prefix: the prefix of every tensor but `lm_head` in `*ForCausalLM` checkpoints; checkpoints of the bare model
    (the original gpt2) omit it, which import detects.
  buffers: suffixes of non-parameter tensors a checkpoint may carry (RoPE tables, causal masks): skipped.
  default_mlp_ratio: the MLP width when config.json leaves it out, as a multiple of d_model (0: it must name it).
  conventions: `TransformerConfig` options (CONVENTION_FIELDS) every model of the family has, e.g. Qwen3's
    {'qk_norm': 'head'}; the others stay at their defaults.
  scalars: config.json key -> `TransformerConfig` field (SCALAR_FIELDS); null or absent-without-default reads 0.
  rope_by_layer_type: RoPE settings are given per layer type (Gemma 3's `rope_parameters` {'full_attention': ...,
    'sliding_attention': ...}); the sliding layers' theta is `rope_local_base`.
  """
  model_type: str
  architecture: str
  keys: ConfigKeys
  defaults: Mapping[str, Any]
  activations: Mapping[str, Mapping[str, Any]]
  tensors: Mapping[str, str]
  prefix: str
  norm: str = "rmsnorm"
  positions: str = "rope"
  weight_layout: str = "out_in"
  qkv_bias: bool | str = False
  o_bias: bool | str = False
  mlp_bias: bool | str = False
  window: WindowStyle | None = None
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  lm_head: str = "lm_head"
  buffers: tuple[str, ...] = ()
  default_mlp_ratio: int = 0
  conventions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  scalars: Mapping[str, str] = dataclasses.field(default_factory=dict)
  rope_by_layer_type: bool = False

  def __post_init__(self):
    # A malformed entry fails where it is written, not at the first checkpoint that uses it.
    where = f"hf_families: family {self.model_type!r}"
    for field, allowed in (("norm", NORMS), ("positions", POSITIONS), ("weight_layout", WEIGHT_LAYOUTS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{where}: {field}={getattr(self, field)!r}, expected one of {allowed}")
    if not self.activations:
      raise ValueError(f"{where}: names no activation")
    odd = sorted(set(self.conventions) - set(CONVENTION_FIELDS)) + sorted(set(self.scalars.values()) -
                                                                             set(SCALAR_FIELDS))
    if odd:
      raise ValueError(f"{where}: conventions / scalars name fields {odd}; allowed: {CONVENTION_FIELDS} / "
                       f"{SCALAR_FIELDS}")
    needed = {"embed", "final_norm", "q", "k", "v", "o", "up", "down",
              *BLOCK_NORM_ROLES[self.conventions.get("block_norms", "pre")]}
    if self.conventions.get("qk_norm", "none") != "none":
      needed |= {"q_norm", "k_norm"}
    if self.positions == "learned":
      needed.add("pos_embed")
    if any(fields.get("mlp") in GATED_MLPS for fields in self.activations.values()):
      needed.add("gate")
    missing, unknown = sorted(needed - set(self.tensors)), sorted(set(self.tensors) - set(ROLES))
    if missing or unknown:
      raise ValueError(f"{where}: tensors lack roles {missing} / name unknown roles {unknown}")
    unindexed = [r for r in LAYER_ROLES if r in self.tensors and "{i}" not in self.tensors[r]]
    if unindexed:
      raise ValueError(f"{where}: layer tensors {unindexed} do not name their layer with '{{i}}'")

  def bias_settings(self) -> tuple[tuple[str, bool | str], ...]:
    """(TransformerConfig bias field, this family's setting for it)."""
    return (("qkv_bias", self.qkv_bias), ("o_bias", self.o_bias), ("mlp_bias", self.mlp_bias))


# ------------------------------------------------------------------------------------------- window styles

def _one_window_read(hf: dict, path: str) -> dict:
  return {"sliding_window": int(hf.get("sliding_window") or 0)}


def _one_window_write(cfg) -> dict:
  if len(set(cfg.layer_windows())) > 1:  # `_fits` keeps such configs out; a guard against a caller that skips it
    raise ConfigError(f"sliding window per layer {cfg.layer_windows()}: this family has one window for all layers")
  return {"sliding_window": cfg.sliding_window or None}


# Mistral, Phi-3: `sliding_window` (null: none) applies to every layer.
ONE_WINDOW = WindowStyle(_one_window_read, _one_window_write)
LAYER_TYPES = ("sliding_attention", "full_attention")


def layer_types_window(switch: str | None, legacy: Callable[[dict, int], list[str]]) -> WindowStyle:
  """A per-layer style: config.json's `layer_types` (one of LAYER_TYPES per layer) says which layers slide by
  `sliding_window`, and `switch` (a config.json flag, if the family has one) turns windows on at all. Configs
  written before transformers had `layer_types` state the pattern another way: `legacy(hf, num_layers)`."""

  def read(hf: dict, path: str) -> dict:
    window = int(hf.get("sliding_window") or 0)
    if (switch and not hf.get(switch)) or not window:
      return {"sliding_window": 0}
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or legacy(hf, n)
    if len(types) != n or set(types) - set(LAYER_TYPES):
      raise ConfigError(f"{path}: layer_types={types}: expected {n} entries, each one of {LAYER_TYPES}")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    return {"sliding_window": 0} if len(full) == n else {"sliding_window": window, "global_layers": full}

  def write(cfg) -> dict:
    windows = cfg.layer_windows()
    out = {"sliding_window": cfg.sliding_window or None,
           "layer_types": [LAYER_TYPES[0] if w else LAYER_TYPES[1] for w in windows]}
    if switch:
      out[switch] = any(windows)
    if switch and any(windows):  # for readers without `layer_types`: exact when the sliding layers are the last ones
      out["max_window_layers"] = min(i for i, w in enumerate(windows) if w)
    return out

  return WindowStyle(read, write, per_layer=True)


# Qwen2 / Qwen3: `use_sliding_window` switches windows on, `layer_types` says which layers slide (transformers
# < 4.53 had no `layer_types`: the layers from `max_window_layers` on slide).
LAYER_TYPES_WINDOW = layer_types_window("use_sliding_window", lambda hf, n: [
    LAYER_TYPES[0] if i >= int(hf.get("max_window_layers", n)) else LAYER_TYPES[1] for i in range(n)])


def _every(period: int):
  """Gemma's `sliding_window_pattern` p (before `layer_types`): every p-th layer (1-based) is global."""
  return lambda hf, n: [LAYER_TYPES[1] if (i + 1) % int(hf.get("sliding_window_pattern", period)) == 0 else
                        LAYER_TYPES[0] for i in range(n)]


# ------------------------------------------------------------------------------------------------ entries

LLAMA_KEYS = ConfigKeys(
    d_model="hidden_size", num_layers="num_hidden_layers", num_heads="num_attention_heads",
    max_len="max_position_embeddings", mlp_hidden="intermediate_size", norm_eps="rms_norm_eps",
    activation="hidden_act", num_kv_heads="num_key_value_heads", head_dim="head_dim")
LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                  "tie_word_embeddings": False}
SWIGLU = {"silu": {"mlp": "swiglu"}}  # SwiGLU: down(silu(gate x) * up x)
# The decoder layer Llama, Mistral and Qwen2 share (`model.layers.{i}.`).
LLAMA_TENSORS = {
    "embed": "embed_tokens", "final_norm": "norm",
    "attn_norm": "layers.{i}.input_layernorm", "mlp_norm": "layers.{i}.post_attention_layernorm",
    "q": "layers.{i}.self_attn.q_proj", "k": "layers.{i}.self_attn.k_proj", "v": "layers.{i}.self_attn.v_proj",
    "o": "layers.{i}.self_attn.o_proj",
    "gate": "layers.{i}.mlp.gate_proj", "up": "layers.{i}.mlp.up_proj", "down": "layers.{i}.mlp.down_proj"}


def _llama_like(model_type: str, architecture: str, tensors=None, defaults=None, **conventions) -> Family:
  return Family(model_type, architecture, keys=LLAMA_KEYS, defaults={**LLAMA_DEFAULTS, **(defaults or {})},
                activations=SWIGLU, tensors={**LLAMA_TENSORS, **(tensors or {})}, prefix="model.",
                buffers=("rotary_emb.inv_freq",), **conventions)


QK_NORMS = {"q_norm": "layers.{i}.self_attn.q_norm", "k_norm": "layers.{i}.self_attn.k_norm"}
# Gemma 2 / 3: a norm before and after each branch; `post_attention_layernorm` is the one on the attention's
# output here (Llama's name for the norm before the MLP).
GEMMA_TENSORS = {**LLAMA_TENSORS, "attn_post_norm": "layers.{i}.post_attention_layernorm",
                 "mlp_norm": "layers.{i}.pre_feedforward_layernorm",
                 "mlp_post_norm": "layers.{i}.post_feedforward_layernorm"}
GEMMA_CONVENTIONS = {"block_norms": "sandwich", "norm_plus_one": True, "embed_scale": True}
GEMMA_SCALARS = {"query_pre_attn_scalar": "attn_scale_dim", "attn_logit_softcapping": "attn_softcap",
                 "final_logit_softcapping": "final_softcap"}
# GeGLU: down(gelu(gate x) * up x), Gemma's own tanh form first.
GEGLU = {"gelu_pytorch_tanh": {"mlp": "geglu", "gelu_approximate": True},
         "gelu": {"mlp": "geglu", "gelu_approximate": False}}
GEMMA_DEFAULTS = {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                  "tie_word_embeddings": True, "query_pre_attn_scalar": 256}


def _gemma(model_type: str, architecture: str, period: int, defaults: dict, **options) -> Family:
  return Family(model_type, architecture, keys=dataclasses.replace(LLAMA_KEYS, activation="hidden_activation"),
                defaults={**GEMMA_DEFAULTS, **defaults}, activations=GEGLU, prefix="model.",
                buffers=("rotary_emb.inv_freq", "embed_scale"), qkv_bias="attention_bias",
                o_bias="attention_bias", window=layer_types_window(None, _every(period)),
                **{"scalars": GEMMA_SCALARS, **options})


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    # Llama 2 / 3 / 3.1+: `attention_bias` switches the q, k, v and o biases together, `mlp_bias` the MLP's.
    _llama_like("llama", "LlamaForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
                mlp_bias="mlp_bias"),
    _llama_like("mistral", "MistralForCausalLM", window=ONE_WINDOW),
    _llama_like("qwen2", "Qwen2ForCausalLM", qkv_bias=True, window=LAYER_TYPES_WINDOW),
    Family(
        "gpt2", "GPT2LMHeadModel", prefix="transformer.", norm="layernorm", positions="learned",
        weight_layout="in_out", qkv_bias=True, o_bias=True, mlp_bias=True, default_mlp_ratio=4,
        keys=ConfigKeys(d_model="n_embd", num_layers="n_layer", num_heads="n_head", max_len="n_positions",
                        mlp_hidden="n_inner", norm_eps="layer_norm_epsilon", activation="activation_function",
                        num_kv_heads=None, head_dim=None),
        defaults={"layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True},
        # transformers' tanh approximations of gelu (GPT-2's own `gelu_new` first), then the exact erf form.
        activations={name: {"mlp": "gelu", "gelu_approximate": True}
                     for name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")} | {
                         "gelu": {"mlp": "gelu", "gelu_approximate": False}},
        fixed={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False},
        tensors={"embed": "wte", "pos_embed": "wpe", "final_norm": "ln_f",
                 "attn_norm": "h.{i}.ln_1", "mlp_norm": "h.{i}.ln_2",
                 # One fused Conv1D [D, 3D] for q, k and v.
                 "q": "h.{i}.attn.c_attn", "k": "h.{i}.attn.c_attn", "v": "h.{i}.attn.c_attn",
                 "o": "h.{i}.attn.c_proj", "up": "h.{i}.mlp.c_fc", "down": "h.{i}.mlp.c_proj"},
        buffers=("attn.bias", "attn.masked_bias")),
    # Qwen3: Qwen2's layer with an RMSNorm over each head of q and k (before RoPE), biases only by flag.
    _llama_like("qwen3", "Qwen3ForCausalLM", tensors=QK_NORMS, qkv_bias="attention_bias", o_bias="attention_bias",
                window=LAYER_TYPES_WINDOW, conventions={"qk_norm": "head"}),
    # Gemma 2: sandwich norms with `1 + w` gains, embeddings scaled by sqrt(D), scores scaled by
    # query_pre_attn_scalar^-1/2 and soft-capped, soft-capped logits, GeGLU, every other layer sliding.
    _gemma("gemma2", "Gemma2ForCausalLM", 2, {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
           tensors=GEMMA_TENSORS, conventions=GEMMA_CONVENTIONS),
    # Phi-3: Llama's layer with q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj` (fused in that order).
    _llama_like("phi3", "Phi3ForCausalLM", window=ONE_WINDOW,
                defaults={"max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
                tensors={"q": "layers.{i}.self_attn.qkv_proj", "k": "layers.{i}.self_attn.qkv_proj",
                         "v": "layers.{i}.self_attn.qkv_proj", "gate": "layers.{i}.mlp.gate_up_proj",
                         "up": "layers.{i}.mlp.gate_up_proj"}),
    # OLMo 2: no norm before the branches, one after each (on its output), and q / k normalised over their whole
    # projection before the heads are split.
    _llama_like("olmo2", "Olmo2ForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
                defaults={"rms_norm_eps": 1e-5},
                tensors={"attn_post_norm": "layers.{i}.post_attention_layernorm",
                         "mlp_post_norm": "layers.{i}.post_feedforward_layernorm", **QK_NORMS},
                conventions={"qk_norm": "full", "block_norms": "post"}),
    # Gemma 3 (text-only, `Gemma3ForCausalLM`): Gemma 2 with per-head q/k norms, no soft-capping by default, five
    # sliding layers to each global one, and the sliding layers' own (unscaled) RoPE theta.
    _gemma("gemma3_text", "Gemma3ForCausalLM", 6, {"max_position_embeddings": 131072},
           tensors={**GEMMA_TENSORS, **QK_NORMS}, conventions={**GEMMA_CONVENTIONS, "qk_norm": "head"},
           fixed={"use_bidirectional_attention": False}, rope_by_layer_type=True,
           # transformers' Gemma 3 attention never soft-caps, whatever `attn_logit_softcapping` says: not read.
           scalars={k: v for k, v in GEMMA_SCALARS.items() if v != "attn_softcap"}),
)}


def supported() -> str:
  """The model_types FAMILIES holds, for error messages."""
  return ", ".join(FAMILIES)


def lookup(model_type, path: str = "config.json") -> Family:
  """The entry for `model_type` (ConfigError through `path` when there is none)."""
  if model_type not in FAMILIES:
    raise ConfigError(f"{path}: model_type={model_type!r} is not supported; supported families: {supported()}")
  return FAMILIES[model_type]


__all__ = ["BLOCK_NORM_ROLES", "CONVENTION_FIELDS", "FAMILIES", "LAYER_TYPES_WINDOW", "ONE_WINDOW", "ROLES",
           "SCALAR_FIELDS", "ConfigKeys", "Family", "WindowStyle", "layer_types_window", "lookup", "supported"]
