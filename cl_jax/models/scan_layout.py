"""The two parameter layouts of `TransformerLM`'s blocks, and the one converter between them.

  per-block (`scan_layers=False`):  params['block_{i}'][...]  one subtree per layer, e.g.
                                    block_3/attn/q/kernel [D, H, Dh]
  stacked   (`scan_layers=True`):   params['stacked_blocks']  one leaf per kernel kind with a leading layer axis,
                                    stacked_blocks/attn/q/kernel [L, D, H, Dh]; its [i] is block_{i}/...

The stacked layout is what `lax.scan` consumes directly, so the train state holds L-independent numbers of leaves
(9-13 for the blocks instead of 9-13 x L): the optimizer update, clipping, norms and finiteness checks, and the
gradients out of the scan, are one op per kernel kind whatever the depth, and the program XLA compiles does not grow
with depth. Everything that addresses one layer (the Hugging Face importer / exporter, LoRA adapters, merging's
per-layer semantics) goes through this module: `stack_blocks` / `unstack_blocks` convert whole params trees,
`split_layer` / `layer_path` map one per-block path onto (stacked path, layer index) and back, and
`layer_axes` says whether a path (a tuple, a '/'-joined string, or a JAX key path, also inside optimizer or
strategy state that mirrors the params) carries the leading layer axis, which the sharding rule leaves unsharded.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# The params key of the stacked blocks, how a key path reads, and which leaves have a layer axis: the sharding rule
# needs them too, so they live in the layer below (cl_jax.sharding) and are re-exported here.
from cl_jax.sharding import STACK, _keys, layer_axes, path_str  # noqa: F401

_BLOCK = re.compile(r"^block_(\d+)$")


def block_key(i: int) -> str:
  return f"block_{i}"


def block_index(key) -> int | None:
  """3 for 'block_3'; None for any other key."""
  m = _BLOCK.match(str(key))
  return int(m.group(1)) if m else None


def _split_key(key) -> tuple[int | None, str]:
  """'block_3' -> (3, ''); 'block_3/attn/q' (a LoRA adapter's module path) -> (3, '/attn/q'); else (None, '')."""
  head, sep, rest = str(key).partition("/")
  i = block_index(head)
  return (i, sep + rest) if i is not None else (None, "")


def _is_stack_key(key) -> bool:
  return str(key) == STACK or str(key).startswith(STACK + "/")


def is_stacked(params) -> bool:
  """Whether a TransformerLM params tree (or a LoRA adapter dict keyed by module paths) is in the stacked layout."""
  return isinstance(params, Mapping) and any(_is_stack_key(k) for k in params)


def num_layers(params) -> int:
  if is_stacked(params):
    return int(jax.tree.leaves({k: v for k, v in params.items() if _is_stack_key(k)})[0].shape[0])
  return len({i for k in params if (i := _split_key(k)[0]) is not None})


def stack_blocks(params: Mapping) -> dict:
  """Per-block -> stacked: the `block_{i}` subtrees become one `stacked_blocks` subtree whose leaves carry a leading
  layer axis (`jnp.stack`, so sharded leaves stay sharded on their own axes); keys `block_{i}/path` (a LoRA
  adapter's module paths) become `stacked_blocks/path`, stacked the same way. Other keys are kept; a stacked tree
  is returned as is."""
  if is_stacked(params):
    return dict(params)
  groups: dict[str, dict[int, Any]] = {}
  out = {}
  for k, v in params.items():
    i, rest = _split_key(k)
    if i is None:
      out[k] = v
    else:
      groups.setdefault(rest, {})[i] = v
  for rest, by_layer in groups.items():
    if sorted(by_layer) != list(range(len(by_layer))):
      raise ValueError(f"stack_blocks: layers {sorted(by_layer)} of 'block_*{rest}' are not 0 .. L-1")
    out[STACK + rest] = jax.tree.map(lambda *xs: jnp.stack(xs), *[by_layer[i] for i in range(len(by_layer))])
  return out


def unstack_blocks(params: Mapping) -> dict:
  """Stacked -> per-block: `stacked_blocks/...[i]` becomes `block_{i}/...` (and a key `stacked_blocks/path` becomes
  `block_{i}/path`). A per-block tree is returned as is."""
  if not is_stacked(params):
    return dict(params)
  out = {}
  for k, v in params.items():
    if not _is_stack_key(k):
      out[k] = v
      continue
    rest = str(k)[len(STACK):]
    for i in range(int(jax.tree.leaves(v)[0].shape[0])):
      out[block_key(i) + rest] = jax.tree.map(lambda x, i=i: x[i], v)
  return out


def to_layout(params: Mapping, scan_layers: bool) -> dict:
  """`params` in the layout a model with `scan_layers` expects (converting only when they differ)."""
  return stack_blocks(params) if scan_layers else unstack_blocks(params)


def split_layer(path):
  """A per-block path -> (the stacked path, its layer index); any other path -> (path, None).

  ('block_3', 'attn', 'q', 'kernel') -> (('stacked_blocks', 'attn', 'q', 'kernel'), 3); strings map to strings
  ('block_3/attn/q' -> ('stacked_blocks/attn/q', 3))."""
  keys = _keys(path)
  i = block_index(keys[0]) if keys else None
  if i is None:
    return path, None
  stacked = (STACK, *keys[1:])
  return ("/".join(stacked) if isinstance(path, str) else stacked), i


def layer_path(path, layer: int):
  """The per-block path of layer `layer` of a stacked path ('stacked_blocks/attn/q/kernel', 3 -> 'block_3/...');
  strings map to strings, tuples to tuples."""
  keys = _keys(path)
  if not keys or keys[0] != STACK:
    raise ValueError(f"layer_path: {path!r} is not under {STACK!r}")
  out = (block_key(layer), *keys[1:])
  return "/".join(out) if isinstance(path, str) else out


def get_layer(params: Mapping, path: tuple, layer: int | None = None) -> Any:
  """The leaf at a per-block `path` ('block_3', ..., 'kernel') in either layout (a slice of the stacked leaf in
  the stacked one); `layer` given: `path` is a stacked path and the slice is taken along its layer axis."""
  if layer is None:
    path, layer = split_layer(tuple(path)) if is_stacked(params) else (tuple(path), None)
  node = params
  for k in path:
    node = node[k]
  return node if layer is None else node[layer]


__all__ = ["STACK", "block_index", "block_key", "get_layer", "is_stacked", "layer_axes", "layer_path", "num_layers",
           "path_str", "split_layer", "stack_blocks", "to_layout", "unstack_blocks"]
