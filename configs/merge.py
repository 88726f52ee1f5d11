"""Merge checkpoints and evaluate the result on every task (`config.kind = 'merge'`, see cl_jax/merge_run.py).

  # 1. checkpoints to merge: any cl_jax run keeps one per task boundary, e.g. sequential task-IL digits
  python run.py --config configs/quickstart.py:scenario=task --workdir runs/seq
  # 2. TIES of the task 2..5 checkpoints against task 1's as the base, evaluated on all five tasks
  python run.py --config configs/merge.py:method=ties,run=runs/seq --workdir runs/seq-ties
  python run.py --config configs/merge.py:method=slerp,run=runs/seq --config.merge.t=0.3 \
      --config.merge.t_layers="[0.0, 0.5]"   # per-layer t over depth; t for the head
  # or name every checkpoint yourself (RUN_DIR:task=N, RUN_DIR for its last task, or a params directory)
  python run.py --config configs/merge.py:method=task_arithmetic --config.merge.base=runs/a:task=1 \
      --config.merge.models="['runs/b:task=2', 'runs/c:task=3']" --config.merge.lam=0.5

arg: method (linear|task_arithmetic|ties|dare_linear|dare_ties|slerp), run (a run directory: base = its
checkpoint after task `base_task`, models = the later ones up to task `tasks`; for slerp, the checkpoints
after `base_task` and after `tasks`), base_task (1), tasks (5).
Data, scenario and model are read from the referenced run's config.json.
"""

from configs.common import parse_arg
from cl_jax.kinds import base_config
from cl_jax.merge_run import default_config


def get_config(arg: str = ""):
  args = parse_arg(arg, method="ties", run="", base_task="1", tasks="5")
  c = base_config()
  with c.unlocked():
    c.kind = "merge"
    c.merge = default_config()
  c.merge.method = args["method"]
  if args["run"]:
    base_task, tasks = int(args["base_task"]), int(args["tasks"])
    if not 1 <= base_task < tasks:
      raise ValueError(f"config arg base_task={base_task}, tasks={tasks}: need 1 <= base_task < tasks")
    c.merge.base = f"{args['run']}:task={base_task}"
    c.merge.models = [f"{args['run']}:task={k}" for k in range(base_task + 1, tasks + 1)]
    if args["method"] == "slerp":  # between the checkpoints after base_task and after the last task
      c.merge.models = [c.merge.base, c.merge.models[-1]]
  c.lock()
  return c
