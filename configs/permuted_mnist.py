"""Permuted MNIST: ten tasks, each MNIST under its own fixed pixel permutation (van de Ven & Tolias 2019).

  python run.py --config configs/permuted_mnist.py:scenario=domain,strategy=naive --config.data.path=mnist.npz

MLP 784-1000-1000, Adam lr 1e-4, 5000 iterations per task, batch 128.
arg: scenario (domain|task|class), strategy, num_tasks.
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  args = parse_arg(arg, scenario="domain", strategy="naive", num_tasks="10")
  c = base_config()
  c.strategy = args["strategy"]
  c.data.name = "mnist"
  c.scenario.name = "permuted"
  c.scenario.kind = args["scenario"]
  c.scenario.num_tasks = int(args["num_tasks"])
  c.model.hidden = [1000, 1000]
  c.optim.lr = 1e-4
  c.train.steps_per_task = 5000
  c.train.batch_size = 128
  c.train.log_every_steps = 50
  c.eval.every_steps = 1000
  c.checkpoint.every_steps = 1000
  return c
