"""What verified checkpoints cost: save and restore of an LM train state with digests vs without (issue 23).

  python benchmarks/checkpoint_digest.py                   # the 125m preset (~124M params with a 50k vocabulary),
                                                           # writes results/checkpoint_digest.md
  python benchmarks/checkpoint_digest.py --size small --repeats 3 --out ''   # quick check, no file

The state is what an LM run checkpoints: the transformer's float32 params (`cl_jax.models.transformer.init_lm`),
Adam's two moments and count, the step and the rng: 3 x params floats. Each repeat times, in turn (interleaved, so
load from other processes hits both alike), on a fresh directory:

  save      `Checkpoints.save` + `wait` (the write finished on disk): with digests, `seal` computes every array's
            digest on device and adds the `_verify` record to the meta item; without, the meta item as given
  restore   with digests: `Checkpoints.restore` (one orbax read of state and meta, then meta sha256, identity,
            layout and the arrays' digests checked); without: the same orbax read alone (the code before issue 23)

and reports medians and the ratio with / without. `digest` alone (one jitted pass over the state, the part the
checks add) is timed too. Goal: ratios <= 1.05 on the 125M state.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time


from benchmarks.common import emit  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cl_jax import checkpoint  # noqa: E402
from cl_jax.checkpoint import Checkpoints, abstract_like  # noqa: E402


def lm_state(size: str, vocab: int):
  from cl_jax.models.transformer import init_lm, model_config
  cfg = model_config(size, vocab_size=vocab)
  _, params = init_lm(cfg, 0)
  opt_state = jax.jit(optax.adam(1e-3).init)(params)
  state = {"step": jnp.int32(1000), "params": params, "opt_state": opt_state,
           "rng": jnp.asarray([0, 1], jnp.uint32), "task_index": jnp.int32(0)}
  return jax.block_until_ready(state)


META = {"task": 0, "iterator": {"position": 1000}, "boundary": [], "task_seconds": [], "seconds": 1.0}
IDENTITY = {"config_sha256": "0" * 64, "seed": 0, "code": "benchmark"}


def save(root: str, state, verified: bool) -> float:
  ck = Checkpoints(root, identity=IDENTITY)
  if not verified:
    ck.seal = lambda state, meta: dict(meta)
  t = time.perf_counter()
  ck.save(1000, state, META, kind="rolling")
  ck.wait()
  seconds = time.perf_counter() - t
  ck.close()
  return seconds


def restore(root: str, abstract, verified: bool) -> float:
  ck = Checkpoints(root, identity=IDENTITY)
  t = time.perf_counter()
  if verified:
    state, _ = ck.restore(abstract)
  else:
    ocp = checkpoint._ocp()
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    state = ck.rolling.restore(1000, args=args).state
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t
  ck.close()
  return seconds


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="125m")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
  p.add_argument("--out", default="results/checkpoint_digest.md")
  a = p.parse_args()
  state = lm_state(a.size, a.vocab)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  abstract = abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
  base = tempfile.mkdtemp(dir=a.dir, prefix="ckpt_digest_")
  times = {k: [] for k in ("save", "save_verified", "restore", "restore_verified", "digest")}
  try:
    checkpoint.digest(state)  # compile
    for r in range(a.repeats + 1):  # the first round warms up (file cache, orbax's own start-up)
      round_times = {}
      for verified in (False, True):
        root = os.path.join(base, f"{r}-{int(verified)}")
        round_times["save" + "_verified" * verified] = save(root, state, verified)
        round_times["restore" + "_verified" * verified] = restore(root, abstract, verified)
        shutil.rmtree(root)
      t = time.perf_counter()
      checkpoint.digest(state)
      round_times["digest"] = time.perf_counter() - t
      if r:
        for k, v in round_times.items():
          times[k].append(v)
      print(f"round {r}: " + ", ".join(f"{k} {v:.2f}s" for k, v in round_times.items()), flush=True)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  gb = n_bytes / 1e9
  rows = [
      ("save (Checkpoints.save + wait)", med["save"], med["save_verified"]),
      ("restore (newest checkpoint)", med["restore"], med["restore_verified"]),
  ]
  lines = [
      "# Verified checkpoints: what the digests cost",
      "",
      f"Command: `python benchmarks/checkpoint_digest.py --size {a.size} --vocab {a.vocab} --repeats {a.repeats}`",
      "",
      f"State: the `{a.size}` transformer preset with a {a.vocab}-token vocabulary, {n_params / 1e6:.1f}M float32 "
      f"params + Adam moments: {gb:.2f} GB in {len(jax.tree.leaves(state))} arrays. Machine: {platform.machine()}, "
      f"{os.cpu_count()} CPU cores (shared), JAX {jax.__version__} on {jax.default_backend()} "
      f"({jax.devices()[0].device_kind}). Medians of {a.repeats} interleaved repeats after one warm-up round.",
      "",
      "| operation | without digests (s) | with digests (s) | ratio |",
      "|---|---|---|---|",
  ]
  lines += [f"| {name} | {w:.2f} | {v:.2f} | {v / w:.3f} |" for name, w, v in rows]
  fastest = {k: min(v) for k, v in times.items()}
  paired = statistics.median(d / s for d, s in zip(times["digest"], times["save"]))
  lines += [
      "",
      f"Fastest of the repeats (the least disturbed by other processes): save {fastest['save']:.2f} s without, "
      f"{fastest['save_verified']:.2f} s with digests (ratio {fastest['save_verified'] / fastest['save']:.3f}); "
      f"restore {fastest['restore']:.2f} s without, {fastest['restore_verified']:.2f} s with "
      f"(ratio {fastest['restore_verified'] / fastest['restore']:.3f}).",
      "",
      f"The digest alone (one pass over the {gb:.2f} GB state, `cl_jax.checkpoint.digest`): "
      f"{med['digest']:.2f} s median, {fastest['digest']:.2f} s fastest ({gb / fastest['digest']:.1f} GB/s); "
      f"per round, digest / save without digests: median {100 * paired:.1f}%. A save with digests does one such "
      "pass, a verified restore one more (on the restored arrays).",
      "",
      "Per-round times (s): " + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in times.items()),
  ]
  emit(lines, a.out)
  return np.asarray([v / w for _, w, v in rows])


if __name__ == "__main__":
  main()
