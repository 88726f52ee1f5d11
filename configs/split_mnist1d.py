"""Split MNIST-1D (Greydanus & Kobak 2020): five 2-class tasks on 40-sample 1-D signals, generated locally.

  python run.py --config configs/split_mnist1d.py:scenario=class,strategy=naive

MLP 40-256-256, Adam lr 1e-3, 1000 iterations per task, batch 128; `model=cnn` for the small CNN.
arg: scenario (class|task|domain), strategy, model (mlp|cnn).
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  args = parse_arg(arg, scenario="class", strategy="naive", model="mlp")
  c = base_config()
  c.strategy = args["strategy"]
  c.data.name = "mnist1d"
  c.scenario.name = "split"
  c.scenario.kind = args["scenario"]
  c.scenario.num_tasks = 5
  c.model.name = args["model"]
  c.model.hidden = [256, 256]
  c.optim.lr = 1e-3
  c.train.steps_per_task = 1000
  c.train.batch_size = 128
  c.eval.every_steps = 250
  c.checkpoint.every_steps = 500
  return c
