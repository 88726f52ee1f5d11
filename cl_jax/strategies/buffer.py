"""The one example buffer of the rehearsal strategies (replay, A-GEM, DER / DER++, GDumb): a pytree of static shape
that lives in the strategy state, so filling it and drawing from it are ordinary `jit` code.

  Buffer(x     [capacity, ...] float32   the stored inputs
         y     [capacity, ...] int32     their labels (a class label each; next tokens [L] for a language model)
         task  [capacity] int32          their task ids
         size  int32                     valid slots: they are the first `size`
         seen  int32                     examples offered to the buffer so far (the stream's length)
         extra {name: [capacity, ...]}   per-slot fields stored beside each example (DER's logits z))

It is sharded along its slot axis like a batch (`shard_like_batch`); `size` and `seen` are replicated.
`buffer['x']` and `buffer['logits']` (an `extra` field) both work, as for a dict; so does `buffer.logits`.

Insertion policies are pure functions of (buffer, examples, rng); `examples` is a dict holding x, y, task and every
`extra` field, with a leading axis of n examples, offered in order:

  reservoir_add          reservoir sampling over the whole stream (Vitter 1985, "Random Sampling with a Reservoir",
                         Algorithm R): example g (0-based stream index) goes to slot g while g < capacity, else to
                         slot j ~ U{0..g} if j < capacity; after n examples each is stored with probability
                         capacity / n. Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in
                         Continual Learning") and DER (Buzzega et al. 2020) use it.
  balanced_add           re-selects the buffer from its members plus the new examples: a uniformly random subset of
                         q = capacity // groups examples per group, a group being a (task, class) (`by='class'`) or
                         a task (`by='task'`, a per-task quota); q capped at `per_group` when positive.
  greedy_balanced_add    GDumb's greedy class-balanced sampler (Prabhu, Torr & Dokania 2020), one example at a time:
                         with k = capacity // (classes seen), store it while there is room; else, if its class holds
                         fewer than k, replace a uniformly random member of the largest class; else drop it.

Drawing: `sample` draws uniformly with replacement from the valid slots; `sample_distinct` draws min(batch, size)
distinct valid slots (without replacement, as mammoth's `Buffer.get_data`, Buzzega et al. 2020) and says which rows
of its fixed-size draw are real; `epoch_order` is a random permutation of the valid slots (sampling without
replacement, an epoch at a time).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cl_jax.sharding import shard_like_batch

_GROUP_STRIDE = 1 << 16   # group id of (task, class) = task * stride + class
GROUP_BY = ("class", "task")


@shard_like_batch
class Buffer(NamedTuple):
  """Fixed-capacity example storage; see the module docstring for the fields."""
  x: jax.Array
  y: jax.Array
  task: jax.Array
  size: jax.Array
  seen: jax.Array
  extra: dict

  def __getitem__(self, key):
    if isinstance(key, str):
      return getattr(self, key) if key in self._fields else self.extra[key]
    return tuple.__getitem__(self, key)

  def __getattr__(self, name):
    # Only reached when `name` is not a field: an extra field read as an attribute (`buffer.logits`).
    extra = tuple.__getitem__(self, 5)
    if isinstance(extra, dict) and name in extra:
      return extra[name]
    raise AttributeError(name)


def empty(capacity: int, input_shape, extra: Mapping[str, tuple] | None = None, label_shape=()) -> Buffer:
  """An empty buffer; `extra` maps a per-slot field's name to its shape per example (float32); `label_shape` is one
  example's target shape (`TaskInfo.label_shape`: () for a class label, (L,) for a language model's next tokens)."""
  return Buffer(x=jnp.zeros((capacity, *input_shape), jnp.float32),
                y=jnp.zeros((capacity, *label_shape), jnp.int32),
                task=jnp.zeros((capacity,), jnp.int32), size=jnp.zeros((), jnp.int32), seen=jnp.zeros((), jnp.int32),
                extra={k: jnp.zeros((capacity, *shape), jnp.float32) for k, shape in (extra or {}).items()})


def capacity_of(buffer: Buffer) -> int:
  return buffer.y.shape[0]


def slots(buffer: Buffer) -> dict:
  """The per-slot arrays by name: x, y, task and every extra field."""
  return dict(x=buffer.x, y=buffer.y, task=buffer.task, **buffer.extra)


def _with_slots(buffer: Buffer, fields: dict, size, seen) -> Buffer:
  return Buffer(x=fields["x"], y=fields["y"], task=fields["task"], size=jnp.asarray(size).astype(jnp.int32),
                seen=jnp.asarray(seen).astype(jnp.int32), extra={k: fields[k] for k in buffer.extra})


def _check_examples(buffer: Buffer, examples: dict) -> int:
  missing = set(slots(buffer)) - set(examples)
  if missing:
    raise ValueError(f"buffer: the examples lack the stored fields {sorted(missing)}")
  return examples["y"].shape[0]


# ---------------------------------------------------------------------------------------------- insertion policies


def _reservoir_slots(seen, capacity: int, n: int, rng) -> jax.Array:
  """Algorithm R's draw for each of n new examples (stream indices g = seen..seen+n-1): slot g while the buffer
  fills, then j ~ U{0..g}, a slot when j < capacity (else the example is not kept)."""
  g = seen + jnp.arange(n, dtype=jnp.int32)
  j = jax.random.randint(rng, (n,), 0, g + 1)
  return jnp.where(g < capacity, g, j)


def reservoir_winners(seen, capacity: int, n: int, rng) -> jax.Array:
  """Per buffer slot, which of n new examples (stream indices seen..seen+n) ends there; -1: none.

  Algorithm R draws j ~ U{0..g} for every example g; the buffer after the whole stream only needs, per slot, the last
  example written there, so all n draws happen at once and a scatter-max picks each slot's winner.
  """
  slot = _reservoir_slots(seen, capacity, n, rng)
  return jnp.full((capacity,), -1, jnp.int32).at[slot].max(jnp.arange(n, dtype=jnp.int32), mode="drop")


@jax.jit
def reservoir_add(buffer: Buffer, examples: dict, rng) -> Buffer:
  """Feeds `examples` to reservoir sampling (`reservoir_winners`), in order, all at once."""
  capacity, n = capacity_of(buffer), _check_examples(buffer, examples)
  slot = _reservoir_slots(buffer.seen, capacity, n, rng)
  winner = jnp.full((capacity,), -1, jnp.int32).at[slot].max(jnp.arange(n, dtype=jnp.int32), mode="drop")
  # Only the n examples move: each one that is its slot's last writer is scattered there (the others to an index
  # past the end, dropped), so an insertion costs O(n), not O(capacity) -- the buffer is updated in place when the
  # state is donated, which is what makes a 5,120-example buffer as cheap per step as a 200-example one.
  lands = (slot < capacity) & (winner[jnp.minimum(slot, capacity - 1)] == jnp.arange(n, dtype=jnp.int32))
  dest = jnp.where(lands, slot, capacity)
  fields = {k: old.at[dest].set(examples[k].astype(old.dtype), mode="drop") for k, old in slots(buffer).items()}
  return _with_slots(buffer, fields, size=jnp.minimum(buffer.seen + n, capacity), seen=buffer.seen + n)


def _group_ids(task, y, by: str):
  task = task.astype(jnp.int32)
  return task if by == "task" else task * _GROUP_STRIDE + y.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("per_group", "by"))
def balanced_add(buffer: Buffer, examples: dict, rng, per_group: int = -1, by: str = "class") -> Buffer:
  """Re-selects the buffer from its members plus `examples`: a uniform random subset of q examples per group seen,
  q = capacity // groups (capped at `per_group` when positive); a group is a (task, class) or, `by='task'`, a task."""
  if by not in GROUP_BY:
    raise ValueError(f"balanced_add: by={by!r}, expected one of {GROUP_BY}")
  capacity, n = capacity_of(buffer), _check_examples(buffer, examples)
  valid = jnp.concatenate([jnp.arange(capacity) < buffer.size, jnp.ones((n,), bool)])
  group = jnp.concatenate([_group_ids(buffer.task, buffer.y, by), _group_ids(examples["task"], examples["y"], by)])
  group = jnp.where(valid, group, jnp.iinfo(jnp.int32).max)
  # Random priorities: the top q of a group are a uniform subset of it, and the buffer's old members (already a
  # uniform subset) stay uniform when their group's share shrinks.
  priority = jax.random.uniform(rng, group.shape)
  order = jnp.lexsort((-priority, group))
  sorted_group = group[order]
  rank = jnp.arange(group.shape[0]) - jnp.searchsorted(sorted_group, sorted_group, side="left")
  num_groups = jnp.sum((rank == 0) & valid[order])
  quota = capacity // jnp.maximum(num_groups, 1)
  if per_group > 0:
    quota = jnp.minimum(quota, per_group)
  keep = valid[order] & (rank < quota)
  chosen = order[jnp.argsort(~keep, stable=True)[:capacity]]   # kept candidates first
  size = jnp.minimum(keep.sum(), capacity)
  fields = {k: jnp.concatenate([old, examples[k].astype(old.dtype)])[chosen] for k, old in slots(buffer).items()}
  return _with_slots(buffer, fields, size=size, seen=buffer.seen + n)


def greedy_balanced_add(buffer: Buffer, counts, groups_seen, examples: dict, rng, num_outputs: int):
  """GDumb's sampler (module docstring), one example at a time in stream order; pure.

  A class is (task, label), group id task * num_outputs + label. `counts` [groups] int32 holds the members per group,
  `groups_seen` [groups] bool the groups the stream has shown (a class counts towards k even with no member left).
  Returns (buffer, counts, groups_seen).
  """
  capacity, n = capacity_of(buffer), _check_examples(buffer, examples)
  keys = jax.random.split(rng, n)
  y, task = examples["y"], examples["task"]

  def one(i, carry):
    buf, counts, groups_seen = carry
    g = task[i] * num_outputs + y[i]
    groups_seen = groups_seen.at[g].set(True)
    quota = capacity // jnp.maximum(jnp.sum(groups_seen), 1)
    has_room = buf.size < capacity
    # The victim: a uniformly random member of the largest class (the first largest on a tie).
    largest = jnp.argmax(counts)
    slot_group = buf.task * num_outputs + buf.y
    candidates = (slot_group == largest) & (jnp.arange(capacity) < buf.size)
    priority = jnp.where(candidates, jax.random.uniform(keys[i], (capacity,)), -1.0)
    victim = jnp.argmax(priority)
    replace = ~has_room & (counts[g] < quota)
    slot = jnp.where(has_room, buf.size, victim)
    write = has_room | replace
    def put(old, new):
      return jnp.where(write, old.at[slot].set(new[i].astype(old.dtype)), old)
    fields = {k: put(old, examples[k]) for k, old in slots(buf).items()}
    buf = _with_slots(buf, fields, size=buf.size + has_room.astype(jnp.int32), seen=buf.seen + 1)
    counts = counts.at[g].add(write.astype(jnp.int32))
    counts = counts.at[largest].add(-replace.astype(jnp.int32))
    return buf, counts, groups_seen

  return jax.lax.fori_loop(0, n, one, (buffer, counts, groups_seen))


# --------------------------------------------------------------------------------------------------------- drawing


def sample(buffer: Buffer, rng, batch_size: int) -> dict:
  """`batch_size` slots drawn uniformly with replacement from the valid ones (slot 0 while empty): every stored
  field, by name."""
  idx = jax.random.randint(rng, (batch_size,), 0, jnp.maximum(buffer.size, 1))
  return {k: v[idx] for k, v in slots(buffer).items()}


def sample_distinct(buffer: Buffer, rng, batch_size: int) -> tuple[dict, jax.Array]:
  """`batch_size` rows drawn uniformly *without* replacement from the valid slots: (every stored field by name,
  valid [batch_size] bool). Only the first min(batch_size, size) rows are distinct valid slots (valid=True); the rest
  repeat slots and must be left out of any mean (a buffer of 3 examples answers a draw of 10 with 3)."""
  order = epoch_order(buffer, rng)
  rows = jnp.arange(batch_size)
  idx = order[rows % capacity_of(buffer)]
  return {k: v[idx] for k, v in slots(buffer).items()}, rows < jnp.minimum(buffer.size, capacity_of(buffer))


def epoch_order(buffer: Buffer, rng) -> jax.Array:
  """A uniformly random order of the valid slots, then the empty ones: an epoch drawn without replacement."""
  capacity = capacity_of(buffer)
  bits = jax.random.bits(rng, (capacity,), jnp.uint32)
  bits = jnp.where(jnp.arange(capacity) < buffer.size, bits, jnp.uint32(0xFFFFFFFF))
  return jnp.argsort(bits, stable=True)
