"""Rotated MNIST: each task is MNIST rotated by a fixed angle (0, 36, ..., 144 degrees for five tasks).

  python run.py --config configs/rotated_mnist.py:strategy=naive --config.data.path=mnist.npz

MLP 784-400-400, Adam lr 1e-3, 2000 iterations per task, batch 128.
arg: scenario (domain|task|class), strategy, num_tasks.
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  args = parse_arg(arg, scenario="domain", strategy="naive", num_tasks="5")
  c = base_config()
  c.strategy = args["strategy"]
  c.data.name = "mnist"
  c.scenario.name = "rotated"
  c.scenario.kind = args["scenario"]
  c.scenario.num_tasks = int(args["num_tasks"])
  c.scenario.max_angle = 180.0
  c.model.hidden = [400, 400]
  c.optim.lr = 1e-3
  c.train.steps_per_task = 2000
  c.train.batch_size = 128
  c.train.log_every_steps = 50
  c.eval.every_steps = 500
  c.checkpoint.every_steps = 1000
  return c
