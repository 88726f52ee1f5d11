"""The runs of experiments/merging_vs_sequential.py: Split digits / MNIST, task-IL, one shared 10-way head.

  python run.py --config configs/merging_specialists.py:tasks=1 --workdir runs/merging/base
  # then, from that base: the task-3 specialist, and EWC through tasks 2..5
  #   --config configs/merging_specialists.py:tasks=3,init_from=runs/merging/base:task=1
  #   --config configs/merging_specialists.py:strategy=ewc,tasks=2-3-4-5,init_from=runs/merging/base:task=1

arg: comma-separated `key=value` among data (digits | mnist), path (the mnist npz), hidden (e.g. 256-256), steps,
batch, lr, rank (LoRA / O-LoRA adapters, alpha = 2 rank, on the hidden layers and the head), val
(data.validation_fraction), split (validation | test: what the accuracy matrix reports), seed, tasks (the 1-based
tasks to train, e.g. 2-3-4-5; empty = all), init_from (model.init_from), strategy, ewc_lam, olora_lambda1, router
(progressive.router).
"""
from configs.common import parse_arg
from cl_jax.kinds import base_config


def get_config(arg: str = ""):
  a = parse_arg(arg, data="digits", path="", hidden="256-256", steps="300", batch="128", lr="1e-3", rank="8",
                val="0.1", split="validation", seed="0", tasks="", init_from="", strategy="naive", ewc_lam="100",
                olora_lambda1="0.5", router="none")
  c = base_config()
  c.seed = int(a["seed"])
  c.strategy = a["strategy"]
  c.data.name, c.data.path = a["data"], a["path"]
  c.data.validation_fraction = float(a["val"])
  c.eval.split = a["split"]
  c.scenario.name, c.scenario.kind, c.scenario.num_tasks = "split", "task", 5
  c.model.name, c.model.multi_head = "mlp", False
  c.model.hidden = [int(h) for h in a["hidden"].split("-")]
  c.model.init_from = a["init_from"]
  c.optim.name, c.optim.lr = "adam", float(a["lr"])
  c.train.steps_per_task, c.train.batch_size = int(a["steps"]), int(a["batch"])
  c.train.tasks = [int(t) for t in a["tasks"].split("-") if t]
  c.train.log_every_steps = 50
  rank = int(a["rank"])
  c.lora.targets, c.lora.rank, c.lora.alpha = "dense_*,head", rank, 2.0 * rank
  c.ewc.lam = float(a["ewc_lam"])
  c.olora.lambda1 = float(a["olora_lambda1"])
  c.progressive.router = a["router"]
  return c
