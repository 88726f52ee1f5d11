"""Continual instruction tuning of a small byte-level LM on instruction sets built from the Python stdlib.

  python run.py --config configs/cit.py --workdir runs/cit_naive
  python run.py --config configs/cit.py:strategy=replay,replay=0.05 --workdir runs/cit_replay5
  python run.py --config configs/cit.py:strategy=replay,replay=0.1,prompts=system --workdir runs/cit_r10_sys
  python run.py --config configs/cit.py:prompts=tag,tasks=all --workdir runs/cit_tags
  python run.py --config configs/cit.py:strategy=distill --workdir runs/cit_distill
  python run.py --config configs/cit.py:strategy=olora --config.optim.lr=3e-3 --workdir runs/cit_olora
  python run.py --config configs/cit.py:strategy=lora_per_task --workdir runs/cit_lora_per_set
  python run.py --config configs/cit.py:tasks=two,steps=30 --config.cit.eval_examples=8 --workdir runs/cit_quick
  python run.py --config configs/cit.py --config.cit.tasks=signature,name,refusal+benign --workdir runs/cit_order

arg: comma-separated `key=value` among
  strategy  a '+' chain of: naive | replay (mix `cit.replay_fraction` of earlier sets' rows into every batch) |
            distill (token-level KL to the model after the previous set; `distill.*`) | lwf (the same) |
            lora (one adapter on the frozen base; `lora.*`) | olora (O-LoRA: one adapter slot per set, earlier
            slots frozen, orthogonality penalty; `olora.*`) | lora_per_task (one adapter per set trained alone;
            at evaluation a router on the prompt picks the adapter among the sets trained so far)
  replay    cit.replay_fraction, e.g. 0.05 (practice: 0.05 to 0.10); used when strategy has `replay`
  prompts   off | system (per-set system prompt) | tag (per-set task tag as the system turn): sft.task_prompt
  tasks     default (name, signature, module_qa, refusal+benign) | two (name, refusal+benign) |
            all (summary, name, signature, module_qa, refusal+benign); any order with --config.cit.tasks=...
  steps     training steps per task (batch of 16 packed rows of 384 bytes)
  size      tiny | small | base | ... (cl_jax.models.transformer.SIZES)

An imported checkpoint with its own chat template: --config.lm.init_from=/path/to/hf_checkpoint_dir.
The accuracy matrix is exact match of greedy-decoded answers on each set's first `cit.eval_examples` test examples.
"""
from configs.common import parse_arg
from cl_jax.lm.cit import default_config

TASKS = {"default": "name,signature,module_qa,refusal+benign", "two": "name,refusal+benign",
         "all": "summary,name,signature,module_qa,refusal+benign"}


def get_config(arg: str = ""):
  args = parse_arg(arg, strategy="naive", replay="0.05", prompts="off", tasks="default", steps="200", size="tiny")
  c = default_config()
  c.strategy = args["strategy"]
  c.cit.replay_fraction = float(args["replay"])
  c.sft.task_prompt = args["prompts"]
  if args["tasks"] not in TASKS:
    raise ValueError(f"config arg tasks={args['tasks']!r}: expected one of {sorted(TASKS)} "
                     "(or --config.cit.tasks=set,set+set)")
  c.cit.tasks = TASKS[args["tasks"]]
  c.cit.steps_per_task = int(args["steps"])
  c.lm.size = args["size"]
  return c
