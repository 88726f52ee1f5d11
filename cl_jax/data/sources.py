"""Labelled data sources: arrays in memory (`LabelledData`) from bundled, local, generated or tfds data.

Sources, by `data.name`:
  digits   scikit-learn's bundled handwritten digits (1,797 8x8 images; stratified 80/20 split, seeded).
  mnist    tfds `mnist` when it is prepared in `data.tfds_data_dir`, else a Keras-format `mnist.npz`
           (x_train, y_train, x_test, y_test) named by `data.path` or the environment variable CL_JAX_MNIST.
  mnist1d  MNIST-1D (Greydanus & Kobak 2020), generated locally by the `mnist1d` package from `data.seed`.
  tfds:<name>  any tfds dataset with `image` and `label` features, read through `tfds.data_source`
           (array_record; no tensorflow needed).
Images are float32 in [0, 1]; labels int32.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabelledData:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max()) + 1)

  @property
  def input_shape(self) -> tuple:
    return tuple(self.x_train.shape[1:])


def mnist_path(data_config) -> str | None:
  """The Keras-format MNIST file a config points at (config first, then $CL_JAX_MNIST)."""
  return data_config.get("path") or os.environ.get("CL_JAX_MNIST") or None


def check_source(data_config) -> None:
  """Raises ConfigError naming the key if the source cannot be loaded; reads at most an npz's file list (runs
  before any write)."""
  from cl_jax.errors import ConfigError
  name = data_config.name
  if name in ("digits", "mnist1d"):
    return
  if name.startswith("tfds:"):
    check_tfds_name(name[len("tfds:"):])
    return
  if name == "mnist":
    path = mnist_path(data_config)
    if path is None:
      if not _tfds_prepared("mnist", data_config.get("tfds_data_dir")):
        raise ConfigError("data.path: MNIST is not prepared in tfds and no mnist.npz was given; "
                          "pass --config.data.path=/path/to/mnist.npz or set CL_JAX_MNIST")
    else:
      check_mnist_npz(path)
    return
  raise ConfigError(f"data.name={name!r}: expected one of 'digits', 'mnist', 'mnist1d', 'tfds:<name>'")


MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


def check_mnist_npz(path: str) -> None:
  """A Keras-format MNIST file: an existing, complete npz (zip) archive holding x_train, y_train, x_test, y_test."""
  import zipfile
  from cl_jax.errors import ConfigError
  what = f"data.path={path!r}"
  allowed = "expected a Keras-format mnist.npz (x_train, y_train, x_test, y_test)"
  if os.path.isdir(path):
    raise ConfigError(f"{what}: is a directory; {allowed}")
  if not os.path.isfile(path):
    raise ConfigError(f"{what}: no such file; {allowed}")
  identity = _file_identity(path)
  if identity in _CHECKED or _cached_dir(identity + (_MNIST_VERSION,)) is not None:
    return  # this very file (path, size, mtime, inode) passed already: its CRCs cost a full decompression
  if not zipfile.is_zipfile(path):  # a truncated archive loses its central directory at the end
    raise ConfigError(f"{what}: not an npz archive, or a truncated one; {allowed}")
  try:
    with zipfile.ZipFile(path) as z:
      names = {n[:-len(".npy")] if n.endswith(".npy") else n for n in z.namelist()}
      bad = z.testzip() if os.path.getsize(path) < (64 << 20) else None  # CRCs of a small file: cheap
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ConfigError(f"{what}: unreadable npz ({e}); {allowed}") from e
  if bad is not None:
    raise ConfigError(f"{what}: member {bad!r} is corrupt (a truncated or damaged file); {allowed}")
  missing = sorted(set(MNIST_KEYS) - names)
  if missing:
    raise ConfigError(f"{what}: missing arrays {missing}; {allowed}")
  _CHECKED.add(identity)


# ----------------------------------------------------------------------------- decoded copies of npz files
# Keras' mnist.npz is zlib-compressed: reading it costs a full decompression at every launch, checking its CRCs
# another, and scaling to float32 a pass that writes 188 MB of fresh memory. A file read once is kept decoded (the
# float32 arrays as raw .npy files, ~220 MB for MNIST, memory-mapped when read back) under $CL_JAX_DATA_CACHE (else
# ~/.cache/cl_jax/data; 'off' disables it), keyed by the file's path, size, mtime and inode and the decoder's
# version: a changed file is a new key. At most _CACHE_ENTRIES files are kept (the least recently used go).

DATA_CACHE_ENV = "CL_JAX_DATA_CACHE"
_CACHE_ENTRIES = 3
_MNIST_VERSION = "mnist-float32-v1"  # what load_mnist_npz makes of the file; change it when that changes
_CACHE_MIN_BYTES = 4 << 20  # small files decompress in no time: not worth a copy
_CHECKED: set = set()


def _file_identity(path: str) -> tuple:
  st = os.stat(path)
  return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def data_cache_dir() -> str | None:
  value = os.environ.get(DATA_CACHE_ENV)
  if value is not None and value.strip().lower() in ("", "0", "off", "none", "false", "no"):
    return None
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return value or os.path.join(base, "cl_jax", "data")


def _cache_key(identity: tuple) -> str:
  import hashlib
  return "npz-" + hashlib.sha1(repr(identity).encode()).hexdigest()[:20]


def _cached_dir(identity: tuple) -> str | None:
  root = data_cache_dir()
  if root is None:
    return None
  d = os.path.join(root, _cache_key(identity))
  return d if os.path.isfile(os.path.join(d, "complete")) else None


def _read_npz(path: str, keys, transform: Callable[[dict], dict], version: str) -> dict:
  """`transform({key: array of the npz file})`, from the copy kept of it when there is one (made on this first
  read; `version` names the transform, so changing it makes new copies). The copy is memory-mapped copy-on-write:
  plain writable arrays whose pages come straight from the page cache (no decompression, no conversion)."""
  identity = _file_identity(path) + (version,)
  cached = _cached_dir(identity)
  if cached is not None:
    try:
      os.utime(cached)  # recently used
      return {k: np.asarray(np.load(os.path.join(cached, f"{k}.npy"), mmap_mode="c")) for k in keys}
    except (OSError, ValueError):  # a damaged copy: read the file itself
      pass
  with np.load(path) as f:
    arrays = transform({k: f[k] for k in keys})
  if identity[1] >= _CACHE_MIN_BYTES:
    _write_cache(identity, arrays)
  return arrays


def _write_cache(identity: tuple, arrays: dict) -> None:
  import shutil
  root = data_cache_dir()
  if root is None:
    return
  target = os.path.join(root, _cache_key(identity))
  tmp = f"{target}.tmp{os.getpid()}"
  try:
    os.makedirs(tmp, exist_ok=True)
    for k, a in arrays.items():
      np.save(os.path.join(tmp, f"{k}.npy"), a)
    open(os.path.join(tmp, "complete"), "w").close()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    entries = sorted((e for e in os.scandir(root) if e.is_dir() and e.name.startswith("npz-") and "." not in e.name),
                     key=lambda e: e.stat().st_mtime, reverse=True)
    for e in entries[_CACHE_ENTRIES:]:
      shutil.rmtree(e.path, ignore_errors=True)
  except OSError:  # a read-only or full disk: run without the copy
    shutil.rmtree(tmp, ignore_errors=True)


def clear_file_cache() -> None:
  """Forgets every decompressed copy and every file checked in this process (benchmarks: a cold start)."""
  import shutil
  _CHECKED.clear()
  root = data_cache_dir()
  if root is not None and os.path.isdir(root):
    for e in os.scandir(root):
      if e.name.startswith("npz-"):
        shutil.rmtree(e.path, ignore_errors=True)


def check_tfds_name(name: str) -> None:
  """`tfds:<name>[/<config>][:<version>]` must name a dataset tensorflow-datasets knows (offline list)."""
  from cl_jax.errors import ConfigError
  builder = name.split("/")[0].split(":")[0]
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return  # load_tfds reports the missing package
  known = tfds.list_builders(with_community_datasets=False)
  if builder not in known:
    near = difflib.get_close_matches(builder, known, n=3)
    hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
    raise ConfigError(f"data.name='tfds:{name}': tensorflow-datasets has no dataset {builder!r}{hint}; "
                      "expected 'tfds:<name>' with a name from tfds.list_builders()")


def load_source(data_config) -> LabelledData:
  name = data_config.name
  if name == "digits":
    return load_digits(int(data_config.get("seed", 0)))
  if name == "mnist":
    path = mnist_path(data_config)
    if path is None:
      return load_tfds("mnist", data_config.get("tfds_data_dir"))
    return load_mnist_npz(path)
  if name == "mnist1d":
    return load_mnist1d(int(data_config.get("seed", 0)))
  if name.startswith("tfds:"):
    return load_tfds(name[len("tfds:"):], data_config.get("tfds_data_dir"))
  raise ValueError(f"data.name={name!r}: unknown source")


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> LabelledData:
  from sklearn.datasets import load_digits as sk_digits
  d = sk_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  # A stratified split so every class is in the test set of every task.
  rng = np.random.default_rng(seed)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    test[rng.choice(idx, int(round(test_fraction * len(idx))), replace=False)] = True
  return LabelledData(x[~test], y[~test], x[test], y[test], "digits")


def load_mnist_npz(path: str) -> LabelledData:
  import zipfile
  from cl_jax.errors import ConfigError
  check_mnist_npz(path)
  try:
    # float32 division: the same values as (x / 255.0).astype(float32) without a float64 copy (start-up time)
    scale = lambda x: np.divide(x, np.float32(255.0), dtype=np.float32)
    decode = lambda f: {"x_train": scale(f["x_train"]), "y_train": f["y_train"].astype(np.int32),
                        "x_test": scale(f["x_test"]), "y_test": f["y_test"].astype(np.int32)}
    f = _read_npz(path, MNIST_KEYS, decode, _MNIST_VERSION)
    return LabelledData(f["x_train"], f["y_train"], f["x_test"], f["y_test"], "mnist")
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # a member damaged past the zip directory
    raise ConfigError(f"data.path={path!r}: unreadable npz ({e}); expected a Keras-format mnist.npz") from e


def load_mnist1d(seed: int = 0) -> LabelledData:
  import mnist1d
  args = mnist1d.get_dataset_args()
  args.seed = int(seed)
  d = mnist1d.data.make_dataset(args)
  return LabelledData(d["x"].astype(np.float32), d["y"].astype(np.int32),
                      d["x_test"].astype(np.float32), d["y_test"].astype(np.int32), "mnist1d")


def _tfds_prepared(name: str, data_dir) -> bool:
  try:
    import tensorflow_datasets as tfds
    tfds.builder(name, data_dir=data_dir).info  # noqa: B018 (raises when the dataset is unknown)
    return tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def load_tfds(name: str, data_dir=None) -> LabelledData:
  """Reads a tfds image-classification dataset through `tfds.data_source` (random access, no tensorflow)."""
  import tensorflow_datasets as tfds

  def read(split):
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    records = [source[i] for i in range(len(source))]
    x = np.stack([np.asarray(r["image"]) for r in records])
    y = np.asarray([r["label"] for r in records], np.int32)
    if x.ndim == 4 and x.shape[-1] == 1:
      x = x[..., 0]
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return (x / scale).astype(np.float32), y

  x_train, y_train = read("train")
  x_test, y_test = read("test")
  return LabelledData(x_train, y_train, x_test, y_test, f"tfds:{name}")
