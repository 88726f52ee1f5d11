"""Host memory of a run (issue 22 item 3): malloc's free pages handed back, synchronous saves where the device is
the host (results/lm_memory.md has the 135M measurements these guard)."""
import ctypes
import os

import pytest

from cl_jax import host_memory


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
def test_trim_hands_freed_heap_pages_back_to_the_kernel():
  """160 MB of small blocks, touched and freed below one that stays: malloc keeps the pages (resident) until
  `trim`, which returns them; configure() is idempotent and says it applied."""
  libc = host_memory._glibc()
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  assert host_memory.configure() and host_memory.configure()
  size, n = 64 * 1024 - 64, 2560  # under the mmap threshold: heap blocks, not mappings of their own
  blocks = [libc.malloc(size) for _ in range(n)]
  for b in blocks:
    ctypes.memset(b, 1, size)  # resident
  keep = libc.malloc(size)  # above them: the heap's top cannot shrink by itself when they are freed
  ctypes.memset(keep, 1, size)
  for b in blocks:
    libc.free(b)
  before = rss_mb()
  assert host_memory.trim()
  after = rss_mb()
  libc.free(keep)
  assert before - after > 100, (before, after)


def test_saves_are_synchronous_where_the_device_is_the_host(tmp_path):
  """On the CPU backend an asynchronous write would hold the state's own buffers (zero-copy staging) while the next
  step, unable to donate them, allocates a second state: the loop waits for every write there."""
  import jax
  from cl_jax.checkpoint import Checkpoints, host_is_device
  assert host_is_device() == (jax.default_backend() == "cpu")
  ck = Checkpoints(str(tmp_path)).retain(async_save=True)
  assert ck.synchronous == host_is_device()
  assert Checkpoints(str(tmp_path)).retain(async_save=False).synchronous
