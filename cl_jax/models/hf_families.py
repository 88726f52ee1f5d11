"""Hugging Face model families as data: one `Family` entry per config.json `model_type`.

An entry states everything `cl_jax.models.hf_checkpoint` needs to read and write that family's checkpoints:

  * its config.json dialect: the key that holds each architecture number (`ConfigKeys`: `hidden_size` in Llama,
    `n_embd` in GPT-2, ...), the value transformers assumes when a key is absent (`defaults`), and flags that
    cl_jax supports at one value only (`fixed`, e.g. GPT-2's `scale_attn_weights=true`);
  * its architecture conventions: the norm (RMSNorm or LayerNorm), the positions (RoPE or a learned table), the
    activation names it uses and the MLP each one means, which biases it has (always, never, or as a config.json
    flag says), and how it states a sliding window (`WindowStyle`);
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
# pos_embed/embedding, final_norm -> final_norm/{scale,bias}, attn_norm / mlp_norm -> block_i/<role>/...,
# q, k, v, o -> block_i/attn/<role>/..., gate, up, down -> block_i/mlp/<role>/... (cl_jax.models.transformer).
MODEL_ROLES = ("embed", "pos_embed", "final_norm")
LAYER_ROLES = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down")
ROLES = MODEL_ROLES + LAYER_ROLES
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
  """How a family's config.json states sliding-window attention. read(hf, path) -> the window (0: none),
  ConfigError through `path` for what cl_jax cannot hold; write(cfg) -> the config.json keys for `cfg`'s window.
  A family without a WindowStyle holds no windowed model."""
  read: Callable[[dict, str], int]
  write: Callable[[TransformerConfig], dict]


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

  def __post_init__(self):
    # A malformed entry fails where it is written, not at the first checkpoint that uses it.
    where = f"hf_families: family {self.model_type!r}"
    for field, allowed in (("norm", NORMS), ("positions", POSITIONS), ("weight_layout", WEIGHT_LAYOUTS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{where}: {field}={getattr(self, field)!r}, expected one of {allowed}")
    if not self.activations:
      raise ValueError(f"{where}: names no activation")
    needed = {"embed", "final_norm", "attn_norm", "mlp_norm", "q", "k", "v", "o", "up", "down"}
    if self.positions == "learned":
      needed.add("pos_embed")
    if any(fields.get("mlp") == "swiglu" for fields in self.activations.values()):
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

def _one_window_read(hf: dict, path: str) -> int:
  return int(hf.get("sliding_window") or 0)


def _one_window_write(cfg) -> dict:
  return {"sliding_window": cfg.sliding_window or None}


# Mistral: `sliding_window` (null: none) applies to every layer.
ONE_WINDOW = WindowStyle(_one_window_read, _one_window_write)


def _layer_types_read(hf: dict, path: str) -> int:
  if not hf.get("use_sliding_window"):
    return 0
  n = int(hf["num_hidden_layers"])
  # transformers < 4.53 had no `layer_types`: layers from `max_window_layers` on slide.
  types = hf.get("layer_types") or ["sliding_attention" if i >= int(hf.get("max_window_layers", n)) else
                                    "full_attention" for i in range(n)]
  if len(set(types)) > 1:
    raise ConfigError(f"{path}: layer_types={types}: a mix of sliding and full attention layers is not supported")
  return int(hf["sliding_window"]) if types[0] == "sliding_attention" else 0


def _layer_types_write(cfg) -> dict:
  out = {"use_sliding_window": bool(cfg.sliding_window), "sliding_window": cfg.sliding_window or None,
         "layer_types": [("sliding_attention" if cfg.sliding_window else "full_attention")
                         for _ in range(cfg.num_layers)]}
  if cfg.sliding_window:  # every layer slides (cl_jax has one window for all layers)
    out["max_window_layers"] = 0
  return out


# Qwen2: `use_sliding_window` switches it on, `layer_types` (or `max_window_layers`) says which layers slide.
LAYER_TYPES_WINDOW = WindowStyle(_layer_types_read, _layer_types_write)

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


def _llama_like(model_type: str, architecture: str, **conventions) -> Family:
  return Family(model_type, architecture, keys=LLAMA_KEYS, defaults=LLAMA_DEFAULTS, activations=SWIGLU,
                tensors=LLAMA_TENSORS, prefix="model.", buffers=("rotary_emb.inv_freq",), **conventions)


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
)}


def supported() -> str:
  """The model_types FAMILIES holds, for error messages."""
  return ", ".join(FAMILIES)


def lookup(model_type, path: str = "config.json") -> Family:
  """The entry for `model_type` (ConfigError through `path` when there is none)."""
  if model_type not in FAMILIES:
    raise ConfigError(f"{path}: model_type={model_type!r} is not supported; supported families: {supported()}")
  return FAMILIES[model_type]


__all__ = ["FAMILIES", "LAYER_TYPES_WINDOW", "ONE_WINDOW", "ROLES", "ConfigKeys", "Family", "WindowStyle", "lookup",
           "supported"]
