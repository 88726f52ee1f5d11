"""Scenarios: a labelled source turned into a sequence of tasks, and the label space each scenario trains in.

`split`     the classes are divided into `num_tasks` groups (in `class_order`); task t holds the examples of group t.
`permuted`  every task holds the whole dataset under a fixed, seeded pixel permutation (Goodfellow et al. 2013).
`rotated`   every task holds the whole dataset rotated by a fixed angle (bilinear, zero padding).

Three ways to label them (van de Ven & Tolias 2019, "Three scenarios for continual learning"):
`class`   one head over every class of every task; the logits of classes not seen yet are masked: training on
          task t uses the classes of tasks 0..t; evaluating task i after training task j uses the classes of
          tasks 0..max(i, j) (so a future task can be scored for FWT). `scenario.mask_unseen=False` masks nothing:
          every output unit is trained and scored from task 1 on (the protocol of Buzzega et al. 2020's code).
`task`    the task id is given: by default one head per task (`model.multi_head=True`) with labels local to
          the task; with a single head the logits are masked to the example's own task's classes, which gives
          the same gradients as separate heads.
`domain`  one head with the labels local to the task (task 0's "0 or 1" is task 1's "2 or 3").

For permuted/rotated, task t's class c has the global id t*C + c (class-IL grows a head of T*C outputs).

Validation split (`data.validation_fraction` = f > 0): a fixed share of every class's training examples, round(f·n_c)
of its n_c (at most n_c − 1), is taken out of training and kept as the tasks' validation set (`Task.x_val`,
`Task.y_val`). Which examples go is a function of the source's training labels and f alone (a permutation of each
class's examples seeded by the class id), so every strategy, run seed, class order and task grouping sees the same
split; permuted and rotated tasks share one split of the shared data. With `eval.split='validation'`
(`make_scenario(..., eval_split='validation')`) the tasks' evaluation examples `x_test`/`y_test` are the validation
examples, so the accuracy matrix (and every number derived from it) is measured on validation data: the way to choose
λ, α or a learning rate without looking at the test set.

Smaller training sets (`scenario.train_sizes` = [n_1, ..., n_T], [] = every task whole; an entry 0 keeps that task
whole): task t trains on n_t of its training examples, the first n_t of a permutation seeded by
(`scenario.seed`, t), so a smaller size is a subset of a larger one. Its test (and validation) examples are kept
whole. E.g. [0, 500]: the second task is learned from 500 examples (the "small new dataset" of forgetting studies).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from cl_jax.data.sources import LabelledData

SCENARIOS = ("split", "permuted", "rotated")
KINDS = ("class", "task", "domain")
EVAL_SPLITS = ("test", "validation")
# Seeds the per-class permutations of the validation split (with the class id): fixed, so the split never depends
# on a run's seed.
VALIDATION_SEED = 0x7A11D


@dataclasses.dataclass(frozen=True)
class PixelRemap:
  """out[:, p] = sum_k weights[k, p] * in[:, index[k, p]]: permutations and bilinear rotations alike."""
  index: np.ndarray    # int32 [K, P]
  weights: np.ndarray  # float32 [K, P]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    out = np.einsum("bkp,kp->bp", flat[:, self.index], self.weights)
    return out.reshape(x.shape).astype(np.float32)


def permutation_remap(num_pixels: int, rng: np.random.Generator) -> PixelRemap:
  perm = rng.permutation(num_pixels).astype(np.int32)
  return PixelRemap(perm[None], np.ones((1, num_pixels), np.float32))


def rotation_remap(height: int, width: int, degrees: float) -> PixelRemap:
  """Bilinear rotation about the image centre; pixels that come from outside the image are zero."""
  theta = np.deg2rad(degrees)
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  # Inverse map: the source location that lands on each output pixel.
  sy = np.cos(theta) * (yy - cy) - np.sin(theta) * (xx - cx) + cy
  sx = np.sin(theta) * (yy - cy) + np.cos(theta) * (xx - cx) + cx
  y0, x0 = np.floor(sy), np.floor(sx)
  index, weights = [], []
  for dy in (0, 1):
    for dx in (0, 1):
      py, px = y0 + dy, x0 + dx
      w = (1 - np.abs(sy - py)) * (1 - np.abs(sx - px))
      inside = (py >= 0) & (py < height) & (px >= 0) & (px < width)
      index.append(np.where(inside, py * width + px, 0).reshape(-1))
      weights.append(np.where(inside, w, 0.0).reshape(-1))
  return PixelRemap(np.asarray(index, np.int32), np.asarray(weights, np.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One task: its examples (labels already in the scenario's label space) and the original classes in it."""
  index: int
  classes: tuple            # original class ids in this task
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  transform: PixelRemap | None = None  # applied per batch, so permuted tasks share one copy of the data
  x_val: np.ndarray | None = None      # the validation examples carved from training (None: no validation split)
  y_val: np.ndarray | None = None

  def inputs(self, x: np.ndarray) -> np.ndarray:
    return x if self.transform is None else self.transform(x)

  @property
  def num_train(self) -> int:
    return len(self.y_train)


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
  name: str
  kind: str
  tasks: tuple
  num_outputs: int           # units per head
  num_heads: int             # 1, or num_tasks for multi-head task-IL
  input_shape: tuple
  mask_table: np.ndarray | None  # bool [T, num_outputs]; None when no masking is needed

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  def logit_mask(self, task, task_index):
    """Mask of the logits allowed for each example (see the module docstring); None = all allowed."""
    if self.mask_table is None:
      return None
    table = jnp.asarray(self.mask_table)
    row = jnp.maximum(task, task_index) if self.kind == "class" else task
    return table[row]


def check_scenario(scenario_config, num_classes: int | None = None) -> None:
  """Validates the scenario section; raises ValueError naming the key."""
  if scenario_config.name not in SCENARIOS:
    raise ValueError(f"scenario.name={scenario_config.name!r}: expected one of {SCENARIOS}")
  if scenario_config.kind not in KINDS:
    raise ValueError(f"scenario.kind={scenario_config.kind!r}: expected one of {KINDS}")
  t = scenario_config.num_tasks
  if not isinstance(t, int) or t < 1:
    raise ValueError(f"scenario.num_tasks={t!r}: must be a positive integer")
  sizes = list(scenario_config.get("train_sizes") or [])
  if sizes and (len(sizes) != t or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in sizes)):
    raise ValueError(f"scenario.train_sizes={sizes}: expected {t} non-negative integers, one per task (0 = the "
                     "whole training set), or [] for every task whole")
  order = list(scenario_config.get("class_order") or [])
  if scenario_config.name == "split" and num_classes is not None:
    n = len(order) if order else num_classes
    if order and sorted(order) != list(range(num_classes)):
      raise ValueError(f"scenario.class_order={order}: must be a permutation of 0..{num_classes - 1}")
    if n % t:
      raise ValueError(f"scenario.num_tasks={t}: does not divide the {n} classes into equal tasks")


def check_validation(validation_fraction, eval_split) -> None:
  """Validates `data.validation_fraction` and `eval.split`; raises ValueError naming the key."""
  f = validation_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) < 1.0:
    raise ValueError(f"data.validation_fraction={f!r}: expected a fraction in [0, 1) of each class's training "
                     "examples (0 = no validation split)")
  if eval_split not in EVAL_SPLITS:
    raise ValueError(f"eval.split={eval_split!r}: expected one of {EVAL_SPLITS}")
  if eval_split == "validation" and float(f) <= 0.0:
    raise ValueError("eval.split='validation': needs a validation split; set data.validation_fraction > 0 "
                     "(e.g. 0.1)")


def validation_mask(y_train: np.ndarray, fraction: float) -> np.ndarray:
  """bool [N]: which training examples form the validation split (see the module docstring)."""
  y = np.asarray(y_train)
  mask = np.zeros(len(y), bool)
  if fraction <= 0:
    return mask
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    n_val = min(int(round(fraction * len(idx))), len(idx) - 1)
    if n_val > 0:
      chosen = np.random.default_rng([VALIDATION_SEED, int(c)]).permutation(len(idx))[:n_val]
      mask[idx[chosen]] = True
  return mask


def make_scenario(data: LabelledData, scenario_config, multi_head: bool = True, validation_fraction: float = 0.0,
                  eval_split: str = "test") -> Scenario:
  """The scenario `scenario_config` describes over `data`; `validation_fraction` and `eval_split` as in the module
  docstring (the runner passes `data.validation_fraction` and `eval.split`)."""
  check_scenario(scenario_config, data.num_classes)
  check_validation(validation_fraction, eval_split)
  name, kind, num_tasks = scenario_config.name, scenario_config.kind, scenario_config.num_tasks
  x_val = y_val = train_rows = None  # train_rows: the training examples the validation split leaves (None: all)
  if validation_fraction > 0:
    val = validation_mask(data.y_train, float(validation_fraction))
    x_val, y_val = data.x_train[val], data.y_train[val]
    train_rows = np.flatnonzero(~val)
    if name != "split":  # a split gathers its tasks' rows from the full set in one copy (`_by_task`)
      data = dataclasses.replace(data, x_train=data.x_train[train_rows], y_train=data.y_train[train_rows])
  seed = int(scenario_config.get("seed", 0))
  if name == "split":
    order = list(scenario_config.get("class_order") or range(data.num_classes))
    if scenario_config.get("shuffle_classes", False):
      order = list(np.random.default_rng(seed).permutation(order))
    k = len(order) // num_tasks
    groups = [tuple(int(c) for c in order[t * k:(t + 1) * k]) for t in range(num_tasks)]
    top = max(max(order), *(int(np.max(y, initial=0)) for y in (data.y_train, data.y_test)))
    task_of = np.full(top + 1, -1, np.int64)  # -1: a label in no task's group
    label_of = np.zeros(len(task_of), np.int32)  # a lookup table: a Python loop over 60k labels costs ~1 s
    for t, group in enumerate(groups):
      for i, c in enumerate(group):
        task_of[c], label_of[c] = t, _label(kind, multi_head, t, k, i)
    # Each split's examples, grouped by task (in their original order within a task), gathered in one pass into
    # one aligned buffer; a task's arrays are slices of it. The device pool is then that same buffer, uploaded
    # without a copy (cl_jax/data/buffers.py).
    splits = [_by_task(x, y, task_of, num_tasks, rows) for x, y, rows in
              ((data.x_train, data.y_train, train_rows), (data.x_test, data.y_test, None), (x_val, y_val, None))]
    tasks = []
    for t, group in enumerate(groups):
      (xtr, ytr), (xte, yte), val = (None if sp is None else sp[t] for sp in splits)
      tasks.append(Task(t, group, xtr, label_of[ytr], xte, label_of[yte], None,
                        None if val is None else val[0], None if val is None else label_of[val[1]]))
    classes_per_task = k
  else:
    c = data.num_classes
    rng = np.random.default_rng(seed)
    shape = data.input_shape
    if name == "rotated":
      if len(shape) != 2:
        raise ValueError(f"scenario.name='rotated': needs 2-D images, {data.name} has input shape {shape}")
      angles = list(scenario_config.get("angles") or
                    np.linspace(0.0, float(scenario_config.get("max_angle", 180.0)), num_tasks, endpoint=False))
      if len(angles) != num_tasks:
        raise ValueError(f"scenario.angles: {len(angles)} angles for scenario.num_tasks={num_tasks}")
    tasks = []
    for t in range(num_tasks):
      if name == "permuted":
        identity = t == 0 and scenario_config.get("first_task_identity", False)
        remap = None if identity else permutation_remap(int(np.prod(shape)), rng)
      else:
        remap = rotation_remap(shape[0], shape[1], float(angles[t]))
      ytr = np.asarray([_label(kind, multi_head, t, c, int(y)) for y in range(c)], np.int32)
      tasks.append(Task(t, tuple(range(c)), data.x_train, ytr[data.y_train], data.x_test, ytr[data.y_test], remap,
                        x_val, None if y_val is None else ytr[y_val]))
    classes_per_task = c

  num_heads = num_tasks if (kind == "task" and multi_head) else 1
  num_outputs = classes_per_task if kind == "domain" or num_heads > 1 else classes_per_task * num_tasks
  mask_table = None
  # scenario.mask_unseen=False (class-IL): no mask at all, every output unit trained and scored from the start, as
  # in mammoth (Buzzega et al. 2020's code), where the CE of task 1 already pushes down the logits of classes 2..9.
  mask_unseen = bool(scenario_config.get("mask_unseen", True))
  if (kind == "class" and mask_unseen) or (kind == "task" and num_heads == 1):
    mask_table = np.zeros((num_tasks, num_outputs), bool)
    for t in range(num_tasks):
      if kind == "class":
        mask_table[t, :(t + 1) * classes_per_task] = True
      else:
        mask_table[t, t * classes_per_task:(t + 1) * classes_per_task] = True
  for t, n in enumerate(scenario_config.get("train_sizes") or []):
    if 0 < n < tasks[t].num_train:  # a seeded subset; the permutation's prefix, so sizes nest
      keep = np.sort(np.random.default_rng([seed, t]).permutation(tasks[t].num_train)[:n])
      tasks[t] = dataclasses.replace(tasks[t], x_train=tasks[t].x_train[keep], y_train=tasks[t].y_train[keep])
  if eval_split == "validation":  # the accuracy matrix is measured on the validation examples
    tasks = [dataclasses.replace(task, x_test=task.x_val, y_test=task.y_val) for task in tasks]
  return Scenario(name, kind, tuple(tasks), num_outputs, num_heads, data.input_shape, mask_table)


def _by_task(x, y, task_of: np.ndarray, num_tasks: int, rows: np.ndarray | None = None):
  """[(x_t, y_t)] per task: the examples (among `rows`, when given) whose class `task_of` maps to task t, in their
  original order; the x_t are consecutive slices of one read-only aligned buffer. None when `x` is None."""
  if x is None:
    return None
  from cl_jax.data.buffers import aligned_take
  y = np.asarray(y) if rows is None else np.asarray(y)[rows]
  which = task_of[y]
  index = np.argsort(which, kind="stable")
  index = index[which[index] >= 0]  # drop labels in no group (defensive: check_scenario makes groups cover all)
  bounds = np.concatenate([[0], np.cumsum(np.bincount(which[which >= 0], minlength=num_tasks))])
  xs, ys = aligned_take(x, index if rows is None else rows[index]), y[index]
  return [(xs[bounds[t]:bounds[t + 1]], ys[bounds[t]:bounds[t + 1]]) for t in range(num_tasks)]


def _label(kind: str, multi_head: bool, task: int, classes_per_task: int, local: int) -> int:
  """The label of local class `local` of task `task` in the scenario's output space."""
  if kind == "domain" or (kind == "task" and multi_head):
    return local
  return task * classes_per_task + local
