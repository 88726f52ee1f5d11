"""Host buffers written once and handed to the devices without another copy.

On CPU, `jax.device_put` of a 64-byte aligned numpy array aliases its memory instead of copying it. A split
scenario's training set is gathered task by task into one aligned buffer (`aligned_take`), each task's `x_train` is
a slice of it, and the device pool is that whole buffer again (`spanning_view`): MNIST's 188 MB is written once
at start-up instead of three times (per-task copies, the pool, the upload). The buffers are read-only, so nothing
can change them under a device array that aliases them.
"""
from __future__ import annotations

import numpy as np

ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array whose data starts on a 64-byte boundary."""
  shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = (-raw.ctypes.data) % ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_concat(arrays: list) -> np.ndarray:
  """`np.concatenate(arrays)` into a fresh aligned buffer that nothing else references."""
  out = aligned_empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), np.result_type(*arrays))
  return np.concatenate(arrays, out=out)


def aligned_take(x: np.ndarray, index: np.ndarray) -> np.ndarray:
  """`x[index]` (rows) gathered into a fresh aligned buffer, returned read-only."""
  x = np.asarray(x)
  out = aligned_empty((len(index), *x.shape[1:]), x.dtype)
  np.take(x, np.asarray(index, np.intp), axis=0, out=out, mode="clip")  # "raise" would buffer `out`: 2-3x slower
  out.flags.writeable = False
  return out


def _owner(a: np.ndarray) -> np.ndarray:
  while isinstance(a.base, np.ndarray):
    a = a.base
  return a


def spanning_view(arrays: list) -> np.ndarray | None:
  """The one array of which `arrays` are consecutive row slices, as a read-only view (no copy); None when they
  are not (different buffers, gaps, another dtype or row shape, or not C-contiguous)."""
  first = arrays[0]
  if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype == first.dtype
             and a.shape[1:] == first.shape[1:] for a in arrays):
    return None
  owner = _owner(first)
  if not owner.flags.c_contiguous or any(_owner(a) is not owner for a in arrays):
    return None
  pointer = first.ctypes.data
  for a in arrays:
    if a.ctypes.data != pointer:
      return None
    pointer += a.nbytes
  offset = first.ctypes.data - owner.ctypes.data
  nbytes = pointer - first.ctypes.data
  rows = sum(len(a) for a in arrays)
  view = owner.reshape(-1).view(np.uint8)[offset:offset + nbytes].view(first.dtype).reshape(rows, *first.shape[1:])
  view.flags.writeable = False
  return view
