"""Strategies by name: one `StrategyEntry` per name in `REGISTRY`. `build_strategy('ewc+replay', config, learner)`
chains the named ones (see `base.chain` for what the order of a chain means).

The contract of an entry (README "Adding a strategy"):

  build           (config, learner) -> Strategy. Reads only its own config sections (and the shared ones such as
                  `scenario`, `lora`); may raise ValueError for a bad value, but `check_config` should catch it first.
  default_config  {section name: () -> ConfigDict}: the config sections this strategy owns, with their defaults.
                  `cl_jax.config.base_config()` adds every registered section, so `--config.<section>.<key>=...`
                  works for every strategy. Two names may share a section (`lwf` and `distill`; `ewc`, `online_ewc`
                  and the `fisher` section) by naming the same default function.
  check_config    (config) -> None, or None. Raises ValueError whose message starts with the full key and value,
                  e.g. "ewc.lam=-1.0: expected a non-negative penalty strength". `cl_jax.config.validate` calls it
                  for every strategy in the chain, before anything is written.
  config_sections the sections the strategy reads: results.json records them under `strategy_config`, and
                  `cl_jax.config.comparable` keeps them (and drops every other strategy-owned section) when a workdir
                  decides whether it holds the same run. List every section the strategy reads (usually the keys
                  of `default_config`; O-LoRA adds the base config's `lora`).

  needs           the capabilities (`CAPABILITIES`) a run kind must provide for the strategy to work there: class
                  labels, task ids, per-example inputs, the shape of the logits, a buffer of inputs, the step's
                  hooks, ... Which strategies a kind allows is computed from it (`allowed(provides)`), and
                  `check_allowed` refuses the rest in one line naming the capability a kind lacks.
  config_needs    (config) -> {capability: 'key=value'}, or None: what a setting adds to `needs` (A-GEM's
                  class-balanced memory needs class labels; its reservoir memory does not).
  needs_one_of    sets of capabilities, one of which a kind must provide as well (a strategy with one
                  implementation per kind: generative replay needs token logits and a mixture on a language model,
                  class logits and the step's hooks on a classifier); its `config_needs` names the set of the
                  config's kind, for the error.

Registering a strategy is one line below:

  REGISTRY["si"] = StrategyEntry(si.si, {"si": si.default_config}, si.check_config, ("si",), frozenset({"step_hooks"}))
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

from cl_jax.strategies.base import (Learner, LossContext, LossFn, Strategy, TaskData, TaskInfo, chain)
from cl_jax.strategies.joint import joint
from cl_jax.strategies.naive import naive
from cl_jax.strategies import distill as _distill, ewc as _ewc, fisher as _fisher, replay as _replay
from cl_jax.strategies import olora as _olora


# What a run kind can provide a strategy; an entry's `needs` is a subset of these keys. Each value says what the
# capability promises (it is also the reason an error gives when a kind lacks it).
CAPABILITIES: dict[str, str] = {
    "class_labels": "one class label per example (batch['y'] int [B]; a buffer keeps one label per slot)",
    "class_logits": "one logits row per example [B, C] under the scenario's logit mask, scored by its argmax",
    "token_logits": "a causal language model: next-token logits [B, L, V], a target per position",
    "task_ids": "each example's task id reaches the model in training and evaluation (heads, columns, masks)",
    "per_example": "the task's training examples at its end, one per row, the model run on one at a time "
                   "(per-example gradients: EWC's Fisher, MAS's importance)",
    "input_buffer": "examples (x, y, task) of fixed shapes (TaskInfo.input_shape / label_shape) that a device "
                    "buffer can keep and the model and task loss can run on alone (no packing metadata)",
    "mixture": "batches drawn from a data mixture, each row's corpus in batch['domain']",
    "step_hooks": "a train step that runs the strategy's grads and update hooks",
    "predict": "an evaluator that scores the strategy's predict hook instead of the model",
    "model_rewrite": "a model built through the strategy's prepare (adapters, columns), its trainable mask honoured",
    "reset_optimizer": "the optimizer state re-initialised at a task boundary when the strategy asks",
    "routing": "a router that sends each input to its task's adapter at evaluation",
    "train_tasks": "task t trained on the data of strategy.train_tasks(t) (joint's union of the tasks seen)",
}


class StrategyEntry(NamedTuple):
  """One registered strategy; see the module docstring for each field's contract."""
  build: Callable[..., Strategy]
  default_config: Mapping[str, Callable] = {}
  check_config: Callable | None = None
  config_sections: tuple[str, ...] = ()
  needs: frozenset[str] = frozenset()
  config_needs: Callable | None = None
  needs_one_of: tuple[frozenset, ...] = ()


def entry_from_builder(build, default_config: Mapping[str, Callable] | None = None,
                       needs: frozenset[str] = frozenset()) -> StrategyEntry:
  """An entry for a builder that carries `check_config` / `config_sections` as function attributes."""
  default_config = dict(default_config or {})
  sections = getattr(build, "config_sections", None)
  return StrategyEntry(build, default_config, getattr(build, "check_config", None),
                       tuple(sections) if sections is not None else tuple(default_config), frozenset(needs))


def _buffer_policy_needs(section: str):
  """config_needs of a buffer filled by `replay.POLICIES`: class-balanced filling groups by (task, class label)."""
  def config_needs(config) -> dict[str, str]:
    policy = config[section].get("policy", "reservoir") if section in config else "reservoir"
    return {"class_labels": f"{section}.policy={policy!r}"} if policy == "class_balanced" else {}
  return config_needs


def _online_replay_needs(config) -> dict[str, str]:
  fill = config.replay.get("fill", "task_end") if "replay" in config else "task_end"
  return {"step_hooks": f"replay.fill={fill!r}"} if fill == "online" else {}


def _router_needs(config) -> dict[str, str]:
  router = config.progressive.get("router", "none") if "progressive" in config else "none"
  return {"predict": f"progressive.router={router!r}"} if router != "none" else {}


_DISTILL = {"distill": _distill.default_config}
_EWC = {"ewc": _ewc.default_config, "fisher": _fisher.default_config}

_PER_EXAMPLE = frozenset({"per_example"})   # EWC's Fisher: per-example gradients of the task's examples
_ADAPTERS = frozenset({"model_rewrite", "reset_optimizer"})   # adapter slots on a frozen base, one per task

REGISTRY: dict[str, StrategyEntry] = {
    "naive": StrategyEntry(naive, {}, None, ()),
    "joint": StrategyEntry(joint, {}, None, (), frozenset({"train_tasks"})),
    "ewc": entry_from_builder(_ewc.ewc, _EWC, _PER_EXAMPLE),
    "online_ewc": entry_from_builder(_ewc.online_ewc, _EWC, _PER_EXAMPLE),
    # Distillation is shape-generic (KL over the last axis of [B, C] or [B, L, V]): it needs nothing special.
    "distill": entry_from_builder(_distill.distill, _DISTILL),
    "lwf": entry_from_builder(_distill.distill, _DISTILL),
    # The buffer keeps one class label per slot and its examples are concatenated to the batch (x, y, task).
    "replay": entry_from_builder(_replay.replay, {"replay": _replay.default_config},
                                 frozenset({"class_labels", "input_buffer"}))._replace(
                                     config_needs=_online_replay_needs),
    # O-LoRA also reads the base config's `lora` section (adapter rank, targets), so results.json records it.
    "olora": StrategyEntry(_olora.olora, {"olora": _olora.default_config}, _olora.check_config, ("olora", "lora"),
                           _ADAPTERS),
}
# LoRA (one adapter on the frozen base, through `prepare`; reads the base config's `lora` section).
from cl_jax.strategies import lora as _lora  # noqa: E402
from cl_jax.strategies import progressive as _progressive  # noqa: E402
REGISTRY["lora"] = StrategyEntry(_lora.lora, {}, _lora.check_config, ("lora",), frozenset({"model_rewrite"}))
from cl_jax.strategies import lora_per_task as _lora_per_task  # noqa: E402
# Per-task slots that never meet: an input must be sent to its own slot, so the kind needs a router.
REGISTRY["lora_per_task"] = entry_from_builder(_lora_per_task.lora_per_task, needs=_ADAPTERS | {"routing"})
# One MLP column per task, picked by the task id (or by a router through `predict`); predictions are class logits.
REGISTRY["progressive"] = StrategyEntry(_progressive.progressive, {"progressive": _progressive.default_config},
                                        _progressive.check_config, ("progressive", "model"),
                                        _ADAPTERS | {"task_ids", "class_logits"}, _router_needs)
# Generative replay, by the run's kind: a language model writes the replay data itself, which takes the place of
# the mixture's general rows; a classifier replays a VAE's samples labelled by the previous model (DGR, Shin et al.
# 2017). What each needs comes from the config's kind (`config_needs`).
from cl_jax.strategies import generative_replay_classic as _dgr  # noqa: E402
REGISTRY["generative_replay"] = StrategyEntry(
    _dgr.generative_replay, {"generative_replay": _dgr.default_config}, _dgr.check_config, ("generative_replay",),
    frozenset(), _dgr.config_needs, _dgr.NEEDS_BY_KIND)
# Classic methods (H4): SI, MAS, DER / DER++ (one `der` section), A-GEM.
from cl_jax.strategies import agem as _agem, der as _der, mas as _mas, si as _si  # noqa: E402
# SI's path integral runs in the step (update hook); MAS takes per-example gradients of the output norm.
REGISTRY["si"] = StrategyEntry(_si.si, {"si": _si.default_config}, _si.check_config, ("si",),
                               frozenset({"step_hooks"}))
REGISTRY["mas"] = StrategyEntry(_mas.mas, {"mas": _mas.default_config}, _mas.check_config, ("mas",), _PER_EXAMPLE)
# DER's buffer keeps each example's labels and its whole response (logits [C], or [L, V] on a language model).
_DER_NEEDS = frozenset({"input_buffer", "step_hooks"})  # class logits [C] or token logits [L, V] alike
REGISTRY["der"] = StrategyEntry(_der.der, {"der": _der.default_config}, _der.check_config, ("der",), _DER_NEEDS)
REGISTRY["derpp"] = StrategyEntry(_der.derpp, {"der": _der.default_config}, _der.check_config, ("der",), _DER_NEEDS)
# A-GEM's memory keeps whole examples (label slots shaped by TaskInfo.label_shape); the projection is a grads hook.
REGISTRY["agem"] = StrategyEntry(_agem.agem, {"agem": _agem.default_config}, _agem.check_config, ("agem",),
                                 frozenset({"input_buffer", "step_hooks"}), _buffer_policy_needs("agem"))
from cl_jax.strategies import gdumb as _gdumb  # noqa: E402
REGISTRY["gdumb"] = StrategyEntry(_gdumb.gdumb, {"gdumb": _gdumb.default_config}, _gdumb.check_config, ("gdumb",),
                                  frozenset({"class_labels", "class_logits", "input_buffer", "step_hooks",
                                             "predict"}))
from cl_jax.strategies import icarl as _icarl  # noqa: E402
REGISTRY["icarl"] = StrategyEntry(_icarl.icarl, {"icarl": _icarl.default_config}, _icarl.check_config, ("icarl",),
                                  frozenset({"class_labels", "class_logits", "input_buffer", "predict"}))
from cl_jax.strategies import packnet as _packnet  # noqa: E402
# Weights owned per task (the task id picks the mask), frozen by a grads hook, scored through predict.
REGISTRY["packnet"] = StrategyEntry(_packnet.packnet, {"packnet": _packnet.default_config}, _packnet.check_config,
                                    ("packnet",), frozenset({"task_ids", "class_logits", "step_hooks", "predict",
                                                             "reset_optimizer"}))


def default_configs() -> dict[str, Callable]:
  """{section: default function} over every registered strategy; one function per section."""
  sections: dict[str, Callable] = {}
  for name, entry in REGISTRY.items():
    for section, default in entry.default_config.items():
      if sections.setdefault(section, default) is not default:
        raise ValueError(f"strategy {name!r}: config section {section!r} is already owned by another strategy "
                         "with a different default_config (share the same function, or rename the section)")
  return sections


# Config sections owned by strategies: {section name: default_config function}. Derived from REGISTRY; a
# strategy registered after import (a notebook) appears in `default_configs()`.
DEFAULT_CONFIGS = default_configs()


def normalise_strategy_spec(spec):
  """'ewc + replay' -> 'ewc+replay': the one spelling of a chain, so that a run is stored and compared by its
  strategies, not by the spaces around their names. Anything else (not a string) is returned as it is, for
  `parse_strategy_spec` to refuse."""
  if not isinstance(spec, str):
    return spec
  return "+".join(n.strip() for n in spec.split("+"))


def parse_strategy_spec(spec: str) -> list[str]:
  """'ewc+replay' -> ['ewc', 'replay'] (spaces around names ignored, as `normalise_strategy_spec` drops them); an
  unknown, empty or repeated name is a ValueError naming `strategy`."""
  if not isinstance(spec, str):
    raise ValueError(f"strategy={spec!r}: expected a string of strategy names joined by '+'")
  names = normalise_strategy_spec(spec).split("+")
  valid = f"valid names: {sorted(REGISTRY)} (chain them with '+', each at most once)"
  if not spec.strip() or any(not n for n in names):
    raise ValueError(f"strategy={spec!r}: empty strategy name; {valid}")
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise ValueError(f"strategy={spec!r}: unknown strategy {unknown}; {valid}")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"strategy={spec!r}: {repeated} named more than once; {valid}")
  return names


def used_sections(spec: str) -> tuple[str, ...]:
  """The config sections the strategies of `spec` read, in chain order, without repeats."""
  out: list[str] = []
  for name in parse_strategy_spec(spec):
    out += [s for s in REGISTRY[name].config_sections if s not in out]
  return tuple(out)


def check_strategy_config(config) -> None:
  """Runs `check_config` of every strategy in `config.strategy` (a chain sharing a section checks it once)."""
  seen = set()
  for name in parse_strategy_spec(config.strategy):
    check = REGISTRY[name].check_config
    if check is not None and check not in seen:
      seen.add(check)
      check(config)


def needs_of(name: str, config=None) -> dict[str, str]:
  """{capability: why} that strategy `name` needs: its `needs` ('' as the why) plus, with a config, what its
  settings add (`config_needs`, the why naming the setting)."""
  entry = REGISTRY[name]
  out = {cap: "" for cap in sorted(entry.needs)}
  if config is not None and entry.config_needs is not None:
    out.update({cap: why for cap, why in entry.config_needs(config).items() if cap not in out})
  return out


def allowed(provides) -> list[str]:
  """The registered strategies whose `needs` a kind that provides `provides` meets, in registry order."""
  unknown = set(provides) - set(CAPABILITIES)
  if unknown:
    raise ValueError(f"provides: unknown capabilities {sorted(unknown)}; expected among {sorted(CAPABILITIES)}")
  provides = set(provides)
  return [name for name, entry in REGISTRY.items()
          if entry.needs <= provides and (not entry.needs_one_of or any(n <= provides for n in entry.needs_one_of))]


def refused(spec: str, provides, config=None) -> dict[str, dict[str, str]]:
  """{name: {missing capability: why}} for the strategies of `spec` that a kind providing `provides` cannot run."""
  out = {}
  for name in parse_strategy_spec(spec):
    missing = {cap: why for cap, why in needs_of(name, config).items() if cap not in provides}
    if missing:
      out[name] = missing
  return out


def check_allowed(spec: str, provides, kind: str, config=None, hint: str = "", own=()) -> list[str]:
  """The names of `spec`, or a one-line ValueError naming each strategy kind `kind` refuses and the capability it
  lacks, e.g. "strategy='replay': kind 'lm' cannot run replay (needs class_labels: one class label per example ...);
  kind 'lm' runs [...]". `own` names strategies the kind implements itself (never refused); `hint` is appended
  (what the kind offers instead)."""
  names = parse_strategy_spec(spec)
  missing = {n: caps for n, caps in refused(spec, provides, config).items() if n not in own}
  if missing:
    parts = []
    for name, caps in missing.items():
      why = "; ".join(f"{cap}{' for ' + reason if reason else ''}: {CAPABILITIES[cap]}" for cap, reason in caps.items())
      parts.append(f"{name} (needs {why})")
    raise ValueError(f"strategy={spec!r}: kind {kind!r} cannot run {', '.join(parts)}; kind {kind!r} runs "
                     f"{[*allowed(provides), *own]}{hint}")
  return names


def build_strategy(spec: str, config, learner: Learner) -> Strategy:
  return chain(*[REGISTRY[n].build(config, learner) for n in parse_strategy_spec(spec)])


__all__ = ["Strategy", "LossContext", "LossFn", "TaskData", "TaskInfo", "Learner", "chain", "StrategyEntry",
           "entry_from_builder", "build_strategy", "parse_strategy_spec", "used_sections", "check_strategy_config",
           "default_configs", "REGISTRY", "DEFAULT_CONFIGS", "CAPABILITIES", "needs_of", "allowed", "refused",
           "check_allowed"]
