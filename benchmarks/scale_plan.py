"""Scale planner: compile the real LM train step for N simulated devices and report memory, FLOPs, compile time.

  python benchmarks/scale_plan.py                                  # the table of results/scale_plan.md
  python benchmarks/scale_plan.py --sizes 1b --seqs 2048 --devices 64 --remat full --out ''   # one cell
  python benchmarks/scale_plan.py --depth-check 2,32 --repeats 2 --sizes 125m --devices 8 --seqs 1024 --out ''

For each device count N a subprocess starts JAX with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
(the flag is read once per process), builds a mesh of all N devices on the `fsdp` axis (ZeRO-3: every
parameter, gradient and optimizer-state leaf sharded over N, the batch split over N; `--data` moves devices to a
pure data axis) and, for every (size, sequence length) cell, lowers and compiles the step the LM runner trains
with (as `cl_jax.lm.runner._compiled_step` builds it: `make_train_step` on `next_token_loss`, adamw as `cl_jax.train.optim`
builds it, the param-dtype policy, `train.grad_accum`, the finite-params flag, state donated) on abstract inputs:
`jax.ShapeDtypeStruct`s carrying their shardings, so no parameter is ever materialised (an 8B model on one
CPU host is fine). Per device it prints XLA's `compiled.memory_analysis()` (arguments = the state shard + the
batch; temporaries = activations, gathered weights, gradients in flight; total = arguments + outputs +
temporaries - aliased (donated) bytes), FLOPs per device per step (the analytic model count,
`matmul_flops_per_token`, without remat recomputation; and XLA's `cost_analysis()`, which counts a `lax.scan`
body once, so under scan it covers one layer of the stack), and wall seconds to lower + compile. The CPU backend's memory analysis over-estimates bf16 programs (it widens some bf16 buffers
to float32), so figures for bf16 compute are upper bounds for TPU/GPU.

With scan (the default) the state holds the params in the stacked layout (`scan_layers=True`,
`cl_jax.models.scan_layout`: one [L, ...] leaf per kernel kind, the layer axis unsharded). `--depth-check 2,32
--repeats N` compiles each cell at those depths, interleaved N times in one process, and prints each depth's median
compile seconds and its ratio to the shallowest (the issue's goal: 32 layers <= 1.5x 2 layers).

Model shapes (Llama-like, SwiGLU, RMSNorm, RoPE, grouped-query attention):
  125m  d 768,  12 layers, 12 heads (12 kv), MLP 2048,  vocab 32000,  untied
  1b    d 2048, 16 layers, 32 heads (8 kv),  MLP 8192,  vocab 128256, tied      (Llama 3.2 1B)
  8b    d 4096, 32 layers, 32 heads (8 kv),  MLP 14336, vocab 128256, untied    (Llama 3 8B)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    "125m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_hidden=2048, vocab_size=32000,
                 tied_embeddings=False),
    "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_hidden=8192, vocab_size=128256,
               tied_embeddings=True, rope_base=500000.0),
    "8b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_hidden=14336, vocab_size=128256,
               tied_embeddings=False, rope_base=500000.0),
}
GIB = 2.0 ** 30


def model_cfg(size: str, seq: int, args, num_layers: int | None = None):
  from cl_jax.models.transformer import TransformerConfig
  shape = dict(SHAPES[size])
  if num_layers:
    shape["num_layers"] = num_layers
  return TransformerConfig(**shape, max_len=seq, mlp="swiglu", norm="rmsnorm", norm_eps=1e-5,
                           compute_dtype=args.compute_dtype, remat=args.remat, scan_layers=not args.no_scan,
                           attn_chunk=args.attn_chunk)


def compile_cell(size: str, seq: int, args, num_layers: int | None = None) -> dict:
  """Lowers + compiles one train step on abstract sharded inputs; returns the figures of one table row."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from cl_jax import sharding
  from cl_jax.losses import next_token_loss
  from cl_jax.lm.runner import no_logit_mask
  from cl_jax.models.transformer import abstract_lm, matmul_flops_per_token
  from cl_jax.strategies import Learner
  from cl_jax.train.optim import build_optimizer
  from cl_jax.train.precision import PARAM_DTYPES, optimizer_for
  from cl_jax.train.schedules import cosine_schedule
  from cl_jax.train.state import TrainState

  cfg = model_cfg(size, seq, args, num_layers)
  n = jax.device_count()
  data = args.data if args.data > 0 else 1
  mesh = sharding.make_mesh(data, n // data)
  model, abstract = abstract_lm(cfg)
  pdt = PARAM_DTYPES[args.param_dtype]
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, pdt if jnp.issubdtype(s.dtype, jnp.floating)
                                                         else s.dtype), abstract)
  optim = ml_collections.ConfigDict(dict(name="adamw", lr=3e-4, b1=0.9, b2=0.95, momentum=0.9, weight_decay=0.1,
                                         grad_clip=1.0))
  schedule = cosine_schedule(3e-4, 1000, 0.05, 0.1)
  optimizer = optimizer_for(build_optimizer(optim, schedule), args.param_dtype)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                     opt_state=jax.eval_shape(optimizer.init, abstract), strategy_state=(),
                     rng=jax.ShapeDtypeStruct((2,), jnp.uint32), task_index=jax.ShapeDtypeStruct((), jnp.int32))
  rep = sharding.replicated(mesh)
  state_sh = sharding.state_sharding(state, mesh)._replace(step=rep, rng=rep, task_index=rep)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh)
  batch_size = n * args.per_device_batch * args.grad_accum
  bsh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq), jnp.int32, sharding=bsh) for k in ("x", "y")}
  learner = Learner(model.apply, no_logit_mask)
  from cl_jax.train.loop import with_finite_flag
  from cl_jax.train.step import compile_train_step, make_train_step
  step = with_finite_flag(make_train_step(next_token_loss(learner), optimizer, schedule, log_norms=True,
                                          grad_accum=args.grad_accum))
  jitted = compile_train_step(step, state_sh, bsh, rep)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # the model pins FSDP shardings under the mesh (cl_jax.models.transformer.constrain)
    lowered = jitted.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  num_params = int(sum(np.prod(s.shape) for s in jax.tree.leaves(abstract)))
  arg, out, tmp, alias = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
  return {"size": size, "layers": cfg.num_layers, "seq": seq, "devices": n, "mesh": f"data {data} x fsdp {n // data}",
          "params": num_params, "batch": batch_size, "per_device_batch": args.per_device_batch,
          "grad_accum": args.grad_accum, "attn_chunk": args.attn_chunk, "remat": args.remat, "scan": not args.no_scan,
          "layout": "stacked" if cfg.scan_layers else "per-block",
          "param_dtype": args.param_dtype, "compute_dtype": args.compute_dtype,
          "argument_gib": arg / GIB, "output_gib": out / GIB, "temp_gib": tmp / GIB, "alias_gib": alias / GIB,
          "total_gib": (arg + out + tmp - alias) / GIB, "flops_per_device": float(cost.get("flops", float("nan"))),
          "model_flops_per_device": batch_size / n * seq * matmul_flops_per_token(cfg, seq)["train"],
          "lower_s": t1 - t0, "compile_s": t2 - t1}


def child(args) -> None:
  """Runs inside the subprocess that has the N fake devices: one JSON line per cell."""
  import jax
  assert jax.device_count() == args.child, (jax.device_count(), args.child)
  cells = [(s, q, None) for s in args.sizes.split(",") for q in (int(x) for x in args.seqs.split(","))]
  if args.depth_check:  # depths interleaved (2, 32, 2, 32, ...), so machine load drifts over both alike
    depths = [int(layers) for layers in args.depth_check.split(",")] * max(args.repeats, 1)
    cells = [(s, q, layers) for s, q, _ in cells for layers in depths]
  for size, seq, layers in cells:
    try:
      row = compile_cell(size, seq, args, layers)
    except Exception as e:  # a cell that fails to compile is reported, the others still run
      row = {"size": size, "seq": seq, "devices": args.child, "layers": layers, "error": f"{type(e).__name__}: {e}"}
    print("ROW " + json.dumps(row), flush=True)
    if args.out:  # each row as soon as it is measured (a long table can be stopped and keep what it has)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_devices(n: int, argv: list[str], timeout: float) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip())
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", str(n)], env=env,
                        capture_output=True, text=True, timeout=timeout)
  rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
  if proc.returncode:
    rows.append({"devices": n, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"})
  return rows


def table(rows: list[dict]) -> list[str]:
  lines = ["| model | params | seq | devices | batch (per dev x accum) | args GiB | temp GiB | total GiB / dev | "
           "model TFLOP / dev / step | XLA TFLOP / dev / step | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r.get('size', '?')} | | {r.get('seq', '')} | {r['devices']} | | | | error: "
                   f"{r['error'][:120]} | | |")
      continue
    extra = "".join(f", {k}" for k, on in (("bf16 params", r["param_dtype"] == "bfloat16"),
                                            (f"attn chunk {r.get('attn_chunk')}", r.get("attn_chunk")),
                                            (f"remat {r['remat']}", r["remat"] != "full"),
                                            ("unscanned", not r["scan"]),
                                            ("per-block params stacked every step", r.get("layout") == "boundary"))
                    if on)
    lines.append(f"| {r['size']} ({r['layers']} layers{extra}) | {r['params'] / 1e9:.2f}B | {r['seq']} | {r['devices']} | "
                 f"{r['batch']} ({r['per_device_batch']} x {r['grad_accum']}) | {r['argument_gib']:.2f} | "
                 f"{r['temp_gib']:.2f} | {r['total_gib']:.2f} | {r['model_flops_per_device'] / 1e12:.2f} | "
                 f"{r['flops_per_device'] / 1e12:.2f} | "
                 f"{r['lower_s'] + r['compile_s']:.1f} |")
  return lines


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="125m,1b,8b")
  ap.add_argument("--seqs", default="2048,4096")
  ap.add_argument("--devices", default="8,64,256")
  ap.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  ap.add_argument("--no-scan", action="store_true", help="unrolled layers (default: layers under lax.scan)")
  ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
  ap.add_argument("--grad-accum", type=int, default=1)
  ap.add_argument("--attn-chunk", type=int, default=0, help="query block size of the attention (0: whole)")
  ap.add_argument("--per-device-batch", type=int, default=1, help="sequences per device per micro-batch")
  ap.add_argument("--data", type=int, default=1, help="size of the pure data axis (the rest is fsdp)")
  ap.add_argument("--depth-check", default="", help="e.g. 2,32: compile each cell at these depths instead")
  ap.add_argument("--repeats", type=int, default=1, help="with --depth-check: compile each depth this many times")
  ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per device count")
  ap.add_argument("--out", default="", help="append each row to this JSON-lines file as it is measured")
  ap.add_argument("--report", default="", help="print the Markdown table of these JSON-lines files (comma-separated)"
                  " instead of compiling")
  ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    return child(args)
  if args.report:
    rows = [json.loads(line) for path in args.report.split(",") for line in open(path) if line.strip()]
    order = {s: i for i, s in enumerate(SHAPES)}
    rows.sort(key=lambda r: (order.get(r.get("size"), 9), r.get("layers") or 0, r.get("seq", 0), r["devices"]))
    print("\n".join(table(rows)))
    return rows
  rows = []
  for n in (int(x) for x in args.devices.split(",")):
    new = run_devices(n, argv, args.timeout)
    for r in new:
      print(json.dumps(r), flush=True)
    rows += new
  print("\n".join(table(rows)))
  if args.depth_check:
    print("\n".join(depth_summary(rows)))
  return rows


def depth_summary(rows: list[dict]) -> list[str]:
  """Median lower + compile seconds per (size, seq, devices, depth), and each depth's ratio to the shallowest."""
  import statistics
  groups: dict[tuple, dict[int, list[float]]] = {}
  for r in rows:
    if "error" not in r:
      key = (r["size"], r["seq"], r["devices"])
      groups.setdefault(key, {}).setdefault(r["layers"], []).append(r["lower_s"] + r["compile_s"])
  lines = []
  for (size, seq, devices), by_depth in groups.items():
    medians = {d: statistics.median(v) for d, v in sorted(by_depth.items())}
    shallow = min(medians)
    for d, m in medians.items():
      lines.append(f"depth {size} seq {seq} devices {devices}: {d} layers {m:.1f} s (median of {len(by_depth[d])}), "
                   f"{m / medians[shallow]:.2f}x the {shallow}-layer compile")
  return lines


if __name__ == "__main__":
  main()
