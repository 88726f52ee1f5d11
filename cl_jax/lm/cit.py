"""Continual instruction tuning (CIT): instruction sets trained one after another on the one task loop.

The CIT kind's parts (`cl_jax.kinds.cit`; run with `cl_jax.run(config, workdir)`, `kind='cit'`). Each task is one or more instruction sets (`cit.tasks`, e.g.
"name,signature,module_qa,refusal+benign": four tasks, the last one the refusal set with its matched benign set),
from `cl_jax.data.instructions`: a built-in set, or a JSON-lines file of one's own, `file:TRAIN` or
`file:TRAIN:EVAL`, named by its file name (`parse_spec`; format, held-out rule and errors:
`instructions.load_user_set`). The pieces the task loop (`cl_jax.train.loop.run_tasks`) is handed:

  batches     packed SFT rows of the task's sets (`cl_jax.lm.sft`, assistant-only loss mask, segment ids), chat
              template `cl_jax.lm.templates` (plain for the byte model; the checkpoint's own chat_template when
              `lm.init_from` names a Hugging Face checkpoint that has one). With the `replay` strategy a share
              `cit.replay_fraction` of every task's rows comes from the training rows of the earlier tasks (uniformly
              over their pooled rows): step s of a task draws floor((s+1) f B) - floor(s f B) replayed rows of B,
              so after S steps the realised share is floor(S f B) / (S B), exactly f up to one row (the practice
              of mixing 5-10% of earlier instruction data into each new set; e.g. Scialom et al. 2022).
  step        the shared `compile_step` on `strategy.loss(sft_loss)`: the mean NLL over assistant tokens.
  evaluate    greedy decoding (a KV cache; prompts of unequal length are left-padded and the padding hidden
              from attention) of the first `cit.eval_examples` examples of `cit.eval_split` of every set, scored by
              `instructions.score_outputs`: exact match, format compliance, refusal rate. The accuracy-matrix entry
              of a task is the `cit.metric` rate over its sets' examples: 'exact_match' (default) or 'format'
              (compliance with each set's own output format: a behaviour a small model learns long before it
              gets answers exactly right, so forgetting shows in it after short training). The refusal rate on the
              `refusal` set and on the `benign` set (over-refusal) are reported per evaluation.
  after_task  the strategy chain's `after_task` (distillation snapshots its teacher).

Strategies (`strategy`, a '+' chain): `naive`; `replay` (the data-side mix above, `cit.replay_fraction`); `distill` /
`lwf` (the registry's distillation on the packed logits, teacher = the params after the previous task); `lora` (one
adapter on the frozen base through all sets, `lora.*`); `olora` (O-LoRA: one adapter slot per set, earlier slots
frozen, orthogonality penalty; `olora.*`, `lora.*`) -- for both, adapters are folded into the base for decoding;
`lora_per_task` (one adapter per set trained alone on the frozen base; at evaluation every prompt is decoded with
the adapter of the task a router picks, `route_prompts`: nearest set prototype of hashed token n-gram features of
the prompt, among the tasks trained so far; routing accuracy is reported with the scores). Per-set
system prompts or task tags are a data choice, `sft.task_prompt` = 'off' | 'system' | 'tag', combinable with any
strategy.

The accuracy matrix R (row 0 before training, row j after task j) gives ACC / BWT / FWT / forgetting through
`cl_jax.eval.metrics`; results.json (`Results(kind='cit')`) also holds every boundary's per-set scores, the model's
config ("model"), and each user set's files, SHA-256 and split sizes ("user_sets").

After the last task, `lm.export_hf` hands the final model over in the Hugging Face layout (`export_final`, through
the LM kind's `cl_jax.lm.runner.export_hf`): <workdir>/hf, and <workdir>/hf_adapter for LoRA / O-LoRA on an
imported checkpoint. `cl-jax chat` / `cl-jax generate --model <workdir>` read it (`cl_jax.lm.generation.load`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax import sharding
from cl_jax.data import instructions as ins

# What a CIT run gives a strategy (cl_jax.strategies.CAPABILITIES): token logits over packed rows, the step's hooks,
# `prepare` with its trainable mask, the optimizer reset, and a prompt router (`route_prompts`). Not per-example
# inputs nor an input buffer (a packed row holds several examples and needs its mask, segment ids and positions).
CIT_PROVIDES = frozenset({"token_logits", "step_hooks", "model_rewrite", "reset_optimizer", "routing"})
# Replay is the kind's own: a share of each task's rows drawn from the earlier tasks (`ReplaySource`).
CIT_OWN = ("replay",)


def cit_strategies() -> list[str]:
  """The strategies a CIT run can chain: the registered ones whose needs CIT_PROVIDES meets, plus CIT_OWN."""
  from cl_jax.strategies import allowed
  return [*allowed(CIT_PROVIDES), *CIT_OWN]


def adapter_strategies() -> list[str]:
  """The CIT strategies that change the model (`prepare`); a chain holds at most one."""
  from cl_jax.strategies import REGISTRY
  return [n for n in cit_strategies() if "model_rewrite" in REGISTRY[n].needs]
METRICS = ("exact_match", "format")


def default_config() -> ml_collections.ConfigDict:
  """The full CIT config (locked). `configs/cit.py` starts from this."""
  from cl_jax.strategies.distill import default_config as distill_config
  c = ml_collections.ConfigDict()
  c.kind = "cit"
  c.seed = 0
  c.strategy = "naive"  # a '+' chain of cit_strategies(): naive | replay | distill | lwf | si | lora | olora | ...
  c.cit = ml_collections.ConfigDict(dict(
      tasks="name,signature,module_qa,refusal+benign",  # ',' between tasks, '+' joins sets into one task
      steps_per_task=200, batch_size=16,
      eval_examples=32,     # greedy-decoded examples per set at every boundary evaluation
      eval_split="test",    # validation | test
      max_new_tokens=64,
      metric="exact_match",  # the accuracy-matrix entry per set: exact_match | format (compliance rate)
      data_dir="",          # '' builds the sets from this Python's stdlib; else a scripts/build_instruction_sets.py dir
      # strategy 'replay' (CIT's own, data-side): this share of each batch's rows comes from earlier tasks' rows. It
      # lives here, not in a `replay` section: the registry's replay strategy owns that name with another schema.
      replay_fraction=0.05,
      # a user set's held-out share when it comes without an evaluation file (`file:TRAIN`; not `file:TRAIN:EVAL`)
      heldout=0.1))
  c.sft = ml_collections.ConfigDict(dict(task_prompt="off", seq_len=384))
  c.lm = ml_collections.ConfigDict(dict(size="tiny", d_model=0, num_layers=0, num_heads=0, compute_dtype="float32",
                                        init_from="",  # a Hugging Face checkpoint directory ('' = a new byte model)
                                        # the final model in the Hugging Face layout after the last task (as the
                                        # LM kind's key: cl_jax.lm.runner.export_hf; `export_final` below)
                                        export_hf=True))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, b1=0.9, b2=0.95, momentum=0.9, weight_decay=0.0, grad_clip=1.0,
      schedule="constant", scope="task", warmup_fraction=0.05, decay_fraction=0.25, end_lr_fraction=0.0,
      decay_shape="linear"))
  c.distill = distill_config()
  from cl_jax.models.lora import default_config as lora_config
  from cl_jax.strategies.olora import default_config as olora_config
  c.lora = lora_config()
  c.olora = olora_config()
  from cl_jax.strategies import REGISTRY
  for name in cit_strategies():  # the sections of every other strategy a CIT run can chain (e.g. `si`)
    if name not in CIT_OWN:
      for section, default in REGISTRY[name].default_config.items():
        if section not in c:
          c[section] = default()
  c.train = ml_collections.ConfigDict(dict(log_every_steps=25, log_norms=False, divergence_factor=100.0))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.distributed = sharding.distributed_config()  # multi-host timeouts (cl_jax/sharding.py)
  c.lock()
  return c


USER_PREFIX = "file:"


def parse_spec(spec: str) -> tuple[list[list[str]], dict[str, tuple[str, str]]]:
  """cit.tasks -> (tasks, user files). 'a,b+c' -> [['a'], ['b', 'c']]; a set is a built-in name or a file of one's
  own, `file:TRAIN` or `file:TRAIN:EVAL` (`instructions.load_user_set`), named by its file name without the .jsonl
  suffix: 'name,file:/d/faq.jsonl' -> ([['name'], ['faq']], {'faq': ('/d/faq.jsonl', '')}). ValueError naming
  cit.tasks."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"cit.tasks={spec!r}: expected sets separated by ',' (tasks) and '+' (sets of one task), "
                     f"from {list(ins.SETS)} or file:PATH.jsonl[:EVAL.jsonl]")
  tasks, files = [], {}
  for t in spec.split(","):
    names = []
    for s in (x.strip() for x in t.split("+")):
      if s.startswith(USER_PREFIX):
        train, _, held = s[len(USER_PREFIX):].partition(":")
        try:
          name = ins.user_set_name(train)
          if held:
            ins.user_set_name(held)
        except ValueError as e:
          raise ValueError(f"cit.tasks={spec!r}: {e}") from None
        if name in ins.SETS:
          raise ValueError(f"cit.tasks={spec!r}: {train} would be named {name!r}, a built-in set's name (a user "
                           "set is named by its file name): rename the file")
        if name in files:
          raise ValueError(f"cit.tasks={spec!r}: a set appears twice ({name!r}: two files of that name)")
        files[name] = (train, held)
        s = name
      names.append(s)
    tasks.append(names)
  flat = [s for t in tasks for s in t]
  bad = [s for s in flat if s not in ins.SETS and s not in files]
  if bad:
    raise ValueError(f"cit.tasks={spec!r}: unknown set(s) {bad}; expected among {list(ins.SETS)} or "
                     "file:PATH.jsonl[:EVAL.jsonl] (a set of one's own)")
  if len(set(flat)) != len(flat):
    raise ValueError(f"cit.tasks={spec!r}: a set appears twice")
  return tasks, files


def parse_tasks(spec: str) -> list[list[str]]:
  """'a,b+c' -> [['a'], ['b', 'c']] (`parse_spec`'s tasks; user files by their set names)."""
  return parse_spec(spec)[0]


def load_sets(c) -> dict:
  """{set: examples} of cit.tasks: the built-in sets (`cit.data_dir`) and the user's files (ConfigError naming
  the file and line of the first bad one)."""
  tasks, files = parse_spec(c.cit.tasks)
  builtin = [s for t in tasks for s in t if s not in files]
  sets = ins.load_sets(builtin, c.cit.data_dir)
  for name, (train, held) in files.items():
    sets[name] = ins.load_user_set(train, held, float(c.cit.heldout))
  return sets


def _schema():
  from cl_jax.config import COMMON_SCHEMA, integer, number, one_of
  from cl_jax.models.transformer import SIZES
  from cl_jax.train.optim import OPTIMIZERS
  return {
      **COMMON_SCHEMA, "lm.size": one_of(tuple(SIZES)),
      "cit.steps_per_task": integer(1), "cit.batch_size": integer(1), "cit.eval_examples": integer(1),
      "cit.max_new_tokens": integer(1), "cit.metric": one_of(METRICS), "cit.eval_split": one_of("validation", "test"),
      "sft.task_prompt": one_of(ins.TASK_PROMPTS), "sft.seq_len": integer(16),
      "cit.replay_fraction": number(0.0, 1.0, high_open=True), "optim.name": one_of(OPTIMIZERS),
      "cit.heldout": number(0.0, 1.0, low_open=True, high_open=True),
  }


# One rule per key (cl_jax.config.check_schema, run by cl_jax.kinds.validate before `check_config`).
SCHEMA = _schema()


def check_config(c) -> None:
  """What one key's rule cannot say (SCHEMA has those): the strategy chain, the sets, keys that must agree, files;
  raises ValueError whose message starts with the full key, before anything is written."""
  from cl_jax.errors import ConfigError
  from cl_jax.strategies import REGISTRY, check_allowed, parse_strategy_spec
  from cl_jax.train.schedules import check_schedule
  if c.kind != "cit":
    raise ValueError(f"kind={c.kind!r}: cl_jax.lm.cit runs kind='cit' configs")
  names = parse_strategy_spec(c.strategy)
  check_allowed(c.strategy, CIT_PROVIDES, "cit", config=c, own=CIT_OWN,
                hint=" (replay: a share cit.replay_fraction of each task's rows from the earlier tasks)")
  _, files = parse_spec(c.cit.tasks)
  for name, (train, held) in files.items():  # every line of every user file, before anything is built
    try:
      ins.load_user_set(train, held, float(c.cit.heldout))
    except ValueError as e:
      raise ConfigError(f"cit.tasks: {e}") from None
  if c.cit.data_dir and not os.path.isdir(c.cit.data_dir):
    raise ValueError(f"cit.data_dir={c.cit.data_dir!r}: not a directory (build one with "
                     "scripts/build_instruction_sets.py, or '' to build the sets in memory)")
  if "replay" in names and not float(c.cit.replay_fraction) > 0:
    raise ValueError(f"cit.replay_fraction={c.cit.replay_fraction}: strategy 'replay' needs a fraction > 0 "
                     "(practice: 0.05 to 0.10)")
  check_schedule(c.optim)
  if c.lm.init_from:
    from cl_jax.models import hf_checkpoint
    hf_checkpoint.check(c.lm.init_from, "lm.init_from", seq_len=int(c.sft.seq_len))
  data, fsdp = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp)
  if c.cit.batch_size % (data * fsdp):
    raise ValueError(f"cit.batch_size={c.cit.batch_size}: not divisible by the {data * fsdp} devices of the mesh "
                     f"(mesh.data={data}, mesh.fsdp={fsdp})")
  adapters = [n for n in names if n in adapter_strategies()]
  if len(adapters) > 1:
    raise ValueError(f"strategy={c.strategy!r}: {' and '.join(adapters)} each change the model; choose one")
  for name in names:
    if name not in ("naive", "replay") and REGISTRY[name].check_config is not None:
      REGISTRY[name].check_config(c)


# ----------------------------------------------------------------------------- data

class CITData(NamedTuple):
  tokenizer: Any
  template: Any
  tasks: list            # [[set, ...], ...]
  names: list            # task names ("refusal+benign")
  rows: list             # per task: packed rows {tokens, mask, segment_ids, positions} [N_t, L]
  pack_stats: list       # per task: sft.PackStats
  eval_prompts: dict     # set -> (tokens int32 [n, P] left-padded, valid int32 [n, P])
  eval_targets: dict     # set -> [target str]
  end_text: str          # the template's end-of-turn text after an answer ('' for the plain template)
  route_train: list      # per task: (prompt features [N, D], set index within the task [N]) for the router
  route_eval: dict       # set -> prompt features [n, D] of its evaluation prompts


def _end_text(template, tokenizer) -> str:
  """Text a chat template puts after an assistant answer (cut from decoded outputs), '' when that is a token."""
  from cl_jax.lm.templates import PlainTemplate, as_messages
  if isinstance(template, PlainTemplate):
    return ""
  pieces = template.pieces(as_messages([("user", "q"), ("assistant", "ANSWER")]), tokenizer)
  trained = "".join(p.text or "" for p in pieces if p.train)
  return trained.split("ANSWER", 1)[-1].strip()


def load_tokenizer_and_template(c):
  from cl_jax.data.tokenizer import ByteTokenizer
  from cl_jax.lm.templates import PlainTemplate, template_for
  if not c.lm.init_from:
    return ByteTokenizer(), PlainTemplate()
  from cl_jax.models import hf_checkpoint
  tok = hf_checkpoint.load_tokenizer(c.lm.init_from, hf_checkpoint.read_config(c.lm.init_from))
  return tok, template_for(tok, c.lm.init_from)


def load_data(c) -> CITData:
  """Tokenized, packed training rows per task and left-padded evaluation prompts per set (a function of c)."""
  from cl_jax.lm import sft
  from cl_jax.lm.templates import encode_chat, encode_prompt
  tasks = parse_tasks(c.cit.tasks)
  flat = [s for t in tasks for s in t]
  sets = load_sets(c)
  tok, template = load_tokenizer_and_template(c)
  seq_len, prompt_mode = int(c.sft.seq_len), c.sft.task_prompt
  rows, stats, route_train = [], [], []
  for t, task in enumerate(tasks):
    examples = [e for s in task for e in ins.split_of(sets[s], "train")]
    # Router statistics: the prompts (no answers) of up to ROUTE_EXAMPLES training examples per set.
    feats, labels = [], []
    for j, s_ in enumerate(task):
      for e in ins.split_of(sets[s_], "train")[:ROUTE_EXAMPLES]:
        feats.append(prompt_features(encode_prompt(ins.conversation(e, prompt_mode, answer=False), tok, template)))
        labels.append(j)
    route_train.append((np.stack(feats), np.asarray(labels, np.int32)))
    order = np.random.default_rng([c.seed, 17, t]).permutation(len(examples))
    encoded = [encode_chat(ins.conversation(examples[i], prompt_mode), tok, template) for i in order]
    r, st = sft.pack(encoded, seq_len, tok.pad_id)
    rows.append(r)
    stats.append(st)
  prompts, targets = {}, {}
  for s in flat:
    evals = ins.split_of(sets[s], c.cit.eval_split)[:int(c.cit.eval_examples)]
    encoded = [encode_prompt(ins.conversation(e, prompt_mode, answer=False), tok, template) for e in evals]
    prompts[s] = encoded
    targets[s] = [e["target"] for e in evals]
  width = max(len(p) for ps in prompts.values() for p in ps)
  padded = {}
  for s, ps in prompts.items():
    toks = np.full((len(ps), width), tok.pad_id, np.int32)
    valid = np.zeros((len(ps), width), np.int32)
    for i, p in enumerate(ps):
      toks[i, width - len(p):] = p
      valid[i, width - len(p):] = 1
    padded[s] = (toks, valid)
  route_eval = {s: np.stack([prompt_features(p) for p in ps]) for s, ps in prompts.items()}
  return CITData(tok, template, tasks, ["+".join(t) for t in tasks], rows, stats, padded, targets,
                 _end_text(template, tok), route_train, route_eval)


ROUTE_EXAMPLES = 256   # training prompts per set behind the router's prototypes
ROUTE_DIM = 256        # hashed feature buckets


def prompt_features(ids, dim: int = ROUTE_DIM) -> np.ndarray:
  """A prompt's routing feature: counts of its token unigrams and bigrams hashed into `dim` buckets, log1p, unit
  L2 norm (float64 [dim]). Model-free, so routing does not depend on the adapter being chosen, and it works for
  any tokenizer (the byte model's ids are bytes)."""
  ids = np.asarray(ids, np.int64)
  v = np.zeros(dim, np.float64)
  np.add.at(v, (ids * 2654435761) % dim, 1.0)
  if len(ids) > 1:
    np.add.at(v, (ids[:-1] * 40503 + ids[1:] * 2246822519 + 7) % dim, 1.0)
  v = np.log1p(v)
  return v / max(np.linalg.norm(v), 1e-12)


class ReplaySource:
  """The task loop's batch source for task t: packed rows of task t, and `fraction` of the rows from the earlier
  tasks (module docstring); a pure function of (seed, t, step), so it resumes by step. Counts replayed rows and
  examples (segments) for the realised share."""

  def __init__(self, data: CITData, t: int, batch_size: int, fraction: float, seed: int, state: dict | None = None):
    self.cur = data.rows[t]
    self.t, self.b, self.f, self.seed = t, batch_size, fraction if t > 0 else 0.0, seed
    if self.f > 0:
      self.pool = {k: np.concatenate([data.rows[i][k] for i in range(t)]) for k in self.cur}
      self.pool_task = np.concatenate([np.full(len(data.rows[i]["tokens"]), i, np.int32) for i in range(t)])
    state = state or {}
    self.step = int(state.get("step", 0))
    self.counts = dict(state.get("counts", {"rows": 0, "replay_rows": 0, "examples": 0, "replay_examples": 0}))

  def replayed_at(self, step: int) -> int:
    return int(np.floor((step + 1) * self.f * self.b + 1e-9) - np.floor(step * self.f * self.b + 1e-9))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    from cl_jax.lm.sft import sft_batch
    rng = np.random.default_rng([self.seed, 1000 + self.t, self.step])
    n_rep = self.replayed_at(self.step)
    n_cur = self.b - n_rep
    n = len(self.cur["tokens"])
    idx = rng.choice(n, n_cur, replace=n < n_cur)
    rows = {k: v[idx] for k, v in self.cur.items()}
    task = np.full(n_cur, self.t, np.int32)
    if n_rep:
      ridx = rng.choice(len(self.pool["tokens"]), n_rep, replace=len(self.pool["tokens"]) < n_rep)
      rows = {k: np.concatenate([rows[k], self.pool[k][ridx]]) for k in rows}
      task = np.concatenate([task, self.pool_task[ridx]])
    examples = rows["segment_ids"].max(axis=1)
    self.counts["rows"] += self.b
    self.counts["replay_rows"] += n_rep
    self.counts["examples"] += int(examples.sum())
    self.counts["replay_examples"] += int(examples[n_cur:].sum())
    self.step += 1
    return sharding.process_rows(sft_batch(rows, task))

  def get_state(self) -> dict:
    return {"step": self.step, "counts": dict(self.counts)}


# ----------------------------------------------------------------------------- greedy decoding

def greedy_decode(model, params, prompt, valid, *, max_new_tokens: int, eos_id: int):
  """Greedy continuation of left-padded prompts [B, P] (`valid` 1 on real tokens) with the KV-cache sampler
  (`cl_jax.models.sampling.generate`); int32 [B, max_new_tokens], eos-filled after a row's first eos."""
  from flax import nnx
  from cl_jax.models.sampling import generate
  # A prompt longer than the model's context keeps its last tokens (prompts are left-padded, so the tail is the
  # question and the answer cue); an imported checkpoint's max_len can be shorter than the longest prompt.
  keep = nnx.merge(model.graphdef, params).config.max_len - max_new_tokens
  if prompt.shape[1] > keep:
    prompt, valid = prompt[:, -keep:], valid[:, -keep:]
  out = generate(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=max_new_tokens, temperature=0.0,
                 eos_id=eos_id, valid=valid)
  return out[:, prompt.shape[1]:]


def decode_text(tokenizer, ids: np.ndarray, end_text: str = "") -> str:
  ids = np.asarray(ids)
  stop = np.nonzero(ids == tokenizer.eos_id)[0]
  text = tokenizer.decode(ids[:stop[0]] if len(stop) else ids)
  if end_text and end_text in text:
    text = text[:text.index(end_text)]
  return text


def evaluate_sets(model, params, data: CITData, max_new_tokens: int, mesh=None) -> tuple[dict, dict]:
  """{set: scores} (instructions.score_outputs) and {set: decoded outputs} of greedy decoding."""
  scores, outputs = {}, {}
  for s, (toks, valid) in data.eval_prompts.items():
    out = np.asarray(greedy_decode(model, params, jnp.asarray(toks), jnp.asarray(valid),
                                   max_new_tokens=int(max_new_tokens), eos_id=int(data.tokenizer.eos_id)))
    texts = [decode_text(data.tokenizer, row, data.end_text) for row in out]
    scores[s] = ins.score_outputs(s, texts, data.eval_targets[s])
    outputs[s] = texts
  return scores, outputs


def route_prompts(data: CITData, seen: int) -> dict:
  """{set: int32 [n] the task whose adapter each evaluation prompt is sent to}: nearest prototype (Mahalanobis,
  tied shrunk covariance; `cl_jax.routing`) among the prompt features of tasks 0..seen -- one prototype per set,
  from that set's training prompts, so only tasks trained so far can be chosen and no earlier data is kept."""
  from cl_jax import routing
  protos = routing.fit_prototypes([f for f, _ in data.route_train[:seen + 1]],
                                  [y for _, y in data.route_train[:seen + 1]])
  return {s: np.asarray(routing.route_prototypes(protos, jnp.asarray(f, jnp.float32)))
          for s, f in data.route_eval.items()}


def evaluate_routed(model, params, data: CITData, seen: int, spec, max_new_tokens: int) -> tuple[dict, dict, dict]:
  """`evaluate_sets` for per-task adapters (`lora_per_task`): every prompt decoded by the base plus the adapter
  its route names (`route_prompts`). Returns (scores, outputs, routing) with routing = {set: share of its
  prompts sent to its own task's adapter}."""
  from cl_jax.strategies.lora_per_task import slot_params
  routes = route_prompts(data, seen)
  task_of = {s: t for t, task in enumerate(data.tasks) for s in task}
  merged: dict = {}  # task -> plain params with its adapter folded in, built once per evaluation
  scores, outputs, routing = {}, {}, {}
  for s, (toks, valid) in data.eval_prompts.items():
    texts = [""] * len(toks)
    for k in np.unique(routes[s]):  # decode the whole set once per chosen adapter: one compiled shape
      if int(k) not in merged:
        merged[int(k)] = slot_params(params, int(k), spec)
      out = np.asarray(greedy_decode(model, merged[int(k)], jnp.asarray(toks), jnp.asarray(valid),
                                     max_new_tokens=int(max_new_tokens), eos_id=int(data.tokenizer.eos_id)))
      for i in np.nonzero(routes[s] == k)[0]:
        texts[i] = decode_text(data.tokenizer, out[i], data.end_text)
    scores[s] = ins.score_outputs(s, texts, data.eval_targets[s])
    outputs[s] = texts
    routing[s] = float(np.mean(routes[s] == task_of[s])) if task_of[s] <= seen else None
  return scores, outputs, routing


def task_scores(data: CITData, scores: dict, metric: str = "exact_match") -> list[float]:
  """The accuracy-matrix row: per task, the `metric` rate (exact match or format compliance) over all its sets'
  evaluated examples."""
  row = []
  for task in data.tasks:
    n = [len(data.eval_targets[s]) for s in task]
    row.append(float(sum(scores[s][metric] * k for s, k in zip(task, n)) / max(sum(n), 1)))
  return row


# ----------------------------------------------------------------------------- the run

def build_model(c, data: CITData, mesh):
  """(FunctionalModel, params): a new byte-level transformer, or the checkpoint `lm.init_from`."""
  model, params, _, _ = _build_model(c, data, mesh)
  return model, params


def _build_model(c, data: CITData, mesh):
  """(model, params, TransformerConfig, the import's `hf_checkpoint.Loaded` without its params, or None)."""
  if c.lm.init_from:
    from cl_jax.models import hf_checkpoint
    loaded = hf_checkpoint.load(c.lm.init_from, mesh=mesh, tokenizer=False, compute_dtype=c.lm.compute_dtype)
    # What the export needs of the import: its config.json, and the tokenizer the run trained with.
    return loaded.model, loaded.params, loaded.config, loaded._replace(params=None, tokenizer=data.tokenizer)
  from cl_jax.models.transformer import build_lm, model_config
  overrides = {k: int(c.lm[k]) for k in ("d_model", "num_layers", "num_heads") if c.lm[k]}
  width = data.eval_prompts[next(iter(data.eval_prompts))][0].shape[1] + int(c.cit.max_new_tokens)
  cfg = model_config(c.lm.size, vocab_size=int(data.tokenizer.vocab_size), max_len=max(int(c.sft.seq_len), width),
                     compute_dtype=c.lm.compute_dtype, **overrides)
  model, params = build_lm(cfg, seed=c.seed)
  return model, params, cfg, None


def model_config_of(record: dict):
  """The `TransformerConfig` a CIT run's results.json records under "model" (JSON lists back to tuples)."""
  from cl_jax.models.transformer import TransformerConfig
  return TransformerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def export_final(c, workdir: str, cfg, imported, params, names, tokenizer) -> dict:
  """`lm.export_hf` of a CIT run: the final model (after the last task) through the LM kind's export
  (`cl_jax.lm.runner.export_hf`): <workdir>/hf with the model -- LoRA / O-LoRA adapters folded in -- its
  tokenizer and the chat template the run trained with (the checkpoint's own, the one `template_for` read), and
  with `lora` / `olora` the adapter in PEFT's format in <workdir>/hf_adapter on the imported base. Not exported,
  with a one-line notice and `hf_export_skipped` in the record: a byte model (no family holds cl_jax's RoPE + gelu
  byte model, and the byte tokenizer has no tokenizer file; `cl-jax chat --model <workdir>` reads the run itself)
  and `lora_per_task` (one adapter per task, chosen per prompt by the router: no single model to hand over)."""
  from cl_jax.lm.runner import export_hf
  why = None
  if "lora_per_task" in names:
    why = ("lora_per_task keeps one adapter per task, picked per prompt by the router: there is no single model "
           "to export")
  elif imported is None:
    why = ("the byte model (no lm.init_from) matches no Hugging Face family and its byte tokenizer has no "
           "tokenizer file; `cl-jax chat --model <workdir>` reads the run's own checkpoint")
  if why:
    print(f"notice: lm.export_hf: the model is not exported to the Hugging Face layout: {why}")
    return {"hf_export": None, "hf_export_skipped": why}
  adapter = next((n for n in ("lora", "olora") if n in names), None)
  return export_hf(c, workdir, cfg, imported, params, adapter, tokenizer)


def decoding_params(params, c):
  """Plain model params for decoding: LoRA params ({'base', 'adapters'}) with every adapter folded into the base
  (the sum of all adapters: LoRA's one, O-LoRA's slots, whose inference rule is exactly that sum)."""
  if not (isinstance(params, dict) and set(params) == {"base", "adapters"}):
    return params
  from cl_jax.models import lora
  spec = lora.spec_from_config(c.lora)
  for name in lora.adapter_names(params):
    params = lora.merge_adapter(params, name, spec)
  return params["base"]


def strategy_names(c) -> list[str]:
  from cl_jax.strategies import parse_strategy_spec
  return parse_strategy_spec(c.strategy)


class Built(NamedTuple):
  """A CIT run before it writes anything: its data, the task plan (state, shared step, hooks) and the model."""
  data: Any
  plan: Any
  params: Any
  names: list  # the strategy chain's names
  fraction: float
  steps: int
  t0: float
  cfg: Any = None       # the model's TransformerConfig
  imported: Any = None  # the `hf_checkpoint.Loaded` of lm.init_from (no params), or None


def build(config, data: CITData | None = None) -> Built:
  """The instruction sets (`data` skips building them), the model, the strategy chain and the task plan."""
  from cl_jax.losses import next_token_loss
  from cl_jax.lm.sft import packed_apply, sft_batch
  from cl_jax.strategies import Learner, TaskData, TaskInfo, build_strategy
  from cl_jax.train.loop import Plan, task_start
  from cl_jax.train.optim import build_optimizer
  from cl_jax.train.schedules import build_schedule
  from cl_jax.train.state import build_state
  from cl_jax.train.step import compile_step
  c = config
  t0 = time.time()
  data = data or load_data(c)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
  model, params, cfg, imported = _build_model(c, data, mesh)
  names = strategy_names(c)
  loss_names = [n for n in names if n not in ("naive", "replay")]
  learner = Learner(packed_apply(model), lambda task, index: None)
  spec = "+".join(loss_names) or "naive"
  strategy = build_strategy(spec, c, learner)
  num_tasks = len(data.tasks)
  steps = int(c.cit.steps_per_task)
  fraction = float(c.cit.replay_fraction) if "replay" in names else 0.0
  key = jax.random.PRNGKey(c.seed)
  task_info = TaskInfo(num_tasks, int(data.tokenizer.vocab_size), (int(c.sft.seq_len) - 1,))
  trainable = None
  if strategy.prepare is not None:  # lora / olora: base + adapters, only the adapters train
    apply, params, trainable = strategy.prepare(model, params, task_info, jax.random.fold_in(key, 2))
    learner = Learner(apply, lambda task, index: None)
    strategy = build_strategy(spec, c, learner)
  schedule = build_schedule(c.optim, steps, num_tasks)
  optimizer = build_optimizer(c.optim, schedule, trainable)
  state, state_sh = build_state(params, optimizer, strategy.init(params, task_info), jax.random.fold_in(key, 1), mesh)
  train_step, _ = compile_step(strategy.loss(next_token_loss(learner)), optimizer, schedule, strategy, state_sh, mesh,
                               log_norms=bool(c.train.log_norms))
  sources: dict = {}       # task -> its live batch source (counts of the rows drawn so far)
  finished: dict = {}      # task -> the final counts of a finished task (checkpointed through meta)

  def batches(t, iterator_state):
    source = ReplaySource(data, t, int(c.cit.batch_size), fraction, c.seed, iterator_state)
    sources[t] = source
    return source

  def meta():
    return {"replay_counts": {str(t): v for t, v in finished.items()}}

  def load_meta(d):
    finished.update({int(t): v for t, v in d.get("replay_counts", {}).items()})

  def after_task(state, t):
    if t in sources:
      finished[t] = dict(sources[t].counts)
    b = sft_batch({k: v[:int(c.cit.batch_size)] for k, v in data.rows[t].items()}, t)
    new = strategy.after_task(state.strategy_state, state.params, TaskData(b["x"], b["y"], b["task"], t),
                              jax.random.fold_in(key, 1000 + t))
    return state._replace(strategy_state=sharding.put_global(new, state_sh.strategy_state))

  def evaluate(state, t):
    routing = None
    if "lora_per_task" in names:  # each prompt to its routed task's adapter, among the tasks trained so far
      from cl_jax.models import lora
      scores, outputs, routing = evaluate_routed(model, state.params, data, t,
                                                 lora.spec_from_config(c.lora), int(c.cit.max_new_tokens))
    else:
      scores, outputs = evaluate_sets(model, decoding_params(state.params, c), data, int(c.cit.max_new_tokens),
                                      mesh)
    fields = {"accuracy": task_scores(data, scores, c.cit.metric), "sets": scores,
              "examples": {s: outputs[s][:2] for s in outputs}}
    if routing is not None:
      fields["routing_accuracy"] = routing
    if "refusal" in scores:
      fields["refusal_rate"] = scores["refusal"]["refusal_rate"]
    if "benign" in scores:
      fields["over_refusal_rate"] = scores["benign"]["refusal_rate"]
    every = {**{t_: src.counts for t_, src in sources.items()}, **finished}
    counts = [v for t_, v in every.items() if t_ > 0]  # task 1 has nothing to replay
    rows = sum(x["rows"] for x in counts)
    if rows:
      fields["replay_share"] = {
          "rows": sum(x["replay_rows"] for x in counts) / rows,
          "examples": sum(x["replay_examples"] for x in counts) / max(sum(x["examples"] for x in counts), 1)}
    return fields

  plan = Plan(state=state, state_sharding=state_sh, steps=[steps] * num_tasks, batches=batches,
              train_step=train_step, put_batch=lambda b, stacked: sharding.put_batch(b, mesh, stacked=stacked),
              evaluate=evaluate, begin_task=task_start(strategy, optimizer, state_sh), after_task=after_task,
              meta=meta, load_meta=load_meta,
              eval_before=True,
              checkpoint_every=int(c.checkpoint.every_steps), log_every=int(c.train.log_every_steps),
              divergence_factor=float(c.train.divergence_factor), names=[f"cit: {n}" for n in data.names],
              record={"phase": "cit"})
  return Built(data, plan, params, names, fraction, steps, t0, cfg, imported)


def execute(built: Built, ctx):
  """Trains the instruction sets in the opened workdir; returns `Results(kind='cit')`."""
  from cl_jax.checkpoint import Checkpoints
  from cl_jax.eval.metrics import summarize
  from cl_jax.results import Results
  from cl_jax.train.loop import run_tasks
  c = ctx.config
  data, plan, params, names, fraction, steps, t0, cfg, imported = built
  with Checkpoints(ctx.workdir, keep=c.checkpoint.keep) as checkpoints:
    out = run_tasks(plan, ctx.workdir, checkpoints, ctx.resume, ctx.progress, hooks=ctx.hooks)
  exported = (export_final(c, ctx.workdir, cfg, imported, out.state.params, names, data.tokenizer)
              if c.lm.export_hf else {})
  tokenizer_dir = None
  if c.lm.init_from:  # the tokenizer and chat template the run trained with travel with its checkpoints
    from cl_jax.models import hf_checkpoint
    tokenizer_dir = os.path.join(ctx.workdir, "tokenizer")
    hf_checkpoint.write_tokenizer(tokenizer_dir, data.tokenizer, getattr(data.template, "source", None))
  r = np.asarray([rec["accuracy"] for rec in out.boundary], np.float64)
  set_history = [{"after_task": i, "sets": rec["sets"]} for i, rec in enumerate(out.boundary)]
  final = out.boundary[-1]
  extra = {
      "title": f"Continual instruction tuning: {c.strategy}, task_prompt={c.sft.task_prompt}",
      "tasks": data.names,
      "metric": ("exact match of the greedy-decoded answer" if c.cit.metric == "exact_match" else
                 "format compliance of the greedy-decoded answer (each set's own output format)")
                + f" (per task: over its sets' first {c.cit.eval_examples} {c.cit.eval_split} examples)",
      "strategy": c.strategy, "task_prompt": c.sft.task_prompt, "replay_fraction": fraction, "seed": c.seed,
      "steps_per_task": steps, "final_sets": final["sets"], "set_history": set_history,
      "refusal_rate": final.get("refusal_rate"), "over_refusal_rate": final.get("over_refusal_rate"),
      "routing_accuracy": final.get("routing_accuracy"),
      "format_compliance": {s: v["format"] for s, v in final["sets"].items()},
      "replay_share": final.get("replay_share"),
      "packing": [st._asdict() for st in data.pack_stats],
      "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "timing": {"task_seconds": out.task_seconds, "total_seconds": time.time() - t0}, "tokenizer_dir": tokenizer_dir,
      "model": dataclasses.asdict(cfg), "user_sets": user_set_record(c, data), **exported,
      **strategy_record_cit(c, names)}
  return Results("cit", ctx.workdir, r, **summarize(r), extra=extra)


def user_set_record(c, data: CITData) -> dict:
  """{set: {train, eval (file or None), sha256 of each file, rows per split}} of the run's user sets."""
  import hashlib
  _, files = parse_spec(c.cit.tasks)
  out = {}
  for name, (train, held) in files.items():
    rows = ins.load_user_set(train, held, float(c.cit.heldout))  # cached: the files were read by `load_data`
    digest = {}
    for f in (train, held) if held else (train,):
      with open(f, "rb") as fh:
        digest[f] = hashlib.file_digest(fh, "sha256").hexdigest()
    out[name] = {"train": train, "eval": held or None, "sha256": digest,
                 "heldout_rule": (f"all lines of {held}" if held else
                                  f"the first ceil({c.cit.heldout} n) lines by SHA-256 of their content, with copies"),
                 "rows": {s: sum(e["split"] == s for e in rows) for s in ("train", ins.HELDOUT)},
                 "evaluated": len(data.eval_targets[name])}
  return out


def report(results, workdir: str, config) -> None:
  """summary.md, the accuracy-matrix heat map and the per-task curves."""
  from cl_jax import report as reports
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(summary_markdown(results))
  title = f"CIT {config.strategy}, prompts {config.sft.task_prompt} ({config.cit.metric})"
  r = np.asarray(results.accuracy_matrix)
  reports.plot_accuracy_matrix(r, os.path.join(workdir, "accuracy_matrix.png"), title)
  reports.plot_accuracy_curves(reports.read_evals(workdir), os.path.join(workdir, "accuracy_curves.png"), title=title)


def strategy_record_cit(c, names) -> dict:
  used = {}
  if "replay" in names:
    used["replay"] = {"fraction": float(c.cit.replay_fraction)}  # the record's shape before the key moved
  if {"distill", "lwf"} & set(names):
    used["distill"] = c.distill.to_dict()
  if set(adapter_strategies()) & set(names):
    used["lora"] = c.lora.to_dict()
  if "olora" in names:
    used["olora"] = c.olora.to_dict()
  from cl_jax.strategies import REGISTRY
  for name in names:  # any other strategy's own sections (e.g. `si`)
    for section in REGISTRY[name].config_sections if name not in CIT_OWN else ():
      if section not in used and section in c:
        used[section] = c[section].to_dict()
  return {"strategy_config": used} if used else {}


def summary_markdown(results) -> str:
  from cl_jax.report import matrix_table
  e = results.extra
  lines = [f"# {e['title']}", "", f"Tasks: {', '.join(e['tasks'])}. Metric: {e['metric']}.", "",
           matrix_table(results.accuracy_matrix, e["tasks"]), "",
           f"ACC {results.acc:.3f}, BWT {results.bwt:+.3f}, FWT {results.fwt:+.3f}, forgetting "
           f"{results.forgetting:.3f}.", "", "| set | exact match | format | refusal rate |", "|---|---|---|---|"]
  for s, v in e["final_sets"].items():
    lines.append(f"| {s} | {v['exact_match']:.3f} | {v['format']:.3f} | {v['refusal_rate']:.3f} |")
  if e.get("routing_accuracy"):
    lines += ["", "Routing accuracy (share of each set's prompts sent to its own task's adapter): " + ", ".join(
        f"{s} {v:.3f}" for s, v in e["routing_accuracy"].items() if v is not None) + "."]
  if e.get("replay_share"):
    lines += ["", f"Realised replay share: {e['replay_share']['rows']:.4f} of rows, "
                  f"{e['replay_share']['examples']:.4f} of examples (configured {e['replay_fraction']})."]
  for name, u in (e.get("user_sets") or {}).items():
    lines += ["", f"User set `{name}`: {u['train']} ({u['rows']['train']} training lines; held out: "
                  f"{u['rows']['heldout']} lines, {u['heldout_rule']}; {u['evaluated']} evaluated)."]
  if e.get("hf_export"):
    lines += ["", f"Exported in the Hugging Face layout: {e['hf_export']}"
                  + (f"; the adapter in PEFT's format: {e['hf_adapter']}" if e.get("hf_adapter") else "")
                  + ". Chat with it: `cl-jax chat --model <this workdir>`."]
  elif e.get("hf_export_skipped"):
    lines += ["", f"Not exported to the Hugging Face layout: {e['hf_export_skipped']}."]
  return "\n".join(lines) + "\n"


__all__ = ["build", "execute", "report", "Built", "default_config", "check_config", "parse_spec", "parse_tasks",
           "load_sets", "load_data", "export_final", "model_config_of", "CITData", "ReplaySource",
           "greedy_decode", "decode_text", "evaluate_sets", "evaluate_routed", "route_prompts", "prompt_features",
           "task_scores", "CIT_PROVIDES", "cit_strategies", "adapter_strategies"]
