"""Split MNIST: five 2-class tasks (0/1, 2/3, ...), the setting of van de Ven & Tolias 2019.

  python run.py --config configs/split_mnist.py:scenario=class,strategy=naive --config.data.path=mnist.npz
  python run.py --config configs/split_mnist.py:scenario=task,strategy=ewc+replay --config.data.path=mnist.npz

MLP 784-400-400, Adam (lr 1e-3, betas 0.9/0.999), 2000 iterations per task, batch 128. Without
`data.path` (or $CL_JAX_MNIST) MNIST is read from tfds if it is prepared.
arg: scenario (class|task|domain), strategy (any registered chain, e.g. ewc+replay).
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  args = parse_arg(arg, scenario="class", strategy="naive")
  c = base_config()
  c.strategy = args["strategy"]
  c.data.name = "mnist"
  c.scenario.name = "split"
  c.scenario.kind = args["scenario"]
  c.scenario.num_tasks = 5
  c.model.hidden = [400, 400]
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.train.steps_per_task = 2000
  c.train.batch_size = 128
  c.train.log_every_steps = 50
  c.eval.every_steps = 500
  c.checkpoint.every_steps = 1000
  return c
