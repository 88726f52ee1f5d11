"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on params pytrees.

A LoRA adapter replaces a frozen dense layer `h = x W + b` (W: [d_in, d_out]) by

    h = x W + b + (alpha / r) * dropout(x) A B,      A: [d_in, r] ~ N(0, 1/d_in),  B: [r, d_out] = 0,

so a fresh adapter is exactly the identity (B = 0) and only A, B (r (d_in + d_out) numbers per layer) are
trained. Several named adapters can live beside one frozen base, one per task or domain:

    params = {'base': base_params, 'adapters': {name: {module_path: {'A': [d_in, r], 'B': [r, d_out]}}}}

`module_path` is the '/'-joined path of the module that owns the `kernel` in the base pytree
('dense_0', 'block_0/attn/q', ...; 'stacked_blocks/attn/q' for a transformer whose layers are stacked under
`scan_layers`, whose adapter is one per layer along the same leading axis: A [L, d_in, r], B [L, r, d_out]). An N-D kernel (the transformer's q/k/v [D, H, Dh], o [H, Dh, D]) is
adapted as the matrix [prod(input axes), prod(output axes)]; `LoraModel` reads the input axes off the
modules (`kernel_in_axes`). `LoraModel.apply` runs the base model with none, one, the sum of
several, or a per-example choice of adapters; the optimizer sees only adapter leaves through
`trainable_mask`, so the base -- and with it the base model's outputs -- is unchanged bit for bit by
construction. `merge_adapter` folds `W <- W + (alpha / r) A B` into the base; `save_adapter` /
`load_adapter` store one adapter by name (through `cl_jax.checkpoint.save_params` / `load_params`).

Other libraries' adapters: `combined_factors` gives one or several adapters as a single update A S (scale folded
in), which `cl_jax.models.hf_checkpoint.export_peft_adapter` writes in PEFT's layout (adapter_config.json +
adapter_model.safetensors, PEFT's scale lora_alpha / r, the same convention as here); `import_peft_adapter` reads
one back as a cl_jax adapter with its `LoraSpec`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cl_jax.models.scan_layout import layer_axes, to_layout

Params = Any

# Last path components that name an output head: `all-linear` leaves these alone (Hu et al. adapt the
# attention/MLP projections, not the classifier; a per-task head is a different mechanism).
HEAD_NAMES = ("head", "lm_head", "unembed", "output", "classifier")
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which layers get adapters and how they are shaped.

  targets: 'all-linear' (every module holding a 2-D `kernel` except the output head) or a sequence of
    fnmatch patterns over module paths, e.g. ('dense_*',) or ('layers/*/attn/*',).
  rank: r. alpha: the update is scaled by alpha / r (so changing r does not change the initial step size
    of Adam-like optimizers much; Hu et al. 2021 Sec. 4.1). dropout: applied to the adapter's input only.
  """
  targets: Any = ALL_LINEAR
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora.rank={self.rank!r}: expected a positive integer")
    if not float(self.alpha) > 0:
      raise ValueError(f"lora.alpha={self.alpha!r}: expected a positive number")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"lora.dropout={self.dropout!r}: expected a value in [0, 1)")
    if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
      object.__setattr__(self, "targets", (self.targets,))
    elif not isinstance(self.targets, str):
      object.__setattr__(self, "targets", tuple(self.targets))
      if not self.targets:
        raise ValueError("lora.targets=(): expected 'all-linear' or a non-empty list of path patterns")

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


def default_config():
  """The `lora` config section: targets ('all-linear' or comma-separated patterns), rank, alpha, dropout."""
  import ml_collections
  return ml_collections.ConfigDict({"targets": ALL_LINEAR, "rank": 8, "alpha": 16.0, "dropout": 0.0})


def spec_from_config(lora_config) -> LoraSpec:
  targets = lora_config.targets
  if not isinstance(targets, str):
    targets = tuple(targets)
  elif targets != ALL_LINEAR:  # a config string: comma-separated patterns, e.g. 'dense_*,head'
    targets = tuple(t.strip() for t in targets.split(",") if t.strip())
  return LoraSpec(targets=targets, rank=int(lora_config.rank), alpha=float(lora_config.alpha),
                  dropout=float(lora_config.dropout))


# ----------------------------------------------------------------------------------------------- paths

def _kernel_modules(tree, prefix=()):
  """Yields (path tuple, module dict) for every dict in `tree` that holds a 'kernel' of rank >= 2."""
  if isinstance(tree, Mapping):
    k = tree.get("kernel")
    if k is not None and hasattr(k, "ndim") and k.ndim >= 2:
      yield prefix, tree
    for key, sub in tree.items():
      if isinstance(sub, Mapping):
        yield from _kernel_modules(sub, (*prefix, key))


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def linear_kernels(base_params: Params, in_axes: Mapping[str, int | None] | None = None) -> dict[str, int]:
  """{module path: number of leading kernel axes contracted with the input} for every linear kernel.

  From params alone a 2-D kernel is linear with one input axis; an N-D kernel (attention's [D, H, Dh],
  a conv's [kh, kw, c_in, c_out]) is ambiguous and counts only when `in_axes` names it
  (`LoraModel.in_axes` reads it off the modules: an einsum projection's spec, not a convolution).
  """
  in_axes = dict(in_axes or {})
  out = {}
  for path, module in _kernel_modules(base_params):
    p = path_str(path)
    n_in = in_axes.get(p, 1 if module["kernel"].ndim - layer_axes(p) == 2 else None)
    if n_in is not None:
      out[p] = int(n_in)
  return out


def target_paths(base_params: Params, targets=ALL_LINEAR, in_axes=None) -> tuple[str, ...]:
  """Module paths ('dense_0', 'block_0/attn/q', ...) of the linear kernels `targets` selects.

  'all-linear' selects every linear kernel (see `linear_kernels`) whose module is not an output head
  (`HEAD_NAMES`); a pattern list selects the paths that match any pattern (fnmatch). A pattern matching
  no linear kernel is an error, so a typo does not silently train nothing.
  """
  modules = list(linear_kernels(base_params, in_axes))
  if isinstance(targets, str) and targets == ALL_LINEAR:
    chosen = [p for p in modules if p.split("/")[-1] not in HEAD_NAMES]
  else:
    patterns = (targets,) if isinstance(targets, str) else tuple(targets)
    for pat in patterns:
      if not any(fnmatch.fnmatchcase(p, pat) for p in modules):
        raise ValueError(f"lora.targets pattern {pat!r} matches no linear kernel; linear kernels: {modules}")
    chosen = [p for p in modules if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
  if not chosen:
    raise ValueError(f"lora.targets={targets!r} selects no layer; linear kernels: {modules}")
  return tuple(chosen)


def kernel_in_axes(module) -> int | None:
  """How many leading kernel axes a module contracts with its input; None if it is not a linear map.

  nnx.Linear: 1. A module with an einsum `spec` such as 'btd,dhk->bthk' (the transformer's projections):
  the kernel letters that also index the input, which must lead the kernel ('d' here; 'hk' for the
  output projection 'bthk,hkd->btd'). Convolutions: None.
  """
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    return None
  if isinstance(module, nnx.Linear):
    return 1
  kernel = getattr(module, "kernel", None)
  spec = getattr(module, "spec", None)
  if isinstance(spec, str) and "->" in spec and kernel is not None:
    operands = [o.strip() for o in spec.split("->")[0].split(",")]
    if len(operands) == 2:
      x_sub, k_sub = operands
      n_in = sum(c in x_sub for c in k_sub)
      if 0 < n_in < len(k_sub) and all(c in x_sub for c in k_sub[:n_in]):
        return n_in
    return None
  if kernel is not None and getattr(kernel, "ndim", 0) == 2:
    return 1
  return None


def _get(tree, path: str):
  node = tree
  for part in path.split("/"):
    if isinstance(node, Mapping):
      node = node[part] if part in node else node[int(part)]
    else:
      node = node[int(part)] if part.isdigit() and not hasattr(node, part) else getattr(node, part)
  return node


def _with_kernel(tree, path: str, kernel):
  """A shallow copy of `tree` with the kernel at `path` replaced (the input is never mutated)."""
  parts = path.split("/")

  def rec(node, i):
    node = dict(node)
    key = parts[i] if parts[i] in node else int(parts[i])
    node[key] = rec(node[key], i + 1) if i + 1 < len(parts) else {**node[key], "kernel": kernel}
    return node

  return rec(tree, 0)


# -------------------------------------------------------------------------------------- adapter pytrees

def init_adapter(rng: jax.Array, base_params: Params, spec: LoraSpec, in_axes=None) -> dict:
  """A fresh adapter: A ~ N(0, 1/d_in) (Kaiming-like, as Hu et al.'s Gaussian A), B = 0 (identity at start).

  An N-D kernel is adapted as the matrix [prod(input axes), prod(output axes)]: A: [d_in, r], B: [r, d_out]. A
  stacked transformer kernel (`stacked_blocks/...`, leading layer axis L; `cl_jax.models.scan_layout`) gets one adapter
  per layer, stacked the same way: A: [L, d_in, r], B: [L, r, d_out].
  """
  axes = linear_kernels(base_params, in_axes)
  paths = target_paths(base_params, spec.targets, in_axes)
  keys = jax.random.split(rng, len(paths))
  adapter = {}
  for key, path in zip(keys, paths):
    kernel = _get(base_params, path)["kernel"]
    lead = layer_axes(path)
    layers = tuple(kernel.shape[:lead])
    d_in = int(np.prod(kernel.shape[lead:lead + axes[path]]))
    d_out = int(np.prod(kernel.shape[lead + axes[path]:]))
    dtype = kernel.dtype
    adapter[path] = {
        "A": (jax.random.normal(key, (*layers, d_in, spec.rank), jnp.float32) / jnp.sqrt(d_in)).astype(dtype),
        "B": jnp.zeros((*layers, spec.rank, d_out), dtype),
    }
  return adapter


def lora_params(base_params: Params, adapters: Mapping[str, dict] | None = None) -> dict:
  """Wraps a base params pytree for `LoraModel`: {'base': base, 'adapters': {name: adapter}}."""
  return {"base": base_params, "adapters": dict(adapters or {})}


def _check_params(params):
  if not (isinstance(params, Mapping) and "base" in params and "adapters" in params):
    raise ValueError("params: expected {'base': base_params, 'adapters': {...}} (see lora_params)")


def adapter_names(params) -> tuple[str, ...]:
  _check_params(params)
  return tuple(params["adapters"])


def _require(params, name):
  _check_params(params)
  if name not in params["adapters"]:
    raise KeyError(f"adapter {name!r} not found; adapters: {sorted(params['adapters'])}")
  return params["adapters"][name]


def add_adapter(params, name: str, rng: jax.Array, spec: LoraSpec, in_axes=None) -> dict:
  """Returns params with a new identity adapter `name` (an error if the name is taken)."""
  _check_params(params)
  if name in params["adapters"]:
    raise ValueError(f"adapter {name!r} already exists; adapters: {sorted(params['adapters'])}")
  return {"base": params["base"],
          "adapters": {**params["adapters"], name: init_adapter(rng, params["base"], spec, in_axes)}}


def remove_adapter(params, name: str) -> dict:
  _require(params, name)
  return {"base": params["base"], "adapters": {k: v for k, v in params["adapters"].items() if k != name}}


def trainable_mask(params, names: str | Sequence[str]) -> dict:
  """A bool pytree shaped like `params`: True on the leaves of the named adapters only.

  Hand it to `build_optimizer(..., trainable=mask)` so the base and every other adapter get
  `optax.set_to_zero` and hold no optimizer state.
  """
  names = (names,) if isinstance(names, str) else tuple(names)
  for n in names:
    _require(params, n)
  return {"base": jax.tree.map(lambda _: False, params["base"]),
          "adapters": {n: jax.tree.map(lambda _, n=n: n in names, a) for n, a in params["adapters"].items()}}


def adapter_delta(adapter_layer: Mapping, scale: float, shape=None) -> jax.Array:
  """The dense update (alpha / r) A B of one layer in float32, reshaped to the kernel's `shape` if given
  (input axes lead, row-major, as `init_adapter` flattened them; a stacked adapter's layer axis is a batch axis
  of the product and stays leading)."""
  delta = scale * (adapter_layer["A"].astype(jnp.float32) @ adapter_layer["B"].astype(jnp.float32))
  return delta if shape is None else delta.reshape(shape)


def merge_adapter(params, name: str, spec: LoraSpec) -> dict:
  """Folds adapter `name` into the base, W <- W + (alpha / r) A B, and removes it.

  `LoraModel.apply(merged, x)` (no adapter) then equals `LoraModel.apply(params, x, adapter=name)` up to
  float rounding; other adapters stay as they are (they were trained against the old base).
  """
  adapter = _require(params, name)
  base = params["base"]
  for path, layer in adapter.items():
    kernel = _get(base, path)["kernel"]
    scale = spec.alpha / layer["A"].shape[-1]
    delta = adapter_delta(layer, scale, kernel.shape)
    base = _with_kernel(base, path, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
  return {"base": base, "adapters": {k: v for k, v in params["adapters"].items() if k != name}}


def combined_factors(params, names: str | Sequence[str], spec: LoraSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{module path: (A [d_in, R], S [R, d_out])} on the host, float32: the named adapters as ONE low-rank update
  with its scale folded into the second factor,

      sum_k (alpha / r_k) A_k B_k = [A_1 ... A_K] [(alpha / r_1) B_1; ...; (alpha / r_K) B_K] = A S,
      R = sum_k r_k over the adapters that adapt the module,

  what `LoraModel.apply(..., adapter=names)` adds to the module's kernel (O-LoRA's inference rule is the sum of its
  slots). Paths are per-block (`block_{i}/...`) whatever the layout; used to write an adapter in another library's
  format (`cl_jax.models.hf_checkpoint.export_peft_adapter`)."""
  names = (names,) if isinstance(names, str) else tuple(names)
  if not names:
    raise ValueError("combined_factors: name at least one adapter")
  adapters = [to_layout(_require(params, n), False) for n in names]
  out = {}
  for path in sorted({p for a in adapters for p in a}):
    a_parts, s_parts = [], []
    for adapter in adapters:
      if path in adapter:
        a = np.asarray(jax.device_get(adapter[path]["A"]), np.float32)
        b = np.asarray(jax.device_get(adapter[path]["B"]), np.float32)
        a_parts.append(a)
        s_parts.append(b * np.float32(spec.alpha / a.shape[-1]))
    out[path] = (np.concatenate(a_parts, -1), np.concatenate(s_parts, 0))
  return out


def lora_to_layout(params, scan_layers: bool) -> dict:
  """A LoRA pytree with its base and every adapter in the layout of a model with `scan_layers`
  (`cl_jax.models.scan_layout.to_layout`: stacked adapters `stacked_blocks/attn/q` [L, ...] <-> `block_{i}/attn/q`)."""
  _check_params(params)
  return {"base": to_layout(params["base"], scan_layers),
          "adapters": {n: to_layout(a, scan_layers) for n, a in params["adapters"].items()}}


def num_adapter_params(adapter: Mapping) -> int:
  return int(sum(x.size for x in jax.tree.leaves(adapter)))


# ------------------------------------------------------------------------------------------ the forward

class _LoraLinear:
  """Stands in for an `nnx.Linear` at trace time: base(x) + sum_k w_k(x) (alpha / r_k) drop(x) A_k B_k.

  `weights` is None (plain sum over the given adapters) or a [B, K] array of per-example adapter weights
  (one-hot for routing: each example uses its own adapter). The per-example case is one matmul:
  concat_k(w_k * x A_k) [B, K r] @ concat_k(s_k B_k) [K r, d_out].
  """

  def __init__(self, base, layers, scales, weights, dropout, rng):
    self.base, self.layers, self.scales, self.weights = base, layers, scales, weights
    self.dropout, self.rng = dropout, rng

  def __call__(self, x):
    out = self.base(x)
    z = x
    if self.rng is not None and self.dropout > 0:
      keep = jax.random.bernoulli(self.rng, 1.0 - self.dropout, x.shape)
      z = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    if self.weights is None:
      for layer, s in zip(self.layers, self.scales):
        out = out + (s * ((z @ layer["A"]) @ layer["B"])).astype(out.dtype)
      return out
    zs = [(z @ layer["A"]) * self.weights[:, k, None].astype(z.dtype) for k, layer in enumerate(self.layers)]
    bs = [s * layer["B"] for layer, s in zip(self.layers, self.scales)]
    return out + (jnp.concatenate(zs, -1) @ jnp.concatenate(bs, 0)).astype(out.dtype)


def _set_child(module, path: str, value):
  parts = path.split("/")
  parent = _get(module, "/".join(parts[:-1])) if len(parts) > 1 else module
  last = parts[-1]
  if hasattr(parent, last):
    setattr(parent, last, value)
  else:
    parent[int(last)] = value


@dataclasses.dataclass(frozen=True, eq=False)
class LoraModel:
  """A `FunctionalModel` with named LoRA adapters on its dense layers.

  `apply(params, x, task=None, *, adapter=None, adapter_index=None, rng=None, method=None)`:
    adapter=None          the base model (adapters disabled): bit-identical to `model.apply(params['base'], ...)`;
    adapter='name'        base + that adapter;
    adapter=(n1, n2, ..)  base + the sum of the adapters (O-LoRA trains the newest on top of the frozen older ones);
    adapter=(n1, ..), adapter_index=[B] int   each example uses adapter n_{index[b]} (task-IL with task
                          labels, or a router's choice). A negative index means 'no adapter' for that example.
  `rng` turns on adapter dropout (training); without it the forward is deterministic.
  `nnx.Linear` layers get the adapter as a side path (so dropout and per-example choice work); any other
  linear module (an einsum projection) gets the folded kernel W + (alpha/r) reshape(A B) instead, which is
  the same function but supports neither dropout nor `adapter_index`.
  """
  model: Any  # FunctionalModel
  spec: LoraSpec

  def apply(self, params, x, task=None, *, adapter=None, adapter_index=None, rng=None, method=None):
    _check_params(params)
    base = params["base"]
    if adapter is None:
      if adapter_index is not None:
        raise ValueError("adapter_index needs adapter=(names...) to index into")
      return self.model.apply(base, x, task, method=method)
    names = (adapter,) if isinstance(adapter, str) else tuple(adapter)
    adapters = [_require(params, n) for n in names]
    weights = None
    if adapter_index is not None:
      if isinstance(adapter, str):
        raise ValueError("adapter_index needs a sequence of adapter names, got a single name")
      weights = jax.nn.one_hot(jnp.asarray(adapter_index), len(names), dtype=jnp.float32)
    paths = sorted({p for a in adapters for p in a})
    # Non-Linear owners of a kernel: fold the update into the kernel (no dropout there).
    module = nnx.merge(self.model.graphdef, base)
    folded = [p for p in paths if not isinstance(_get(module, p), nnx.Linear)]
    if folded:
      if weights is not None:
        raise ValueError(f"per-example adapters need nnx.Linear layers; {folded} are not")
      if rng is not None and self.spec.dropout > 0:
        raise ValueError(f"lora.dropout={self.spec.dropout}: adapter dropout needs nnx.Linear layers, and "
                         f"{folded} are not (their update is folded into the kernel); set lora.dropout=0")
      for p in folded:
        kernel = _get(base, p)["kernel"]
        delta = sum(adapter_delta(a[p], self.spec.alpha / a[p]["A"].shape[-1], kernel.shape)
                    for a in adapters if p in a)
        base = _with_kernel(base, p, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
      module = nnx.merge(self.model.graphdef, base)
    rngs = jax.random.split(rng, len(paths)) if rng is not None else [None] * len(paths)
    for p, r in zip(paths, rngs):
      if p in folded:
        continue
      present = [k for k, a in enumerate(adapters) if p in a]
      layers = [adapters[k][p] for k in present]
      scales = [self.spec.alpha / l["A"].shape[-1] for l in layers]
      w = None if weights is None else weights[:, jnp.asarray(present)]
      _set_child(module, p, _LoraLinear(_get(module, p), layers, scales, w, self.spec.dropout, r))
    if method is not None:
      return getattr(module, method)(x)
    return module(x, task)

  def in_axes(self, base_params) -> dict[str, int | None]:
    """{path: input axes} of every module with a kernel of rank >= 2 (None: not linear, e.g. a conv)."""
    module = nnx.merge(self.model.graphdef, base_params)
    return {path_str(p): kernel_in_axes(_get(module, path_str(p))) for p, _ in _kernel_modules(base_params)}

  def target_paths(self, base_params) -> tuple[str, ...]:
    return target_paths(base_params, self.spec.targets, self.in_axes(base_params))

  def init_adapter(self, rng, base_params) -> dict:
    return init_adapter(rng, base_params, self.spec, self.in_axes(base_params))

  def add_adapter(self, params, name: str, rng) -> dict:
    """`add_adapter` with the input axes read off the modules (needed for N-D kernels)."""
    return add_adapter(params, name, rng, self.spec, self.in_axes(params["base"]))

  def merge_adapter(self, params, name: str) -> dict:
    return merge_adapter(params, name, self.spec)

  def bind(self, adapter=None):
    """`(params, x, task) -> logits` with a fixed adapter choice: what a `Learner.apply` expects."""
    return lambda params, x, task=None: self.apply(params, x, task, adapter=adapter)


# ------------------------------------------------------------------------------------------ save / load

def save_adapter(directory: str, params, name: str, spec: LoraSpec, overwrite: bool = False) -> str:
  """Saves adapter `name` to `directory/name` (`cl_jax.checkpoint.save_params`) plus its spec as `name.json`."""
  from cl_jax.checkpoint import save_params
  adapter = _require(params, name)
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"adapter checkpoint {path} exists; pass overwrite=True to replace it")
  # Orbax keys the saved tree by its dict keys; '/' inside a key would become a directory, so paths are
  # stored with ':' and mapped back on load.
  tree = {p.replace("/", ":"): layer for p, layer in adapter.items()}
  save_params(path, tree, overwrite=overwrite)
  with open(path + ".json", "w") as f:
    json.dump({"name": name, "rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout,
               "targets": spec.targets if isinstance(spec.targets, str) else list(spec.targets),
               # [d_in, d_out], or [L, d_in, d_out] for an adapter on a stacked kernel
               "shapes": {p: [*map(int, l["A"].shape[:-1]), int(l["B"].shape[-1])] for p, l in adapter.items()}},
              f, indent=1)
  return path


def load_adapter(directory: str, name: str, params=None) -> tuple[dict, LoraSpec]:
  """Loads adapter `name` from `directory`. Returns (params with the adapter added, spec) when `params`
  is given (shapes are checked against its base), else (the adapter alone, spec)."""
  from cl_jax.checkpoint import load_params
  path = os.path.join(os.path.abspath(directory), name)
  if not os.path.exists(path + ".json") or not os.path.isdir(path):
    raise FileNotFoundError(f"no adapter {name!r} under {directory} (expected {path} and {path}.json)")
  with open(path + ".json") as f:
    meta = json.load(f)
  targets = meta["targets"] if isinstance(meta["targets"], str) else tuple(meta["targets"])
  spec = LoraSpec(targets=targets, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                  dropout=float(meta["dropout"]))
  abstract = None
  if params is not None:
    _check_params(params)
    abstract = {}
    for p, dims in meta["shapes"].items():
      *layers, d_in, d_out = dims
      try:
        kernel = _get(params["base"], p)["kernel"]
      except (KeyError, ValueError, AttributeError, TypeError):
        raise ValueError(f"adapter {name!r} adapts {p!r}, which the base params do not have") from None
      if kernel.size != int(np.prod(dims)):
        raise ValueError(f"adapter {name!r} at {p!r} is {layers} x [{d_in}, r] x [r, {d_out}], but the base kernel "
                         f"has shape {tuple(kernel.shape)}")
      abstract[p.replace("/", ":")] = {"A": jax.ShapeDtypeStruct((*layers, d_in, spec.rank), kernel.dtype),
                                       "B": jax.ShapeDtypeStruct((*layers, spec.rank, d_out), kernel.dtype)}
  tree = load_params(path, abstract)
  adapter = {p.replace(":", "/"): {"A": jnp.asarray(l["A"]), "B": jnp.asarray(l["B"])} for p, l in tree.items()}
  if params is None:
    return adapter, spec
  if name in params["adapters"]:
    raise ValueError(f"adapter {name!r} already exists in params; remove_adapter it first")
  return {"base": params["base"], "adapters": {**params["adapters"], name: adapter}}, spec


__all__ = ["LoraSpec", "LoraModel", "ALL_LINEAR", "HEAD_NAMES", "default_config", "spec_from_config",
           "target_paths", "linear_kernels", "kernel_in_axes", "init_adapter", "lora_params", "adapter_names", "add_adapter", "remove_adapter",
           "trainable_mask", "adapter_delta", "merge_adapter", "combined_factors", "lora_to_layout", "num_adapter_params", "save_adapter",
           "load_adapter"]
