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

Registering a strategy is one line below:

  REGISTRY["si"] = StrategyEntry(si.si, {"si": si.default_config}, si.check_config, ("si",))
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

from cl_jax.strategies.base import (Learner, LossContext, LossFn, Strategy, TaskData, TaskInfo, chain)
from cl_jax.strategies.joint import joint
from cl_jax.strategies.naive import naive
from cl_jax.strategies import distill as _distill, ewc as _ewc, fisher as _fisher, replay as _replay
from cl_jax.strategies import olora as _olora


class StrategyEntry(NamedTuple):
  """One registered strategy; see the module docstring for each field's contract."""
  build: Callable[..., Strategy]
  default_config: Mapping[str, Callable] = {}
  check_config: Callable | None = None
  config_sections: tuple[str, ...] = ()


def entry_from_builder(build, default_config: Mapping[str, Callable] | None = None) -> StrategyEntry:
  """An entry for a builder that carries `check_config` / `config_sections` as function attributes."""
  default_config = dict(default_config or {})
  sections = getattr(build, "config_sections", None)
  return StrategyEntry(build, default_config, getattr(build, "check_config", None),
                       tuple(sections) if sections is not None else tuple(default_config))


_DISTILL = {"distill": _distill.default_config}
_EWC = {"ewc": _ewc.default_config, "fisher": _fisher.default_config}

REGISTRY: dict[str, StrategyEntry] = {
    "naive": StrategyEntry(naive, {}, None, ()),
    "joint": StrategyEntry(joint, {}, None, ()),
    "ewc": entry_from_builder(_ewc.ewc, _EWC),
    "online_ewc": entry_from_builder(_ewc.online_ewc, _EWC),
    "distill": entry_from_builder(_distill.distill, _DISTILL),
    "lwf": entry_from_builder(_distill.distill, _DISTILL),
    "replay": entry_from_builder(_replay.replay, {"replay": _replay.default_config}),
    # O-LoRA also reads the base config's `lora` section (adapter rank, targets), so results.json records it.
    "olora": StrategyEntry(_olora.olora, {"olora": _olora.default_config}, _olora.check_config, ("olora", "lora")),
}
# LoRA (one adapter on the frozen base, through `prepare`; reads the base config's `lora` section) and the LM's
# generative replay (H3).
from cl_jax.strategies import generative_replay as _generative_replay, lora as _lora  # noqa: E402
from cl_jax.strategies import progressive as _progressive  # noqa: E402
REGISTRY["lora"] = StrategyEntry(_lora.lora, {}, _lora.check_config, ("lora",))
from cl_jax.strategies import lora_per_task as _lora_per_task  # noqa: E402
REGISTRY["lora_per_task"] = entry_from_builder(_lora_per_task.lora_per_task)
REGISTRY["progressive"] = StrategyEntry(_progressive.progressive, {"progressive": _progressive.default_config},
                                        _progressive.check_config, ("progressive", "model"))
REGISTRY["generative_replay"] = StrategyEntry(
    _generative_replay.generative_replay, {"generative_replay": _generative_replay.default_config},
    _generative_replay.check_config, ("generative_replay",))
# Classic methods (H4): SI, MAS, DER / DER++ (one `der` section), A-GEM.
from cl_jax.strategies import agem as _agem, der as _der, mas as _mas, si as _si  # noqa: E402
REGISTRY["si"] = StrategyEntry(_si.si, {"si": _si.default_config}, _si.check_config, ("si",))
REGISTRY["mas"] = StrategyEntry(_mas.mas, {"mas": _mas.default_config}, _mas.check_config, ("mas",))
REGISTRY["der"] = StrategyEntry(_der.der, {"der": _der.default_config}, _der.check_config, ("der",))
REGISTRY["derpp"] = StrategyEntry(_der.derpp, {"der": _der.default_config}, _der.check_config, ("der",))
REGISTRY["agem"] = StrategyEntry(_agem.agem, {"agem": _agem.default_config}, _agem.check_config, ("agem",))
from cl_jax.strategies import gdumb as _gdumb  # noqa: E402
REGISTRY["gdumb"] = StrategyEntry(_gdumb.gdumb, {"gdumb": _gdumb.default_config}, _gdumb.check_config, ("gdumb",))
from cl_jax.strategies import icarl as _icarl  # noqa: E402
REGISTRY["icarl"] = StrategyEntry(_icarl.icarl, {"icarl": _icarl.default_config}, _icarl.check_config, ("icarl",))
from cl_jax.strategies import packnet as _packnet  # noqa: E402
REGISTRY["packnet"] = StrategyEntry(_packnet.packnet, {"packnet": _packnet.default_config}, _packnet.check_config,
                                    ("packnet",))


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


def parse_strategy_spec(spec: str) -> list[str]:
  """'ewc+replay' -> ['ewc', 'replay']; an unknown, empty or repeated name is a ValueError naming `strategy`."""
  if not isinstance(spec, str):
    raise ValueError(f"strategy={spec!r}: expected a string of strategy names joined by '+'")
  names = [n.strip() for n in spec.split("+")]
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


def build_strategy(spec: str, config, learner: Learner) -> Strategy:
  return chain(*[REGISTRY[n].build(config, learner) for n in parse_strategy_spec(spec)])


__all__ = ["Strategy", "LossContext", "LossFn", "TaskData", "TaskInfo", "Learner", "chain", "StrategyEntry",
           "entry_from_builder", "build_strategy", "parse_strategy_spec", "used_sections", "check_strategy_config",
           "default_configs", "REGISTRY", "DEFAULT_CONFIGS"]
