"""Throughput of the transformer LM: train-step tokens/s and model-FLOP utilisation; sampling tokens/s.

  python benchmarks/lm_throughput.py                      # writes results/lm_throughput.md
  python benchmarks/lm_throughput.py --d-model 256 --layers 2 --repeats 3   # quick check

Train step: the real one (`cl_jax.train.step.make_train_step` on `cl_jax.losses.lm_loss_fn`, optax
adamw, jitted with the state donated) on random tokens. Model FLOPs per step are counted analytically
(`cl_jax.models.transformer.matmul_flops_per_token`: 6 N per token for the projections and the LM head,
plus the attention score/value matmuls, backward = 2x forward; Kaplan et al. 2020, PaLM App. B), so
MFU = (model FLOPs / step time) / peak. XLA's own count of the compiled step (`cost_analysis`) is
printed beside it as a check of the formula (it also counts the elementwise work: softmax, GELU,
norms, adamw).

Peak: in the same process, the median time of a jitted float32 `jnp.dot` of two n x n matrices
(2 n^3 FLOPs) for a few n; the best of those medians is the machine's peak. Peak and train-step
timings are interleaved repeat by repeat, so a machine shared with other jobs slows both alike;
every figure is a median over `--repeats` timed calls after a compile-and-warm-up call, each ended
with `block_until_ready`.

Sampling: `cl_jax.models.sampling.generate` with and without the KV cache (same model, prompts, key),
tokens/s = batch * new tokens / wall time of one jitted call.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_jax.losses import lm_loss_fn  # noqa: E402
from cl_jax.models.sampling import generate  # noqa: E402
from cl_jax.models.transformer import build_lm, matmul_flops_per_token, model_config  # noqa: E402
from cl_jax.strategies.base import LossContext  # noqa: E402


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
  except Exception:  # cost analysis is best effort on some backends
    return None


def make_peak(n: int):
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  return (lambda: dot(a, b)), 2.0 * n ** 3


def make_train(cfg, batch_size: int, seq_len: int, lr: float = 3e-4, grad_accum: int = 1):
  """Returns (call, flops_per_step_model, flops_per_step_xla, tokens_per_step)."""
  from cl_jax.train.state import TrainState
  from cl_jax.train.step import make_train_step
  model, params = build_lm(cfg)
  tx = optax.adamw(lr, weight_decay=0.1)
  base_loss = lm_loss_fn(model.apply)

  def loss_fn(p, batch, ctx: LossContext):
    return base_loss(p, batch, ctx)

  step_fn = make_train_step(loss_fn, tx, lambda step: lr, grad_accum=grad_accum)
  state = TrainState(jnp.int32(0), params, tx.init(params), (), jax.random.key_data(jax.random.key(0)),
                     jnp.int32(0))
  tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len + 1), 0, cfg.vocab_size)
  batch = {"tokens": tokens}
  jitted = jax.jit(step_fn, donate_argnums=0)
  compiled = jitted.lower(state, batch).compile()
  xla_flops = _cost_flops(compiled)
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  jax.block_until_ready(call())  # warm up
  model_flops = batch_size * seq_len * matmul_flops_per_token(cfg, seq_len)["train"]
  return call, model_flops, xla_flops, batch_size * seq_len


def sampling_rates(cfg, batch_size: int, prompt_len: int, new_tokens: int, repeats: int):
  model, params = build_lm(cfg)
  prompt = jax.random.randint(jax.random.key(2), (batch_size, prompt_len), 0, cfg.vocab_size)
  out = {}
  for use_cache in (True, False):
    def call(use_cache=use_cache):
      return generate(model, params, prompt, jax.random.key(0), max_new_tokens=new_tokens,
                      temperature=1.0, use_cache=use_cache)
    jax.block_until_ready(call())
    times = [_timed(call) for _ in range(repeats)]
    out[use_cache] = batch_size * new_tokens / statistics.median(times)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--peak-sizes", type=str, default="1024,2048,3072")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--sample-size", type=str, default="small", help="model size for the sampling rows")
  ap.add_argument("--sample-batch", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--new-tokens", type=int, default=112)
  ap.add_argument("--out", type=str, default="results/lm_throughput.md")
  ap.add_argument("--variants", type=str, default="remat=full,remat=dots,scan+remat=full,grad_accum=4",
                  help="comma-separated train-step variants timed beside the plain step ('' for none): "
                       "remat=full|dots, scan+remat=..., grad_accum=k")
  args = ap.parse_args(argv)

  load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  cfg = model_config("tiny", vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                     num_heads=args.heads, max_len=args.seq_len + 1)
  peaks = {n: make_peak(n) for n in (int(s) for s in args.peak_sizes.split(","))}
  train_call, model_flops, xla_flops, tokens_per_step = make_train(cfg, args.batch, args.seq_len)

  variants = {}
  for spec in filter(None, args.variants.split(",")):
    changes, accum = {}, 1
    for part in spec.split("+"):
      key, _, value = part.partition("=")
      if key == "scan":
        changes["scan_layers"] = True
      elif key == "remat":
        changes["remat"] = value
      elif key == "grad_accum":
        accum = int(value)
      else:
        raise SystemExit(f"--variants: unknown {part!r}")
    variants[spec] = make_train(cfg.replace(**changes), args.batch, args.seq_len, grad_accum=accum)[0]

  # Interleave: each repeat times every peak matmul, the train step and its variants back to back.
  peak_times = {n: [] for n in peaks}
  step_times = []
  variant_times = {name: [] for name in variants}
  for _ in range(args.repeats):
    for n, (fn, _) in peaks.items():
      peak_times[n].append(_timed(fn))
    step_times.append(_timed(train_call))
    for name, call in variants.items():
      variant_times[name].append(_timed(call))
  peak_rates = {n: peaks[n][1] / statistics.median(t) for n, t in peak_times.items()}
  peak_n = max(peak_rates, key=peak_rates.get)
  peak = peak_rates[peak_n]
  step = statistics.median(step_times)
  achieved = model_flops / step
  mfu = achieved / peak
  # Per-repeat ratio against that repeat's own best matmul: robust to load that changes over the run.
  paired = sorted(model_flops / st / max(peaks[n][1] / peak_times[n][i] for n in peaks)
                  for i, st in enumerate(step_times))

  sample_cfg = model_config(args.sample_size, vocab_size=args.vocab,
                            max_len=args.prompt_len + args.new_tokens)
  rates = sampling_rates(sample_cfg, args.sample_batch, args.prompt_len, args.new_tokens,
                         max(3, args.repeats // 2))
  load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(build_lm(cfg)[1]))
  flops = matmul_flops_per_token(cfg, args.seq_len)
  device = jax.devices()[0]
  lines = [
    "# LM throughput",
    "",
    f"`python benchmarks/lm_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
    "",
    f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs visible, "
    f"JAX {jax.__version__} on {device.platform} ({device.device_kind}), {jax.device_count()} device(s). "
    f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after: the machine is shared, "
    "peak and step were timed interleaved so contention hits both.",
    "",
    f"Train model: d_model={cfg.d_model}, layers={cfg.num_layers}, heads={cfg.num_heads}, "
    f"mlp={cfg.mlp_dim}, vocab={cfg.vocab_size}, tied embeddings, float32; {n_params / 1e6:.2f}M params; "
    f"batch {args.batch} x {args.seq_len} tokens, adamw. Forward FLOPs/token: projections "
    f"{flops['projections'] / 1e6:.1f}M, attention {flops['attention'] / 1e6:.2f}M, LM head "
    f"{flops['lm_head'] / 1e6:.2f}M.",
    "",
    "| measurement | value |",
    "|---|---|",
    f"| peak f32 matmul (best of n in {sorted(peaks)}, n={peak_n}) | {peak / 1e9:.1f} GFLOP/s |",
    *(f"| f32 matmul n={n} | {r / 1e9:.1f} GFLOP/s |" for n, r in sorted(peak_rates.items())),
    f"| train step time (median of {args.repeats}) | {step * 1e3:.1f} ms |",
    f"| train tokens/s | {tokens_per_step / step:,.0f} |",
    f"| model FLOPs / step (analytic) | {model_flops / 1e9:.2f} GFLOP |",
    f"| XLA cost-analysis FLOPs / step | "
    f"{'n/a' if xla_flops is None else f'{xla_flops / 1e9:.2f} GFLOP'} |",
    f"| achieved model FLOP/s | {achieved / 1e9:.1f} GFLOP/s |",
    f"| **MFU** (model FLOP/s / peak) | **{mfu:.2f}** |",
    f"| MFU per repeat against the same repeat's peak: median [min, max] | "
    f"{statistics.median(paired):.2f} [{paired[0]:.2f}, {paired[-1]:.2f}] |",
    f"| sampling tokens/s, KV cache ({args.sample_size}, batch {args.sample_batch}, "
    f"prompt {args.prompt_len}, {args.new_tokens} new) | {rates[True]:,.0f} |",
    f"| sampling tokens/s, full recompute (same) | {rates[False]:,.0f} |",
    f"| KV-cache speed-up | {rates[True] / rates[False]:.1f}x |",
    "",
  ]
  if variants:
    lines += [
      "Memory / accumulation variants of the same step (same model, batch and optimizer; `cl_jax.models.transformer`"
      " `remat` / `scan_layers`, `make_train_step(grad_accum=k)`). MFU counts model FLOPs only (recomputation is"
      " not useful work), against the same run's peak; ratio = step time / plain step time (median of repeats).",
      "",
      "| variant | step ms | tokens/s | MFU | MFU per repeat, median [min, max] | time vs plain |",
      "|---|---|---|---|---|---|",
      f"| plain | {step * 1e3:.1f} | {tokens_per_step / step:,.0f} | {mfu:.2f} | {statistics.median(paired):.2f} "
      f"[{paired[0]:.2f}, {paired[-1]:.2f}] | 1.00 |"]
    for name, times in variant_times.items():
      vt = statistics.median(times)
      vp = sorted(model_flops / st / max(peaks[n][1] / peak_times[n][i] for n in peaks) for i, st in enumerate(times))
      lines.append(f"| {name} | {vt * 1e3:.1f} | {tokens_per_step / vt:,.0f} | {model_flops / vt / peak:.2f} | "
                   f"{statistics.median(vp):.2f} [{vp[0]:.2f}, {vp[-1]:.2f}] | {vt / step:.2f} |")
    lines.append("")
  text = "\n".join(lines)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
  return {"mfu": mfu, "mfu_paired": paired, "peak": peak, "step": step, "sample": rates}


if __name__ == "__main__":
  main()
