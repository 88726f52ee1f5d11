"""Quickstart: 5-task Split Digits (scikit-learn's bundled 8x8 digits), class-incremental, naive fine-tuning.

  python run.py --config configs/quickstart.py
  python run.py --config configs/quickstart.py:strategy=joint
  python run.py --config configs/quickstart.py:scenario=task --config.train.steps_per_task=300

arg: comma-separated `key=value` among scenario (class|task|domain), strategy (any registered chain).
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  args = parse_arg(arg, scenario="class", strategy="naive")
  c = base_config()
  c.strategy = args["strategy"]
  c.data.name = "digits"
  c.scenario.name = "split"
  c.scenario.kind = args["scenario"]
  c.scenario.num_tasks = 5
  c.model.hidden = [128, 128]
  c.optim.lr = 1e-3
  c.train.steps_per_task = 200
  c.train.batch_size = 64
  c.eval.every_steps = 50
  c.checkpoint.every_steps = 100
  return c
