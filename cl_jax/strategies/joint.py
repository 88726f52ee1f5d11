"""Joint training: task t trains on the union of tasks 1..t (the upper bound of a sequence)."""
from cl_jax.strategies.base import Strategy


def all_seen_tasks(task_index: int) -> tuple[int, ...]:
  return tuple(range(task_index + 1))


def joint(config=None, learner=None) -> Strategy:
  del config, learner
  return Strategy(train_tasks=all_seen_tasks, name="joint")
