"""Training throughput while a run trains: tokens/s and model-FLOP utilisation (MFU) in every train record.

  tokens_per_sec = tokens per step * steps / wall seconds over the last `window` steps
  mfu            = model FLOPs per step * steps per second / peak FLOP/s

Model FLOPs are the analytic count (`cl_jax.models.transformer.matmul_flops_per_token`, 3x forward for training;
rematerialised recomputation is not counted, as in PaLM's MFU, Chowdhery et al. 2022 App. B). Steps are timed as
the wall time between their dispatches: the loop blocks on the device when it logs, so over a window of steps the
rate is the device's (null until `window` steps have run; the first full window includes compilation and reads
low, and so does one holding an evaluation). The peak is `CL_JAX_PEAK_FLOPS` when set, else a per-chip table for known accelerators (bf16 dense
peak), else measured: the best of a few jitted float32 n x n matmuls (2 n^3 FLOPs) on the first device.
"""
from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
KNOWN_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
               "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted float32 n x n matmuls on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  if os.environ.get("CL_JAX_PEAK_FLOPS"):
    return float(os.environ["CL_JAX_PEAK_FLOPS"]), "CL_JAX_PEAK_FLOPS"
  kind = jax.devices()[0].device_kind
  for name, peak in KNOWN_PEAKS.items():
    if kind.startswith(name):
      return peak, f"data sheet ({kind})"
  return measured_matmul_peak(), "measured float32 matmul"


class Throughput:
  """Wraps a train step `(state, batch) -> (state, metrics)` to add `tokens_per_sec` and `mfu` to its metrics."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float | None = None,
               window: int = 25):
    self.tokens_per_step, self.flops_per_step = float(tokens_per_step), float(flops_per_step)
    if peak_flops is None:
      peak, self.peak_source = peak_flops_per_device()
      peak_flops = peak * jax.device_count()
    else:
      self.peak_source = "given"
    self.peak_flops = float(peak_flops)
    self.times = collections.deque(maxlen=max(1, int(window)) + 1)

  def rates(self) -> tuple[float, float]:
    """(tokens/s, MFU) over the last `window` steps; NaN (null in metrics.jsonl) until that many have run.

    The loop blocks on the device only when it logs (every `log_every` steps, = the window in the LM runner), so a
    shorter window would time dispatches, not steps."""
    if len(self.times) < self.times.maxlen:
      return float("nan"), float("nan")
    steps_per_sec = (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)
    return self.tokens_per_step * steps_per_sec, self.flops_per_step * steps_per_sec / self.peak_flops

  def wrap(self, train_step):
    def timed(state, batch):
      state, metrics = train_step(state, batch)
      self.times.append(time.perf_counter())
      tokens, mfu = self.rates()
      return state, {**metrics, "tokens_per_sec": np.float32(tokens), "mfu": np.float32(mfu)}
    return timed


def throughput_postfix(record: dict) -> dict:
  """Progress-bar fields of a train record that carries throughput (`tok/s`, `mfu`); {} otherwise."""
  tokens, mfu = record.get("tokens_per_sec"), record.get("mfu")
  if not isinstance(tokens, float) or not np.isfinite(tokens):
    return {}
  return {"tok/s": f"{tokens:,.0f}", "mfu": f"{mfu:.2f}"}


def lm_throughput(model_cfg, batch_size: int, seq_len: int, window: int = 25) -> Throughput:
  """The Throughput of an LM train step on [batch_size, seq_len] token rows (the model reads seq_len - 1)."""
  from cl_jax.models.transformer import matmul_flops_per_token
  length = max(int(seq_len) - 1, 1)
  tokens = int(batch_size) * length
  return Throughput(tokens, tokens * matmul_flops_per_token(model_cfg, length)["train"], window=window)


__all__ = ["Throughput", "lm_throughput", "throughput_postfix", "peak_flops_per_device", "measured_matmul_peak", "KNOWN_PEAKS"]
