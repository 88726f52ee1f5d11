"""A small decoder-only (causal) transformer language model in Flax NNX.

Architecture (GPT-2 / LLaMA family, pre-norm):

  h_0     = E[tokens]                                           embedding, E in R^{V x D}
  h'_l    = h_{l-1} + Attn_l(Norm(h_{l-1}))                     causal multi-head self-attention
  h_l     = h'_l + MLP_l(Norm(h'_l))                            MLP(x) = W_down gelu(W_up x)
  logits  = Norm(h_L) W_out,   W_out = E^T when embeddings are tied (Press & Wolf 2017)

Attention uses rotary position embeddings (RoPE; Su et al. 2021, "RoFormer"): queries and keys are
rotated pairwise by angle `pos * base^(-2i/d_head)`, so q.k depends on positions only through their
difference and no position parameters exist. The norm is RMSNorm (Zhang & Sennrich 2019) or LayerNorm.

Every projection is an explicit `einsum` over a named-axes kernel (`q: [D, H, Dh]`, `o: [H, Dh, D]`,
`up: [D, F]`, `down: [F, D]`), so GSPMD can shard any axis of any kernel (FSDP over `fsdp`, heads or
MLP width over a model axis) and the batch over `data` without code changes. Parameter paths are stable
strings: `embed.embedding`, `block_{i}.attn.{q,k,v,o}.kernel`, `block_{i}.mlp.{up,down}.kernel`,
`block_{i}.{attn_norm,mlp_norm}.scale`, `final_norm.scale`, `lm_head.kernel` (untied only).

Mixed precision: parameters are always float32; with `compute_dtype='bfloat16'` weights and
activations are cast to bf16 for the matmuls, while the residual stream, norms, softmax and the returned
logits stay float32 (the usual recipe, Micikevicius et al. 2018).

The same module serves training (`__call__`, the full causal forward pass) and KV-cache decoding
(`forward_with_cache`), used by `cl_jax.lm.sampling`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Masked attention scores are set to this (not -inf) so fully-masked rows stay finite; exp() of it
# relative to any real score underflows to exactly 0 in float32.
_MASK_VALUE = -1e9

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of `TransformerLM`. Frozen, so it can be a static jit argument.

  `max_len` is the context length the model is trained and sampled at (RoPE has no position table,
  so it only bounds sampling and data); `mlp_ratio` sets the hidden width F = mlp_ratio * d_model.
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

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"TransformerConfig.{name}={value!r}: expected a positive integer")
    if self.d_model % self.num_heads:
      raise ValueError(f"TransformerConfig.d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads}")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(f"TransformerConfig: head dim d_model/num_heads={self.d_model // self.num_heads} "
                       "must be even for RoPE")
    if self.norm not in ("rmsnorm", "layernorm"):
      raise ValueError(f"TransformerConfig.norm={self.norm!r}: expected 'rmsnorm' or 'layernorm'")
    if self.compute_dtype not in _DTYPES:
      raise ValueError(f"TransformerConfig.compute_dtype={self.compute_dtype!r}: expected one of "
                       f"{sorted(_DTYPES)}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.mlp_ratio * self.d_model

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

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


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class Projection(nnx.Module):
  """A bias-free linear map `y = einsum(spec, x, kernel)` over a named-axes kernel."""

  def __init__(self, spec: str, shape, *, std: float, dtype, rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = dtype
    self.kernel = _normal(rngs, tuple(shape), std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Norm(nnx.Module):
  """RMSNorm `x / rms(x) * scale` or LayerNorm `(x - mean) / std * scale + bias`, computed in float32."""

  def __init__(self, dim: int, kind: str, eps: float = 1e-6):
    self.kind = kind
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    if kind == "layernorm":
      self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if self.kind == "layernorm":
      y = y + self.bias[...]
    return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding of `x [B, T, H, Dh]` at integer `positions [T]` (Su et al. 2021).

  Pairs (x_i, x_{i+Dh/2}) are rotated by angle `pos * base^(-2i/Dh)` ("rotate-half" layout), in float32.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, half]
  sin = jnp.sin(angles)[None, :, None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_positions: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) + M) v with M[t, s] = 0 if k_pos[s] <= q_pos[t] else -inf.

  q: [B, T, H, Dh]; k, v: [B, S, H, Dh]; positions are absolute token indices, so the same function
  serves the full forward pass (S = T) and one decode step against a preallocated cache (T = 1, the
  cache's unwritten slots have positions > q_pos and are masked out).
  """
  scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32)
  scores = scores * (1.0 / np.sqrt(q.shape[-1]))
  visible = k_positions[None, :] <= q_positions[:, None]  # [T, S]
  scores = jnp.where(visible[None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshk->bthk", probs, v)


class Attention(nnx.Module):
  """Multi-head causal self-attention with RoPE; kernels q/k/v `[D, H, Dh]`, o `[H, Dh, D]`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    # GPT-2's residual scaling: output projections start at std / sqrt(2 L) so the residual stream's
    # variance does not grow with depth.
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    self.q = Projection("btd,dhk->bthk", (d, h, dh), std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.k = Projection("btd,dhk->bthk", (d, h, dh), std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.v = Projection("btd,dhk->bthk", (d, h, dh), std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.o = Projection("bthk,hkd->btd", (h, dh, d), std=out_std, dtype=cfg.dtype, rngs=rngs)
    self.rope_base = cfg.rope_base

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
    """Returns (output, new_cache). With a cache `{'k','v': [B, S, H, Dh]}` the new keys/values are
    written at `positions` (which must be contiguous) and attention runs over the whole cache."""
    q = rope(self.q(x), positions, self.rope_base)
    k = rope(self.k(x), positions, self.rope_base)
    v = self.v(x)
    if cache is None:
      return self.o(causal_attention(q, k, v, positions, positions)), None
    start = positions[0]
    k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
    k_positions = jnp.arange(k_all.shape[1])
    out = causal_attention(q, k_all, v_all, positions, k_positions)
    return self.o(out), {"k": k_all, "v": v_all}


class MLP(nnx.Module):
  """`down(gelu(up(x)))` with up `[D, F]`, down `[F, D]`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
    self.up = Projection("btd,df->btf", (cfg.d_model, cfg.mlp_dim), std=cfg.init_std, dtype=cfg.dtype,
                         rngs=rngs)
    self.down = Projection("btf,fd->btd", (cfg.mlp_dim, cfg.d_model), std=out_std, dtype=cfg.dtype,
                           rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg.d_model, cfg.norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg.d_model, cfg.norm)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
    a, cache = self.attn(self.attn_norm(x), positions, cache)
    x = x + a
    x = x + self.mlp(self.mlp_norm(x))
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
    for i in range(cfg.num_layers):
      setattr(self, f"block_{i}", Block(cfg, rngs=rngs))
    self.final_norm = Norm(cfg.d_model, cfg.norm)
    if not cfg.tied_embeddings:
      self.lm_head = Projection("btd,dv->btv", (cfg.d_model, cfg.vocab_size), std=cfg.init_std,
                                dtype=cfg.dtype, rngs=rngs)

  def _logits(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    if self.config.tied_embeddings:
      table = self.embed.embedding[...].astype(self.config.dtype)
      logits = jnp.einsum("btd,vd->btv", h.astype(self.config.dtype), table)
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    table = self.embed.embedding[...]
    # The residual stream stays float32 (each projection casts its input to the compute dtype), so bf16
    # rounding does not accumulate over the depth of the network.
    return jnp.take(table, tokens.astype(jnp.int32), axis=0)

  def __call__(self, tokens: jax.Array, task: jax.Array | None = None) -> jax.Array:
    del task
    if tokens.ndim != 2:
      raise ValueError(f"TransformerLM: tokens must be [batch, time], got shape {tokens.shape}")
    positions = jnp.arange(tokens.shape[1])
    h = self._embed(tokens)
    for i in range(self.config.num_layers):
      h, _ = getattr(self, f"block_{i}")(h, positions)
    return self._logits(h)

  def forward_with_cache(self, tokens: jax.Array, start: jax.Array, cache: tuple):
    """Runs `tokens [B, T]` at positions start..start+T-1 against a KV cache (prefill: start=0 and the
    whole prompt; decode: T=1). Returns (logits [B, T, V] float32, new cache)."""
    positions = start + jnp.arange(tokens.shape[1])
    h = self._embed(tokens)
    new_cache = []
    for i in range(self.config.num_layers):
      h, c = getattr(self, f"block_{i}")(h, positions, cache[i])
      new_cache.append(c)
    return self._logits(h), tuple(new_cache)


def init_cache(cfg: TransformerConfig, batch_size: int, length: int) -> tuple:
  """A zeroed KV cache: one `{'k','v': [B, length, H, Dh]}` per layer, in the compute dtype."""
  shape = (batch_size, length, cfg.num_heads, cfg.head_dim)
  return tuple({"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
               for _ in range(cfg.num_layers))


def build_lm(cfg: TransformerConfig, seed: int = 0):
  """Builds a `TransformerLM` and splits it: returns (FunctionalModel, params as a pure dict)."""
  from cl_jax.models import functional
  return functional(TransformerLM(cfg, rngs=nnx.Rngs(seed)))


def matmul_flops_per_token(cfg: TransformerConfig, seq_len: int) -> dict[str, float]:
  """Model FLOPs of one token's forward pass, counting multiply-adds as 2 (Kaplan et al. 2020, Tab. 1).

    projections: 2 * L * (4 D^2 + 2 D F)       q, k, v, o and the MLP
    attention:   2 * L * 2 * T * D              q k^T and p v over T keys (non-causal count, as in
                                                PaLM's MFU definition, Chowdhery et al. 2022, App. B)
    lm head:     2 * D * V
  Training costs 3x the forward pass (backward = 2x forward).
  """
  d, f, n_layers = cfg.d_model, cfg.mlp_dim, cfg.num_layers
  proj = 2.0 * n_layers * (4 * d * d + 2 * d * f)
  attn = 2.0 * n_layers * 2 * seq_len * d
  head = 2.0 * d * cfg.vocab_size
  return {"projections": proj, "attention": attn, "lm_head": head, "forward": proj + attn + head,
          "train": 3.0 * (proj + attn + head)}
