"""Progressive networks (Rusu et al. 2016) on 5-task Split Digits: one MLP column per task, zero forgetting.

  python run.py --config configs/progressive.py                          # task-IL: the task label picks the column
  python run.py --config configs/progressive.py:router=prototypes        # no label: a Mahalanobis router picks it
  python run.py --config configs/progressive.py:router=entropy,data=mnist --config.data.path=../shared/data/mnist.npz

arg: comma-separated `key=value` among router (none | prototypes | entropy; cl_jax.routing), data (digits | mnist).
With a router the accuracy matrix is class-IL (no task label at test time): the routed column's prediction within
its task's classes. The `progressive.shrinkage` of the prototype router's covariance is a config key.
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  args = parse_arg(arg, router="none", data="digits")
  c = base_config()
  c.strategy = "progressive"
  c.progressive.router = args["router"]
  c.data.name = args["data"]
  c.scenario.name = "split"
  c.scenario.kind = "task"
  c.scenario.num_tasks = 5
  c.model.hidden = [64, 64]
  c.optim.lr = 1e-3
  c.train.steps_per_task = 200
  c.train.batch_size = 64
  return c
