"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also split
the parameters, optimizer state and strategy state, ZeRO-3 style). The batch is split over both axes. Each
state leaf is sharded over `fsdp` along its largest dimension divisible by the `fsdp` size, and replicated
when none divides (biases of odd size, scalars). The rule looks only at shapes, so the Adam moments, EWC's
Fisher and anchors, and a distillation teacher, which mirror the params, are sharded exactly like them.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


DISTRIBUTED_DEFAULTS = dict(
    # How long (s) every process waits for all the others to join at start-up (jax's `initialization_timeout`).
    init_timeout_s=300,
    # A process not heard from for this long (s) counts as lost; every other process then exits with
    # `cl_jax.errors.PeerLost` (exit 69) instead of waiting in a collective (jax's `heartbeat_timeout_seconds`).
    heartbeat_timeout_s=100,
    # How long (s) a finishing process waits for the others at shut-down (jax's `shutdown_timeout_seconds`).
    shutdown_timeout_s=300,
)


def distributed_config():
  """The `distributed` config section every kind has: the timeouts of a multi-host launch (`DISTRIBUTED_DEFAULTS`)."""
  import ml_collections
  return ml_collections.ConfigDict(dict(DISTRIBUTED_DEFAULTS))


def distributed_timeouts(config=None) -> dict:
  """{init_timeout_s, heartbeat_timeout_s, shutdown_timeout_s} from `config.distributed` (defaults for what it lacks);
  ConfigError naming the key for a value that is not a whole number of seconds >= 1. Checked here, not only by
  validation, because the processes connect before the rest of the config is validated."""
  from cl_jax.errors import ConfigError
  section = config.get("distributed", None) if config is not None else None
  out = {}
  for key, default in DISTRIBUTED_DEFAULTS.items():
    value = section.get(key, default) if section is not None else default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"distributed.{key}={value!r}: expected a whole number of seconds >= 1")
    out[key] = value
  return out


def maybe_initialize_distributed(config=None) -> None:
  """Starts `jax.distributed` on multi-host launches (TPU pods, SLURM/GPU clusters); a no-op on one host.

  Must run before any other JAX call (a device query starts the backends, after which `initialize` fails);
  `cl_jax.run` and the CLI call it first. Idempotent. On Cloud TPU and under SLURM/Open MPI JAX discovers the
  coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPU hosts
  the processes' collectives go through gloo. The timeouts come from `config.distributed` (`distributed_timeouts`).

  A lost peer: the coordination service notices a process whose heartbeats stopped (after `heartbeat_timeout_s`),
  or the coordinator's own death, and tells every other process, whose client aborts it (SIGABRT after a C++
  check-failure trace: jaxlib 0.10's missed-heartbeat callback cannot be a Python function, the status it passes
  has no Python conversion). `cl_jax.cli.launch` supervises a multi-host process to turn that abort into
  `cl_jax.errors.PeerLost` (exit 69) with one `error:` line.
  """
  global _DISTRIBUTED
  if _DISTRIBUTED:
    return
  from jax._src import distributed as _dist  # the client exists once initialize() has run (here or by the user)
  if getattr(_dist.global_state, "client", None) is not None:
    _DISTRIBUTED = True
    return
  from cl_jax.errors import multihost_launch
  if not multihost_launch():
    return
  explicit = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
  timeouts = distributed_timeouts(config)
  LAST_TIMEOUTS.update(timeouts)
  kwargs = dict(initialization_timeout=timeouts["init_timeout_s"],
                heartbeat_timeout_seconds=timeouts["heartbeat_timeout_s"],
                shutdown_timeout_seconds=timeouts["shutdown_timeout_s"])
  if explicit:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs.update(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  _DISTRIBUTED = True


_DISTRIBUTED = False
LAST_TIMEOUTS: dict = {}  # the timeouts this process's jax.distributed started with


def mesh_shape(data: int, fsdp: int, num_devices: int | None = None) -> tuple[int, int]:
  """Resolves -1 (takes the remaining devices) and checks the mesh fits; raises ValueError naming the key."""
  n = jax.device_count() if num_devices is None else num_devices
  for key, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if v != -1 and v < 1:
      raise ValueError(f"{key}={v}: must be a positive axis size or -1")
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp are both -1: at most one axis can take the remaining devices")
  if data == -1:
    if n % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp}: does not divide the {n} devices")
    data = n // fsdp
  if fsdp == -1:
    if n % data:
      raise ValueError(f"mesh.data={data}: does not divide the {n} devices")
    fsdp = n // data
  if data * fsdp > n:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but only {n} are available")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  data, fsdp = mesh_shape(data, fsdp)
  devices = np.asarray(jax.devices()[:data * fsdp]).reshape(data, fsdp)
  return Mesh(devices, (DATA, FSDP))


def leaf_spec(shape: tuple, fsdp_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp_size` over `fsdp`; replicated if none divides."""
  if fsdp_size <= 1 or not shape:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in dims:
    if shape[d] % fsdp_size == 0 and shape[d] >= fsdp_size:
      spec = [None] * len(shape)
      spec[d] = FSDP
      return P(*spec)
  return P()


# State node types whose leaves hold examples (a replay buffer): sharded along their leading axis over the
# batch axes like a batch is, rather than by the parameter rule.
BATCH_AXIS_TYPES: set = set()


def shard_like_batch(cls):
  """Class decorator: instances in a state pytree are sharded along their leading axis like a batch."""
  BATCH_AXIS_TYPES.add(cls)
  return cls


# ----------------------------------------------------------------------------- stacked layers

STACK = "stacked_blocks"  # the params key of scanned transformer blocks (distinct from any generic model's names)


def path_str(path) -> str:
  """'dense_0/kernel' for a JAX key path (dict keys, sequence indices and attribute names joined by '/').

  It lives here, below the models (`cl_jax.models.scan_layout` and `cl_jax.merging` re-export it), because
  `layer_axes` reads key paths of every tree the sharding rule places."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _keys(path) -> tuple[str, ...]:
  """A '/'-joined path string or a JAX key path, as its tuple of key names."""
  if isinstance(path, str):
    return tuple(path.split("/"))
  return tuple(path_str(path).split("/"))


def layer_axes(path) -> int:
  """1 when `path` addresses a stacked leaf (or a LoRA adapter on one, 'stacked_blocks/attn/q'), 0 otherwise.

  Any component may be the stack's key, so optimizer moments (`opt_state.mu['stacked_blocks']`), EWC's Fisher and other
  trees mirroring the params are recognised too."""
  return int(any(k == STACK or k.startswith(STACK + "/") for k in _keys(path)))


def batch_leaf_spec(shape: tuple, mesh: Mesh) -> P:
  size = mesh.shape[DATA] * mesh.shape[FSDP]
  if len(shape) >= 1 and shape[0] % size == 0:
    return P(BATCH_AXES)
  return P()


def state_sharding(tree, mesh: Mesh):
  """NamedShardings for every leaf of a state pytree (params, optimizer and strategy state alike)."""
  fsdp_size = mesh.shape[FSDP]

  def node_sharding(path, x):
    if type(x) in BATCH_AXIS_TYPES:
      return jax.tree.map(lambda leaf: NamedSharding(mesh, batch_leaf_spec(np.shape(leaf), mesh)), tuple(x))
    # Stacked transformer layers (`stacked_blocks/...`, leading layer axis): the scan slices one layer per step, so the
    # layer axis stays whole on every device and the rule applies to the remaining axes.
    lead = min(layer_axes(path), np.ndim(x))
    return NamedSharding(mesh, P(*([None] * lead), *leaf_spec(np.shape(x)[lead:], fsdp_size)))

  def rebuild(x, sh):
    return type(x)(*sh) if type(x) in BATCH_AXIS_TYPES else sh

  is_marked = lambda n: type(n) in BATCH_AXIS_TYPES
  shardings = jax.tree_util.tree_map_with_path(node_sharding, tree, is_leaf=is_marked)
  return jax.tree.map(rebuild, tree, shardings, is_leaf=is_marked)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Batch dimension over both mesh axes: the leading one, or the second for stacked [K, B, ...] batches."""
  return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh: Mesh, stacked: bool = False) -> dict:
  """This process's rows of a global batch (numpy) -> global jax.Arrays sharded over the batch axes.

  On one process the rows are the whole batch. On N processes each holds its own 1/N of the rows (the grain
  pipeline slices them) and the global shape is given explicitly: batch dimension x N.
  """
  sharding = batch_sharding(mesh, stacked)
  n = jax.process_count()
  if n == 1:
    return jax.device_put(batch, sharding)
  axis = 1 if stacked else 0

  def put(x):
    x = np.asarray(x)
    shape = x.shape[:axis] + (x.shape[axis] * n,) + x.shape[axis + 1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(put, batch)


def process_rows(batch: dict, stacked: bool = False) -> dict:
  """This process's contiguous 1/N of the rows of a whole global batch that every process holds (eval)."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  axis = 1 if stacked else 0

  def rows(x):
    x = np.asarray(x)
    size = x.shape[axis]
    if size % n:
      raise ValueError(f"a batch of {size} rows does not split over {n} processes")
    return np.take(x, np.arange(i * size // n, (i + 1) * size // n), axis=axis)

  return jax.tree.map(rows, batch)


def put_global_batch(batch: dict, mesh: Mesh, stacked: bool = False) -> dict:
  """A whole global batch held identically by every process -> sharded global jax.Arrays."""
  return put_batch(process_rows(batch, stacked), mesh, stacked)


def put_global(tree, shardings):
  """A pytree whose every process holds the same full values -> global arrays with `shardings`.

  `shardings` is one sharding or a pytree of them. On one process this is `jax.device_put`; on several, each
  process places the shards its devices own (`make_array_from_callback`), with no cross-process transfer.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if not isinstance(shardings, jax.sharding.Sharding):
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [_put_leaf(x, s) for x, s in zip(leaves, flat_sh)])
  return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)


def _put_leaf(x, sharding):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # already global: reshard
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    raise TypeError("put_global: typed PRNG keys are not supported; store raw uint32 keys")
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
