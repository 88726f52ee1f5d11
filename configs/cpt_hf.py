"""Continued pre-training of an imported Hugging Face model (Llama 2/3, Mistral, Qwen2, GPT-2) on local text.

  python run.py --config configs/cpt_hf.py:path=tests/fixtures/hf/qwen2,domain=my_corpus/ --workdir runs/hf
  python run.py --config configs/cpt_hf.py:path=tests/fixtures/hf/llama,domain=my_corpus/,strategy=lora \
      --config.mesh.data=1 --config.mesh.fsdp=8 --config.lm.compute_dtype=bfloat16
  python run.py --config configs/cpt_hf.py:path=tests/fixtures/hf/gpt2,domain=my_corpus/,mixture=two_phase \
      --config.strategy=distill --config.adapt.steps=1000

`path` is any checkpoint directory in the Hugging Face layout (e.g. a downloaded Llama-3.2-1B or Qwen2-0.5B; the
tiny random fixtures above run on a laptop); `domain` is a directory of your .txt / .jsonl files.

arg: comma-separated `key=value` among
  path      the checkpoint directory: config.json + model.safetensors (or shards + model.safetensors.index.json) +
            tokenizer.json (`cl_jax.models.hf_checkpoint`: the params stream straight into their shardings)
  domain    the adaptation corpus: a directory of .txt files (one document each) and .jsonl files (one document per
            line, its "text" field), split into train / validation / test by document (`dir:` specs of
            `cl_jax.data.text`); any other domain spec ('code', 'files:<glob>', 'tfds:...') works too
  general   the general corpus the regression monitor guards and the mixture replays (default 'general': CPython's
            English documentation; a directory works too)
  mixture   domain_only | general_only | <D>_<G> (e.g. 70_30) | two_phase | three_phase | cyclical | difficulty
  schedule  wsd | cosine
  strategy  a '+' chain of naive | distill | ewc | generative_replay | lora (see configs/cpt_lm.py)
  steps     adaptation steps (default 400)
  seq_len   tokens per training sequence (default 128, capped at a GPT-2 checkpoint's learned positions)

The imported model is the base (`pretrain.steps=0`); its own tokenizer reads both corpora. At the end the kept model
(the best checkpoint inside the regression threshold, a LoRA adapter merged into it) is written back to
`<workdir>/hf` in the same layout (`lm.export_hf`), ready for transformers' `from_pretrained`.
"""
import os

from configs.common import parse_arg
from cl_jax.lm import default_config


def _spec(value: str) -> str:
  """A path names a directory corpus (`dir:` spec); anything else is a domain spec as it is."""
  if ":" not in value and (os.sep in value or value.startswith((".", "~")) or os.path.isdir(value)):
    return "dir:" + value
  return value


def get_config(arg: str = ""):
  args = parse_arg(arg, path="", domain="", general="general", mixture="70_30", schedule="wsd", strategy="naive",
                   steps="400", seq_len="128")
  for key in ("path", "domain"):
    if not args[key]:
      raise ValueError(f"configs/cpt_hf.py: {key}=... is required (path: a Hugging Face checkpoint directory; "
                       "domain: a directory of .txt / .jsonl files)")
  c = default_config()
  c.lm.init_from = args["path"]
  c.text.domain = _spec(args["domain"])
  c.text.general = _spec(args["general"])
  c.adapt.mixture = args["mixture"]
  if args["mixture"] == "difficulty":
    c.adapt.difficulty = True
  c.optim.schedule = args["schedule"]
  c.strategy = args["strategy"]
  c.pretrain.steps = 0  # the imported model is the base
  c.adapt.steps = int(args["steps"])
  c.lm.seq_len = int(args["seq_len"])
  if os.path.exists(os.path.join(args["path"], "config.json")):  # else validation names the missing checkpoint
    from cl_jax.models import hf_checkpoint
    model = hf_checkpoint.transformer_config(hf_checkpoint.read_config(args["path"]))
    if model.positions == "learned":
      c.lm.seq_len = min(c.lm.seq_len, model.max_len)
  # A pre-trained model's peak LR scale (3e-4, as Llama / GPT-3 pre-training); adaptation re-warms to
  # adapt.lr_ratio (0.1) of it, LoRA adapters to all of it (they start at zero; Hu et al. 2021).
  c.optim.lr = 3e-4
  if "lora" in args["strategy"].split("+"):
    c.adapt.lr_ratio = 1.0
  c.regression.eval_every = 50
  return c
