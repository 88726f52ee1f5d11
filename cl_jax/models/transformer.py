"""A decoder-only (causal) transformer language model in Flax NNX, config-driven over the families it imports.

Architecture (pre-norm by default; GPT-2, Llama 2/3, Mistral, Qwen2/3, Phi-3, Gemma 2/3 and OLMo 2 are all
instances of it, the last ones through the options below):

  h_0     = E[tokens] (+ P[positions] with learned positions, GPT-2)     embedding, E in R^{V x D}
  h'_l    = h_{l-1} + Attn_l(Norm(h_{l-1}))                               causal self-attention
  h_l     = h'_l + MLP_l(Norm(h'_l))
  logits  = Norm(h_L) W_out,   W_out = E^T when embeddings are tied (Press & Wolf 2017)

  Norm      RMSNorm x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016),
            both in float32 with the checkpoint's eps.
  MLP       'gelu':   W_down gelu(W_up x + b_up) + b_down (tanh-approximated gelu by default: GPT-2's
                      `gelu_new`, Hendrycks & Gimpel 2016);
            'swiglu': W_down (silu(W_gate x) * W_up x) (Shazeer 2020; Llama, Mistral, Qwen2).
  Attn      softmax(q k^T / sqrt(Dh) + causal mask) v with H query heads and K <= H key/value heads:
            grouped-query attention (Ainslie et al. 2023) lets query head h read key/value head h // (H/K);
            an optional sliding window (Mistral) hides keys more than `sliding_window - 1` positions back.
            Optional biases: q/k/v (Qwen2; GPT-2 with all the others), o, MLP.
  Positions rotary (RoPE; Su et al. 2021): queries and keys are rotated pairwise, (x_i, x_{i+Dh/2}) by angle
            pos * f_i with f_i = theta^(-2i/Dh) ("rotate-half" layout, as the Hugging Face checkpoints of
            Llama-family models are stored), so q.k depends on positions only through their difference.
            Context-extension scalings of f: 'linear' f_i / factor (Chen et al. 2023, position
            interpolation) and 'llama3' (Meta's Llama 3.1 recipe: wavelengths 2 pi / f_i above
            L_orig / low_freq_factor are divided by `factor`, those below L_orig / high_freq_factor kept, and
            the band between interpolated with s = (L_orig / wavelength - low) / (high - low):
            f' = (1 - s) f / factor + s f). Or 'learned' absolute position embeddings P (GPT-2).

Options (`TransformerConfig`; each defaults to the plain model above and is resolved when the model is traced, so
a model that leaves it off runs the same program as before it existed):
  qk_norm        RMSNorm of q and k before RoPE, per head over Dh ('head': Qwen3, Gemma 3; Dehghani et al. 2023)
                 or over the whole projection [H Dh] ('full': OLMo 2, OLMo et al. 2024).
  block_norms    'sandwich': h' = h + Norm(Attn(Norm(h))), h'' = h' + Norm(MLP(Norm(h'))) (Gemma 2/3);
                 'post':     h' = h + Norm(Attn(h)),       h'' = h' + Norm(MLP(h'))        (OLMo 2).
  norm_plus_one  RMSNorm gain (1 + w) with w stored (and initialised at 0) (Gemma).
  embed_scale    h_0 = sqrt(D) E[tokens] (Gemma).
  attn_scale_dim scores q.k / sqrt(s) with s = query_pre_attn_scalar instead of Dh (Gemma).
  attn_softcap,  soft-capping c tanh(x / c) of the attention scores (before the mask) and of the logits
  final_softcap  (Gemma 2; Gemma Team 2024, after Bello et al. 2016).
  mlp='geglu'    W_down (gelu(W_gate x) * W_up x) (Shazeer 2020; Gemma, tanh gelu).
  global_layers  layers exempt from `sliding_window` (Gemma 2: every other layer; Gemma 3: one in six);
  rope_local_base  theta of the sliding layers' RoPE, unscaled (Gemma 3: 10k local, 1M global).
  Where layers differ (windows / RoPE), every block holds the same static tables (window and RoPE kind per layer)
  and is told its index: a Python int in the unrolled loop (static: the same program as one window), a traced one
  under `scan_layers`, scanned along with the stacked params (the window mask and the RoPE frequencies are then
  picked from the tables; everything else is unchanged, so the stacked layout keeps one block's program).

Every projection is an explicit `einsum` over a named-axes kernel (`q: [D, H, Dh]`, `k, v: [D, K, Dh]`,
`o: [H, Dh, D]`, `up, gate: [D, F]`, `down: [F, D]`), so GSPMD can shard any axis of any kernel (FSDP over
`fsdp`, heads or MLP width over a model axis) and the batch over `data` without code changes. Parameter paths
are stable strings: `embed.embedding`, `pos_embed.embedding` (learned positions only),
`block_{i}.attn.{q,k,v,o}.{kernel,bias}`, `block_{i}.mlp.{gate,up,down}.{kernel,bias}`,
`block_{i}.{attn_norm,mlp_norm}.{scale,bias}`, `final_norm.{scale,bias}`, `lm_head.kernel` (untied only);
biases, `gate` and the norms' `bias` exist only where the config asks for them, and so do
`block_{i}.{attn_post_norm,mlp_post_norm}.scale` (block_norms 'sandwich' / 'post'; 'post' has no attn_norm /
mlp_norm) and `block_{i}.attn.{q_norm,k_norm}.scale` ([Dh], or [H Dh] / [K Dh] for qk_norm='full'). With `scan_layers=True` the blocks
are stored stacked instead: `stacked_blocks.attn.q.kernel [L, D, H, Dh]` and so on, one leaf per kind with a leading
layer axis, `stacked_blocks.*[i]` being `block_{i}.*` (`cl_jax.models.scan_layout` converts between the layouts).
`cl_jax.models.hf_checkpoint` maps Hugging Face checkpoints onto these paths and back, in either layout.

Mixed precision: parameters are float32 unless loaded otherwise; with `compute_dtype='bfloat16'` weights and
activations are cast to bf16 for the matmuls, while the residual stream, norms, softmax and the returned
logits stay float32 (the usual recipe, Micikevicius et al. 2018).

The same module serves training (`__call__`, the full causal forward pass) and KV-cache decoding
(`forward_with_cache`), used by `cl_jax.models.sampling`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cl_jax.models.scan_layout import STACK, block_key

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


_NORMS = ("rmsnorm", "layernorm")
_MLPS = ("gelu", "swiglu", "geglu")
_QK_NORMS = ("none", "head", "full")
_BLOCK_NORMS = ("pre", "sandwich", "post")
_POSITIONS = ("rope", "learned")
_ROPE_SCALINGS = ("none", "linear", "llama3")

# Activation rematerialisation (Chen et al. 2016, "Training deep nets with sublinear memory cost") per block:
#   'none'  every intermediate of the forward pass is kept for the backward pass (fastest, most memory);
#   'full'  only each block's input is kept, the block is recomputed in the backward pass (~1/3 more FLOPs);
#   'dots'  the outputs of the projections (matmuls without batch dimensions) are kept, the cheap elementwise
#           work and the attention scores (batched matmuls, O(T^2) memory) are recomputed.
REMAT_POLICIES = {"none": None, "full": None, "dots": "dots_with_no_batch_dims_saveable"}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of `TransformerLM`. Frozen, so it can be a static jit argument.

  `max_len` is the context length the model is trained and sampled at (with RoPE it only bounds sampling and
  data; with learned positions it is the size of the position table). The MLP's hidden width is `mlp_hidden`,
  or `mlp_ratio * d_model` when that is 0; `num_kv_heads=0` means one key/value head per query head;
  `attn_head_dim=0` means d_model / num_heads. The `rope_*` fields other than `rope_base` (theta) matter only
  for their `rope_scaling` ('linear': rope_factor; 'llama3': all four, see the module docstring).
  """
  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 256
  tied_embeddings: bool = True
  norm: str = "rmsnorm"  # 'rmsnorm' | 'layernorm'
  compute_dtype: str = "float32"  # 'float32' | 'bfloat16'
  rope_base: float = 10_000.0
  init_std: float = 0.02
  norm_eps: float = 1e-6
  mlp: str = "gelu"  # 'gelu' | 'swiglu'
  gelu_approximate: bool = True  # tanh form (GPT-2's gelu_new); False: exact erf form
  mlp_hidden: int = 0  # 0: mlp_ratio * d_model
  num_kv_heads: int = 0  # 0: num_heads (multi-head attention); fewer: grouped-query attention
  attn_head_dim: int = 0  # 0: d_model // num_heads
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  positions: str = "rope"  # 'rope' | 'learned'
  rope_scaling: str = "none"  # 'none' | 'linear' | 'llama3'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  sliding_window: int = 0  # 0: none; W: a query sees the W most recent keys (itself included)
  # Architecture options of further families (module docstring, "Options"); the defaults are the plain pre-norm
  # model above, and each is resolved when the model is traced, so a model that does not use one pays nothing.
  global_layers: tuple[int, ...] = ()  # layers that ignore `sliding_window` (Gemma 2/3's full-attention layers)
  rope_local_base: float = 0.0  # > 0: RoPE theta of the sliding layers, unscaled (Gemma 3); 0: as the others
  qk_norm: str = "none"  # 'none' | 'head' (over Dh, Qwen3 / Gemma 3) | 'full' (over all of q / k, OLMo 2)
  block_norms: str = "pre"  # 'pre' | 'sandwich' (pre + post, Gemma 2/3) | 'post' (after each branch, OLMo 2)
  norm_plus_one: bool = False  # RMSNorm gain (1 + w), w stored (Gemma)
  embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
  attn_scale_dim: float = 0.0  # scores q.k / sqrt(attn_scale_dim) (Gemma's query_pre_attn_scalar); 0: head dim
  attn_softcap: float = 0.0  # > 0: scores c tanh(s / c) before the mask (Gemma 2)
  final_softcap: float = 0.0  # > 0: logits c tanh(z / c) (Gemma 2)
  # Memory / compile at scale (numerics unchanged up to float reduction order; see `_blocks`):
  remat: str = "none"  # 'none' | 'full' | 'dots': rematerialise each block's activations in the backward pass
  # Run the blocks under one lax.scan over params stored stacked (`stacked_blocks.*`, a leading layer axis; see
  # cl_jax.models.scan_layout): compile time independent of depth. This also selects the params layout.
  scan_layers: bool = False
  attn_chunk: int = 0  # > 0: attention over query blocks of this size, each rematerialised (O(chunk x T) memory)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"TransformerConfig.{name}={value!r}: expected a positive integer")
    for name in ("mlp_hidden", "num_kv_heads", "attn_head_dim", "sliding_window", "attn_chunk"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"TransformerConfig.{name}={value!r}: expected a non-negative integer (0: default)")
    if not self.attn_head_dim and self.d_model % self.num_heads:
      raise ValueError(f"TransformerConfig.d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads} (or set attn_head_dim)")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"TransformerConfig.num_kv_heads={self.num_kv_heads}: must divide "
                       f"num_heads={self.num_heads}")
    if self.positions not in _POSITIONS:
      raise ValueError(f"TransformerConfig.positions={self.positions!r}: expected one of {_POSITIONS}")
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"TransformerConfig: head dim {self.head_dim} must be even for RoPE")
    if self.norm not in _NORMS:
      raise ValueError(f"TransformerConfig.norm={self.norm!r}: expected 'rmsnorm' or 'layernorm'")
    if not self.norm_eps > 0:
      raise ValueError(f"TransformerConfig.norm_eps={self.norm_eps!r}: expected a positive number")
    if self.mlp not in _MLPS:
      raise ValueError(f"TransformerConfig.mlp={self.mlp!r}: expected one of {_MLPS}")
    if self.qk_norm not in _QK_NORMS:
      raise ValueError(f"TransformerConfig.qk_norm={self.qk_norm!r}: expected one of {_QK_NORMS}")
    if self.block_norms not in _BLOCK_NORMS:
      raise ValueError(f"TransformerConfig.block_norms={self.block_norms!r}: expected one of {_BLOCK_NORMS}")
    if not isinstance(self.global_layers, tuple) or any(
        not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_layers for i in self.global_layers):
      raise ValueError(f"TransformerConfig.global_layers={self.global_layers!r}: expected a tuple of layer indices "
                       f"in [0, {self.num_layers})")
    for name in ("rope_local_base", "attn_scale_dim", "attn_softcap", "final_softcap"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r}: expected a number >= 0 (0: off)")
    if self.rope_scaling not in _ROPE_SCALINGS:
      raise ValueError(f"TransformerConfig.rope_scaling={self.rope_scaling!r}: expected one of {_ROPE_SCALINGS}")
    if self.rope_scaling != "none" and not self.rope_factor > 0:
      raise ValueError(f"TransformerConfig.rope_factor={self.rope_factor!r}: expected a positive number")
    if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
      raise ValueError(f"TransformerConfig.rope_low_freq_factor={self.rope_low_freq_factor}, "
                       f"rope_high_freq_factor={self.rope_high_freq_factor}: need high > low > 0")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"TransformerConfig.remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
    if self.compute_dtype not in _DTYPES:
      raise ValueError(f"TransformerConfig.compute_dtype={self.compute_dtype!r}: expected one of "
                       f"{sorted(_DTYPES)}")

  @property
  def head_dim(self) -> int:
    return self.attn_head_dim or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.mlp_hidden or self.mlp_ratio * self.d_model

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

  def layer_windows(self) -> tuple[int, ...]:
    """Each layer's sliding window (0: it sees every earlier key)."""
    return tuple(0 if i in self.global_layers else int(self.sliding_window) for i in range(self.num_layers))

  def layer_is_local(self) -> tuple[bool, ...]:
    """Each layer's RoPE kind: True where it slides and has its own theta (`rope_local_base`)."""
    return tuple(bool(self.rope_local_base) and w > 0 for w in self.layer_windows())

  @property
  def per_layer(self) -> bool:
    """Whether the layers differ (window or RoPE): then each block is told its index, a traced one in a scan."""
    return len(set(zip(self.layer_windows(), self.layer_is_local()))) > 1

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


# Named sizes (parameter counts exclude the V x D embedding). `tiny` trains on 2 CPU cores in minutes
# (byte-level); the others follow GPT-2 / Pythia width-to-depth ratios and are meant for accelerators.
# On a pod, every kernel is sharded over the mesh's 'fsdp' axis (ZeRO-3 style, cl_jax.sharding) and
# the batch over ('data', 'fsdp'); e.g. on a v4-32 slice (16 chips), see configs/cpt_lm.py:
#   python run.py --config configs/cpt_lm.py:mixture=70_30,size=350m --config.mesh.fsdp=16
# For `1b` (bf16 compute), float32 params + grads + Adam moments are ~13 GB in all, < 1 GB per chip
# over 16 chips; activations, not weights, then bound the per-chip batch.
SIZES: dict[str, dict[str, Any]] = {
  "tiny": dict(d_model=128, num_layers=2, num_heads=4, max_len=256),             # ~0.4M
  "small": dict(d_model=256, num_layers=4, num_heads=4, max_len=512),            # ~3.1M
  "base": dict(d_model=512, num_layers=8, num_heads=8, max_len=1024),            # ~25M
  "125m": dict(d_model=768, num_layers=12, num_heads=12, max_len=2048),          # ~85M
  "350m": dict(d_model=1024, num_layers=24, num_heads=16, max_len=2048),         # ~300M
  "1b": dict(d_model=2048, num_layers=16, num_heads=16, max_len=2048,
             compute_dtype="bfloat16"),                                          # ~0.8B
}


def model_config(size: str = "tiny", **overrides) -> TransformerConfig:
  """The `TransformerConfig` of a named size (see `SIZES`), with keyword overrides.

  >>> model_config("tiny", vocab_size=259, tied_embeddings=False)
  """
  if size not in SIZES:
    raise ValueError(f"model size {size!r}: expected one of {sorted(SIZES)}")
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"model_config: unknown field(s) {unknown}; expected among {sorted(fields)}")
  return TransformerConfig(**{**SIZES[size], **overrides})


def constrain(x: jax.Array, *spec) -> jax.Array:
  """`with_sharding_constraint(x, P(*spec))` when traced under a mesh with cl_jax's axes (`jax.set_mesh(mesh)`,
  as the LM train step is compiled); a no-op otherwise (one device, evaluation, sampling).

  FSDP needs both ends pinned, or GSPMD may contract a batch-sharded activation with a kernel sharded over the
  same axis by gathering the activations instead (measured: 4x the temporaries of pure data parallelism, and
  replicated matmuls): kernels are gathered (`P()`) right before their matmul (the backward reduce-scatters their
  gradients) and the residual stream stays sharded over the batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


BATCH = ("data", "fsdp")  # cl_jax.sharding.BATCH_AXES


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class Projection(nnx.Module):
  """A linear map `y = einsum(spec, x, kernel) (+ bias)` over a named-axes kernel; the bias has the output axes'
  shape and starts at zero."""

  def __init__(self, spec: str, shape, *, std: float, dtype, rngs: nnx.Rngs, bias_shape=None):
    self.spec = spec
    self.dtype = dtype
    self.kernel = _normal(rngs, tuple(shape), std)
    if bias_shape is not None:
      self.bias = nnx.Param(jnp.zeros(tuple(bias_shape), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum(self.spec, x.astype(self.dtype), constrain(self.kernel[...].astype(self.dtype)))
    if hasattr(self, "bias"):
      y = y + constrain(self.bias[...].astype(self.dtype))
    return y


class Norm(nnx.Module):
  """RMSNorm `x / rms(x) * scale` or LayerNorm `(x - mean) / std * scale + bias`, computed in float32; with
  `plus_one` (Gemma) the gain is `1 + scale` and `scale` starts at 0."""

  def __init__(self, dim: int, kind: str, eps: float = 1e-6, plus_one: bool = False):
    self.kind = kind
    self.eps = eps
    self.plus_one = bool(plus_one)
    self.scale = nnx.Param((jnp.zeros if plus_one else jnp.ones)((dim,), jnp.float32))
    if kind == "layernorm":
      self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * (1.0 + self.scale[...] if self.plus_one else self.scale[...])
    if self.kind == "layernorm":
      y = y + self.bias[...]
    return y.astype(x.dtype)


def rope_frequencies(cfg: TransformerConfig, local: bool = False) -> np.ndarray:
  """The RoPE angular frequencies f_i = theta^(-2i/Dh), i < Dh/2, after the config's scaling (float32); `local`:
  those of the sliding layers, theta = `rope_local_base` and no scaling (Gemma 3).

  Computed once on the host in float64, so a scaled model's frequencies are as exact as the unscaled ones.
  """
  dh = cfg.head_dim
  freqs = 1.0 / (cfg.rope_local_base if local else cfg.rope_base) ** (np.arange(0, dh, 2, dtype=np.float64) / dh)
  if local:
    return freqs.astype(np.float32)
  if cfg.rope_scaling == "linear":
    freqs = freqs / cfg.rope_factor
  elif cfg.rope_scaling == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_len
    wavelength = 2 * np.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    freqs = np.where(wavelength > original / low, freqs / factor,
                     np.where(wavelength < original / high, freqs, interpolated))
  return freqs.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, base: float, freqs=None) -> jax.Array:
  """Rotary embedding of `x [B, T, H, Dh]` at integer `positions [T]` or `[B, T]` (Su et al. 2021).

  Pairs (x_i, x_{i+Dh/2}) are rotated by angle `pos * f_i` ("rotate-half" layout), in float32, with
  f_i = base^(-2i/Dh) unless `freqs [Dh/2]` (see `rope_frequencies`) is given.
  """
  half = x.shape[-1] // 2
  if freqs is None:
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)  # [(B,) T, half]
  angles = angles if angles.ndim == 3 else angles[None]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_positions: jax.Array, sliding_window=0, q_segments: jax.Array | None = None,
                     k_segments: jax.Array | None = None, query_chunk: int = 0, *, scale: float | None = None,
                     softcap: float = 0.0) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) + M) v with M[t, s] = 0 if k_pos[s] <= q_pos[t] (and, with a sliding window W,
  q_pos[t] - k_pos[s] < W) else -inf. `scale` replaces 1 / sqrt(Dh); `softcap` c > 0 caps the scores,
  s -> c tanh(s / c), before the mask (Gemma 2). `sliding_window` is a Python int (0: none) or a traced int
  (a scanned layer's own window; 0 means none there as well).

  q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with K dividing H (grouped-query attention: query head h reads
  key/value head h // (H / K)). Positions are absolute token indices, so the same function serves the full
  forward pass (S = T) and one decode step against a preallocated cache (T = 1, the cache's unwritten slots
  have positions > q_pos and are masked out). Positions may also be per row, `[B, T]` (packed sequences whose
  positions restart per example); with `q_segments [B, T]` / `k_segments [B, S]` (segment ids of packed examples)
  a query sees only keys of its own segment, so attention never crosses examples.
  """
  qp = q_positions if q_positions.ndim == 2 else q_positions[None]
  kp = k_positions if k_positions.ndim == 2 else k_positions[None]
  b, t = q.shape[:2]
  if query_chunk and t > query_chunk and t % query_chunk == 0:
    # Query blocks one at a time (lax.map), each under jax.checkpoint: the [B, H, chunk, S] scores of one block
    # live at a time in the forward and are recomputed block by block in the backward (memory-efficient
    # attention in the spirit of Rabe & Staats 2021, without the key blocking).
    n = t // query_chunk
    blocks = lambda x: None if x is None else jnp.swapaxes(x.reshape(x.shape[0], n, query_chunk, *x.shape[2:]), 0, 1)

    def one(args):
      qc, qpc, qsc = args
      return causal_attention(qc, k, v, qpc, k_positions, sliding_window, qsc, k_segments, scale=scale,
                              softcap=softcap)

    out = jax.lax.map(jax.checkpoint(one), (blocks(q), blocks(qp), blocks(q_segments)))
    return jnp.swapaxes(out, 0, 1).reshape(q.shape)
  visible = kp[:, None, :] <= qp[:, :, None]  # [B or 1, T, S]
  if isinstance(sliding_window, jax.Array):  # traced per layer: 0 (a global layer) hides nothing
    visible = visible & ((qp[:, :, None] - kp[:, None, :] < sliding_window) | (sliding_window == 0))
  elif sliding_window:
    visible = visible & (qp[:, :, None] - kp[:, None, :] < sliding_window)
  if q_segments is not None:
    visible = visible & (q_segments[:, :, None] == k_segments[:, None, :])
  # jax.nn.dot_product_attention: XLA's fused kernels where the backend has them (cuDNN flash attention on GPU
  # when the mask allows), the reference softmax(q k^T / sqrt(Dh)) v in float32 logits otherwise; it reads
  # grouped-query k/v ([B, S, K, Dh], K dividing H) directly.
  if softcap:
    # No fused kernel caps scores: the reference computation, float32 scores, grouped-query heads h = (k, g).
    n_kv = k.shape[2]
    qg = q.reshape(*q.shape[:2], n_kv, q.shape[2] // n_kv, q.shape[3])
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = softcap * jnp.tanh(scores / softcap)
    # A finite floor, as the fused path uses: a row with no visible key (a left-padding query) stays finite.
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(q.shape)
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=visible[:, None], scale=scale)


class Attention(nnx.Module):
  """Causal self-attention with RoPE (or none, under learned positions); kernels q `[D, H, Dh]`,
  k/v `[D, K, Dh]`, o `[H, Dh, D]`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    # GPT-2's residual scaling: output projections start at std / sqrt(2 L) so the residual stream's
    # variance does not grow with depth.
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    common = dict(dtype=cfg.dtype, rngs=rngs)
    self.q = Projection("btd,dhk->bthk", (d, h, dh), std=cfg.init_std,
                        bias_shape=(h, dh) if cfg.qkv_bias else None, **common)
    self.k = Projection("btd,dhk->bthk", (d, kv, dh), std=cfg.init_std,
                        bias_shape=(kv, dh) if cfg.qkv_bias else None, **common)
    self.v = Projection("btd,dhk->bthk", (d, kv, dh), std=cfg.init_std,
                        bias_shape=(kv, dh) if cfg.qkv_bias else None, **common)
    self.o = Projection("bthk,hkd->btd", (h, dh, d), std=out_std, bias_shape=(d,) if cfg.o_bias else None,
                        **common)
    if cfg.qk_norm != "none":  # RMSNorm of q and k before RoPE: per head over Dh, or over the whole projection
      per = 1 if cfg.qk_norm == "head" else None
      self.q_norm = Norm(dh * (per or h), "rmsnorm", cfg.norm_eps, cfg.norm_plus_one)
      self.k_norm = Norm(dh * (per or kv), "rmsnorm", cfg.norm_eps, cfg.norm_plus_one)
    self.qk_norm = cfg.qk_norm
    self.rope_base = cfg.rope_base
    self.use_rope = cfg.positions == "rope"
    self.attn_chunk = int(cfg.attn_chunk)
    self.scale = float(cfg.attn_scale_dim) ** -0.5 if cfg.attn_scale_dim else None
    self.softcap = float(cfg.attn_softcap)
    # Static per-layer tables, the same in every block (a scan runs one block's graph over all layers): each
    # layer's window and RoPE kind. Tuples of Python numbers (hashable), not arrays: the state stays params only.
    self.per_layer = cfg.per_layer
    self.windows = cfg.layer_windows()
    self.local_layers = cfg.layer_is_local()
    self.rope_freqs = tuple(float(f) for f in rope_frequencies(cfg)) if self.use_rope else None
    self.local_freqs = (tuple(float(f) for f in rope_frequencies(cfg, local=True))
                        if self.use_rope and any(self.local_layers) else None)

  def _layer(self, layer):
    """(sliding window, RoPE frequencies) of layer `layer`: static when the layers agree or `layer` is a Python
    int (the unrolled blocks), looked up from the tables when it is traced (the scanned blocks)."""
    freqs = None if self.rope_freqs is None else np.asarray(self.rope_freqs, np.float32)
    local = None if self.local_freqs is None else np.asarray(self.local_freqs, np.float32)
    if not self.per_layer:  # every layer alike (all of them sliding with their own theta, possibly)
      return self.windows[0], (local if self.local_layers[0] else freqs)
    if layer is None:
      raise ValueError("Attention: this model's layers differ (windows / RoPE); the block needs its layer index")
    if isinstance(layer, (int, np.integer)):
      return self.windows[layer], (local if self.local_layers[layer] else freqs)
    window = jnp.asarray(self.windows, jnp.int32)[layer]
    if local is not None:
      freqs = jnp.where(jnp.asarray(self.local_layers)[layer], local, freqs)
    return window, freqs

  def _norm_qk(self, norm: Norm, x: jax.Array) -> jax.Array:
    if self.qk_norm == "full":  # over the whole projection [H Dh], as OLMo 2 normalises q_proj(x) before the split
      return norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape)
    return norm(x)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
               segment_ids: jax.Array | None = None, layer=None):
    """Returns (output, new_cache). With a cache `{'k','v': [B, S, K, Dh]}` the new keys/values are
    written at `positions` (which must be contiguous) and attention runs over the whole cache. `layer`: this
    block's index (a Python or traced int), needed only when the layers differ (`TransformerConfig.per_layer`)."""
    window, freqs = self._layer(layer)
    # A cache's optional 'offset' [B] (left padding per row): the token in slot s sits at position s - offset, so a
    # left-padded row is rotated exactly as the same prompt alone would be (the causal mask compares slots).
    offset = None if cache is None else cache.get("offset")
    rotated = positions if offset is None else positions[None] - offset[:, None]

    def project(proj, norm):  # projection, q/k norm, RoPE (in the order the plain model always traced them)
      y = proj(x)
      if self.qk_norm != "none":
        y = self._norm_qk(getattr(self, norm), y)
      return rope(y, rotated, self.rope_base, freqs) if self.use_rope else y

    q, k, v = project(self.q, "q_norm"), project(self.k, "k_norm"), self.v(x)
    options = dict(scale=self.scale, softcap=self.softcap)
    if cache is None:
      return self.o(causal_attention(q, k, v, positions, positions, window, segment_ids, segment_ids,
                                     self.attn_chunk, **options)), None
    start = positions[0]
    k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
    k_positions = jnp.arange(k_all.shape[1])
    # An optional cache["valid"] [B, S] (1: a real key) hides left padding of prompts of unequal lengths.
    valid = cache.get("valid")
    q_seg = None if valid is None else jnp.ones(q.shape[:2], valid.dtype)
    out = causal_attention(q, k_all, v_all, positions, k_positions, window, q_seg, valid, **options)
    return self.o(out), {**cache, "k": k_all, "v": v_all}


class MLP(nnx.Module):
  """'gelu': `down(gelu(up(x)))`; 'swiglu': `down(silu(gate(x)) * up(x))`; 'geglu': `down(gelu(gate(x)) * up(x))`
  (Shazeer 2020; Gemma, tanh gelu). up/gate `[D, F]`, down `[F, D]`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    d, f = cfg.d_model, cfg.mlp_dim
    common = dict(dtype=cfg.dtype, rngs=rngs)
    self.kind = cfg.mlp
    self.gelu_approximate = bool(cfg.gelu_approximate)
    if cfg.mlp in ("swiglu", "geglu"):
      self.gate = Projection("btd,df->btf", (d, f), std=cfg.init_std, bias_shape=(f,) if cfg.mlp_bias else None,
                             **common)
    self.up = Projection("btd,df->btf", (d, f), std=cfg.init_std, bias_shape=(f,) if cfg.mlp_bias else None,
                         **common)
    self.down = Projection("btf,fd->btd", (f, d), std=out_std, bias_shape=(d,) if cfg.mlp_bias else None,
                           **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "swiglu":
      return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
    if self.kind == "geglu":
      return self.down(jax.nn.gelu(self.gate(x), approximate=self.gelu_approximate) * self.up(x))
    return self.down(jax.nn.gelu(self.up(x), approximate=self.gelu_approximate))


class Block(nnx.Module):
  """Residual block, by `block_norms`:
    'pre'      x + attn(norm(x)), then + mlp(norm(.))                     (GPT-2, Llama, ...)
    'sandwich' x + post(attn(norm(x))), then + post(mlp(norm(.)))          (Gemma 2/3)
    'post'     x + post(attn(x)), then + post(mlp(.))                      (OLMo 2)
  norms `attn_norm` / `mlp_norm` before each branch, `attn_post_norm` / `mlp_post_norm` on its output."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    def norm():
      return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_plus_one)

    if cfg.block_norms != "post":
      self.attn_norm = norm()
    self.attn = Attention(cfg, rngs=rngs)
    if cfg.block_norms != "pre":
      self.attn_post_norm = norm()
    if cfg.block_norms != "post":
      self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.block_norms != "pre":
      self.mlp_post_norm = norm()
    self.block_norms = cfg.block_norms

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
               segment_ids: jax.Array | None = None, layer=None):
    pre, post = self.block_norms != "post", self.block_norms != "pre"
    a, cache = self.attn(self.attn_norm(x) if pre else x, positions, cache, segment_ids, layer)
    x = x + (self.attn_post_norm(a) if post else a)
    m = self.mlp(self.mlp_norm(x) if pre else x)
    x = x + (self.mlp_post_norm(m) if post else m)
    return x, cache


class TransformerLM(nnx.Module):
  """Causal transformer LM: `module(tokens [B, T] int) -> logits [B, T, V] float32`.

  Used functionally like every cl_jax model: `FunctionalModel.apply(params, tokens)`; the `task`
  argument of that convention is accepted and ignored (one LM serves every domain).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(cfg.init_std))
    if cfg.positions == "learned":
      self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs,
                                 embedding_init=nnx.initializers.normal(cfg.init_std))
    if cfg.scan_layers:
      # The stacked layout (cl_jax.models.scan_layout): one Block whose params carry a leading layer axis. The
      # blocks are drawn one by one from the same rng stream as the per-block layout, so `stack_blocks` of a
      # per-block model's params equals this model's params for the same seed.
      layers = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
      graphdef, first = nnx.split(layers[0])
      states = [first] + [nnx.state(b) for b in layers[1:]]
      setattr(self, STACK, nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)))
    else:
      for i in range(cfg.num_layers):
        setattr(self, block_key(i), Block(cfg, rngs=rngs))
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_plus_one)
    if not cfg.tied_embeddings:
      self.lm_head = Projection("btd,dv->btv", (cfg.d_model, cfg.vocab_size), std=cfg.init_std,
                                dtype=cfg.dtype, rngs=rngs)

  def _logits(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    if self.config.tied_embeddings:
      table = constrain(self.embed.embedding[...].astype(self.config.dtype))
      logits = jnp.einsum("btd,vd->btv", h.astype(self.config.dtype), table)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    if self.config.final_softcap:
      logits = self.config.final_softcap * jnp.tanh(logits / self.config.final_softcap)
    return constrain(logits, BATCH)

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    table = constrain(self.embed.embedding[...])
    # The residual stream stays float32 (each projection casts its input to the compute dtype), so bf16
    # rounding does not accumulate over the depth of the network.
    h = jnp.take(table, tokens.astype(jnp.int32), axis=0).astype(jnp.float32)
    if self.config.embed_scale:
      h = h * np.float32(np.sqrt(self.config.d_model))
    if self.config.positions == "learned":
      pos = jnp.take(self.pos_embed.embedding[...], positions, axis=0)
      h = h + (pos if pos.ndim == 3 else pos[None]).astype(jnp.float32)
    return constrain(h, BATCH)

  def __call__(self, tokens: jax.Array, task: jax.Array | None = None, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Logits of `tokens [B, T]`. Packed rows (`cl_jax.lm.sft.pack`): `segment_ids [B, T]` keep attention inside
    each example and `positions [B, T]` restart at 0 per example; by default one sequence at 0..T-1. A packed
    input `tokens [B, T, 3]` = (tokens, segment_ids, positions) stacked (`cl_jax.lm.sft.sft_batch`'s x) is the same
    call, so wrappers that only pass `x` through (LoRA) keep the packing."""
    del task
    if tokens.ndim == 3 and tokens.shape[-1] == 3 and segment_ids is None and positions is None:
      tokens, segment_ids, positions = tokens[..., 0], tokens[..., 1], tokens[..., 2]
    if tokens.ndim != 2:
      raise ValueError(f"TransformerLM: tokens must be [batch, time], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.arange(tokens.shape[1])
    h = self._embed(tokens, positions)
    return self._logits(self._blocks(h, positions, segment_ids))

  def _blocks(self, h: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The residual stream through every block: a Python loop by default; with `remat` each block is a
    `jax.checkpoint` of a pure function of (its params, h); with `scan_layers` the params are already stacked
    (`self.stacked_blocks`, a leading layer axis on every leaf) and one `lax.scan` runs that function over them, so XLA
    compiles one block whatever the depth and the gradients come out stacked too."""
    cfg = self.config
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(getattr(self, STACK))
    else:
      blocks = [getattr(self, block_key(i)) for i in range(cfg.num_layers)]
      if cfg.remat == "none":
        for i, block in enumerate(blocks):
          h, _ = block(h, positions, None, segment_ids, i)
          h = constrain(h, BATCH)
        return h
      graphdef, first = nnx.split(blocks[0])
      states = [first] + [nnx.split(b)[1] for b in blocks[1:]]

    def block_fn(x, state, layer):
      return constrain(nnx.merge(graphdef, state)(x, positions, None, segment_ids, layer)[0], BATCH)

    if cfg.remat != "none":
      policy = REMAT_POLICIES[cfg.remat]
      # Unrolled, the layer index is a Python int (static); scanned, it is traced (or None: identical layers).
      block_fn = jax.checkpoint(block_fn, prevent_cse=not cfg.scan_layers,
                                static_argnums=() if cfg.scan_layers else (2,),
                                policy=None if policy is None else getattr(jax.checkpoint_policies, policy))
    if not cfg.scan_layers:
      for i, state in enumerate(states):
        h = block_fn(h, state, i)
      return h
    # Layers that differ (alternating local / global attention) scan their index along with their params.
    layers = jnp.arange(cfg.num_layers) if cfg.per_layer else None
    h, _ = jax.lax.scan(lambda x, xs: (block_fn(x, *xs), None), h, (stacked, layers))
    return h

  def forward_with_cache(self, tokens: jax.Array, start: jax.Array, cache: tuple, last_only: bool = False):
    """Runs `tokens [B, T]` at positions start..start+T-1 against a KV cache (prefill: start=0 and the
    whole prompt; decode: T=1). Returns (logits [B, T, V] float32, new cache). The cache is `init_cache`'s:
    one dict per layer, or under `scan_layers` one dict whose k/v carry the layer axis, scanned with the blocks.
    `last_only`: logits of the last position only ([B, 1, V]), what a prefill needs (the LM head is skipped elsewhere)."""
    positions = start + jnp.arange(tokens.shape[1])
    offset = cache[0].get("offset")  # left padding per row (see Attention): learned positions shift with it too
    h = self._embed(tokens, positions if offset is None else jnp.maximum(positions[None] - offset[:, None], 0))
    if self.config.scan_layers:
      (stacked_cache,) = cache
      graphdef, stacked = nnx.split(getattr(self, STACK))
      shared = {k: v for k, v in stacked_cache.items() if k not in ("k", "v")}  # 'valid', 'offset': the same per layer

      def body(x, layer):
        state, k, v, index = layer
        x, c = nnx.merge(graphdef, state)(x, positions, {**shared, "k": k, "v": v}, None, index)
        return x, (c["k"], c["v"])

      index = jnp.arange(self.config.num_layers) if self.config.per_layer else None
      h, (ks, vs) = jax.lax.scan(body, h, (stacked, stacked_cache["k"], stacked_cache["v"], index))
      return self._logits(h[:, -1:] if last_only else h), ({**stacked_cache, "k": ks, "v": vs},)
    new_cache = []
    for i in range(self.config.num_layers):
      h, c = getattr(self, block_key(i))(h, positions, cache[i], None, i)
      new_cache.append(c)
    return self._logits(h[:, -1:] if last_only else h), tuple(new_cache)


def init_cache(cfg: TransformerConfig, batch_size: int, length: int) -> tuple:
  """A zeroed KV cache in the compute dtype: one `{'k','v': [B, length, K, Dh]}` per layer (K key/value heads), or
  with `scan_layers` a single `{'k','v': [L, B, length, K, Dh]}`. Either way a tuple of dicts, so per-cache
  entries such as a key mask ('valid' [B, length]) are added to each dict alike."""
  shape = (batch_size, length, cfg.kv_heads, cfg.head_dim)
  if cfg.scan_layers:  # one entry holding every layer along a leading axis (what the scanned blocks consume)
    shape = (cfg.num_layers, *shape)
    return ({"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)},)
  return tuple({"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
               for _ in range(cfg.num_layers))


def build_lm(cfg: TransformerConfig, seed: int = 0):
  """Builds a `TransformerLM` and splits it: returns (FunctionalModel, params as a pure dict)."""
  from cl_jax.models import functional
  return functional(TransformerLM(cfg, rngs=nnx.Rngs(seed)))


def abstract_lm(cfg: TransformerConfig):
  """(FunctionalModel, params of `jax.ShapeDtypeStruct`s): the model's graph and parameter shapes, with no
  weights initialised (for loading a checkpoint straight into its shardings)."""
  from cl_jax.models import functional
  return functional(nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0))))


def init_lm(cfg: TransformerConfig, seed: int = 0, mesh=None, param_dtype: str = "float32"):
  """(FunctionalModel, params) initialised inside one `jit` whose `out_shardings` are the params' shardings over
  `mesh` (`cl_jax.sharding.state_sharding`): each device computes only its own shards, and no device ever holds
  the whole model. Same values as `build_lm(cfg, seed)` (cast to `param_dtype`: 'float32' | 'bfloat16').
  Without a mesh the params land on the default device."""
  from cl_jax import sharding
  from cl_jax.models import cast_params, functional
  model, abstract = abstract_lm(cfg)
  shardings = None if mesh is None else sharding.state_sharding(abstract, mesh)

  def make():
    return cast_params(functional(TransformerLM(cfg, rngs=nnx.Rngs(seed)))[1], param_dtype)

  return model, jax.jit(make, out_shardings=shardings)()


def matmul_flops_per_token(cfg: TransformerConfig, seq_len: int) -> dict[str, float]:
  """Model FLOPs of one token's forward pass, counting multiply-adds as 2 (Kaplan et al. 2020, Tab. 1).

    projections: 2 * L * (2 D H Dh + 2 D K Dh + m D F)   q and o, k and v (K kv heads), the MLP's m matrices
                                                          (m = 2 for gelu, 3 for swiglu)
    attention:   2 * L * 2 * T * H Dh                    q k^T and p v over T keys (non-causal count, as in
                                                          PaLM's MFU definition, Chowdhery et al. 2022, App. B)
    lm head:     2 * D * V
  Training costs 3x the forward pass (backward = 2x forward).
  """
  d, f, n_layers = cfg.d_model, cfg.mlp_dim, cfg.num_layers
  hd, kd = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  n_mlp = 3 if cfg.mlp in ("swiglu", "geglu") else 2
  proj = 2.0 * n_layers * (2 * d * hd + 2 * d * kd + n_mlp * d * f)
  attn = 2.0 * n_layers * 2 * seq_len * hd
  head = 2.0 * d * cfg.vocab_size
  return {"projections": proj, "attention": attn, "lm_head": head, "forward": proj + attn + head,
          "train": 3.0 * (proj + attn + head)}
