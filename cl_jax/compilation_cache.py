"""JAX's persistent compilation cache, on by default: a rerun of a config skips XLA compilation.

The cache lives in `$CL_JAX_COMPILATION_CACHE` if set, else `~/.cache/cl_jax/jax_cache` (or
`$XDG_CACHE_HOME/cl_jax/jax_cache`). Set `CL_JAX_COMPILATION_CACHE=off` (or `0`, `none`, empty) to disable it.
A cache directory someone already configured (`JAX_COMPILATION_CACHE_DIR`, `jax.config.update`) is left as is.

Every program is cached, however fast it compiled (`jax_persistent_cache_min_compile_time_secs = 0`): on a CPU a
small model's train step compiles in ~1 s and its init in ~2 s, which is most of a run's start-up.
"""
from __future__ import annotations

import os

ENV = "CL_JAX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cl_jax", "jax_cache")


def enable(path: str | None = None) -> str | None:
  """Turns the persistent cache on (idempotent); returns its directory, or None when disabled."""
  import jax
  if path is None:
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in _OFF:
      return None
    path = value or jax.config.jax_compilation_cache_dir or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:  # a read-only home: run without the cache rather than fail
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
