"""Continual pre-training of a small byte-level LM: general prose -> Python code, with a data mixture.

  python run.py --config configs/cpt_lm.py:mixture=70_30
  python run.py --config configs/cpt_lm.py:mixture=two_phase,schedule=wsd
  python run.py --config configs/cpt_lm.py:mixture=domain_only,strategy=distill
  python run.py --config configs/cpt_lm.py:mixture=domain_only,strategy=lora
  python run.py --config configs/cpt_lm.py:mixture=domain_only,strategy=lora --config.lora.rank=16
  python run.py --config configs/cpt_lm.py:mixture=domain_only,strategy=ewc --config.ewc.lam=1e4
  python run.py --config configs/cpt_lm.py:mixture=70_30 --config.regression.eval_every=50
  python run.py --config configs/cpt_lm.py:mixture=70_30 --config.regression.patience=3  # ride out a dip
  python run.py --config configs/cpt_lm.py:mixture=70_30 --config.regression.interval=t \
      --config.regression.confidence=0.9

The regression monitor compares per-sequence losses with the base's (95% paired bootstrap): a checkpoint whose interval
on a general metric's relative regression lies beyond 2% is never kept, one beyond 5% stops the run; the kept model
is the best checkpoint not beyond 2% (`regression.threshold`, `regression.stop_threshold`).
The general validation / test splits are 15% of the source files each (~150K / ~185K tokens at seq_len 128).
  python run.py --config configs/cpt_lm.py:mixture=70_30 --config.vocab.extend=256  # 256 code tokens first (BPE)
  python run.py --config configs/cpt_lm.py:mixture=70_30 --config.long_context.seq_len=512 \
      --config.long_context.scaling=ntk  # a long-context stage: RoPE stretched, 512-token sequences

arg: comma-separated `key=value` among
  mixture   domain_only | general_only | <D>_<G> (e.g. 70_30 = 70% code, 30% general) | three_phase |
            two_phase | cyclical | difficulty (domain only, documents ordered by base perplexity)
  schedule  wsd | cosine (adaptation LR schedule; 5% warmup; WSD decays over the last 25%)
  strategy  a '+' chain of: naive | distill (token-level KL to the pre-adaptation model) | ewc (Fisher over
            general text, anchored at the base; `ewc.*`, `fisher.*`) | generative_replay (the base model's
            continuations of stored general prompts replace the general data in the mixture) | lora (one adapter on
            the frozen base; `lora.*`), e.g. lora+distill
  size      tiny | small | base | 125m | 350m | 1b (cl_jax.models.transformer.SIZES)

The default (tiny, 128-byte sequences, batch 16) trains on 2 CPU cores in minutes. On a pod the larger
sizes shard every kernel over `fsdp`, e.g. on a v4-32 slice:
  python run.py --config configs/cpt_lm.py:mixture=70_30,size=350m --config.mesh.fsdp=16 \
      --config.lm.seq_len=2048 --config.pretrain.batch_size=256 --config.adapt.batch_size=256 \
      --config.pretrain.steps=100000 --config.adapt.steps=10000
"""
from configs.common import parse_arg
from cl_jax.lm import default_config


def get_config(arg: str = ""):
  args = parse_arg(arg, mixture="70_30", schedule="wsd", strategy="naive", size="tiny")
  c = default_config()
  c.lm.size = args["size"]
  c.adapt.mixture = args["mixture"]
  if args["mixture"] == "difficulty":
    c.adapt.difficulty = True
  c.optim.schedule = args["schedule"]
  c.strategy = args["strategy"]
  if "lora" in args["strategy"].split("+"):
    c.adapt.lr_ratio = 1.0  # adapters start at zero and need the full LR to move (Hu et al. 2021)
  c.pretrain.steps = 1500
  c.adapt.steps = 400
  c.regression.eval_every = 50
  c.text.max_train_sequences = 8192
  return c
