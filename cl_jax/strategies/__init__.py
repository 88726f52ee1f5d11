"""Strategies by name. `build_strategy('ewc+replay', config, learner)` chains the named ones.

To add a strategy: write `cl_jax/strategies/<name>.py` with a builder `(config, learner) -> Strategy`
(and, if it has settings, a `default_config() -> ConfigDict` for its config section), then add it to
REGISTRY (and DEFAULT_CONFIGS) below.
"""
from __future__ import annotations

from cl_jax.strategies.base import (Learner, LossContext, LossFn, Strategy, TaskData, TaskInfo, chain)
from cl_jax.strategies.joint import joint
from cl_jax.strategies.naive import naive
from cl_jax.strategies import distill as _distill, ewc as _ewc, fisher as _fisher, replay as _replay
from cl_jax.strategies import olora as _olora

REGISTRY = {
    "naive": naive,
    "joint": joint,
    "ewc": _ewc.ewc,
    "online_ewc": _ewc.online_ewc,
    "distill": _distill.distill,
    "lwf": _distill.distill,
    "replay": _replay.replay,
    "olora": _olora.olora,
}

# Config sections owned by strategies: {section name: default_config function}.
DEFAULT_CONFIGS = {
    "ewc": _ewc.default_config,
    "fisher": _fisher.default_config,
    "distill": _distill.default_config,
    "replay": _replay.default_config,
    "olora": _olora.default_config,
}


def parse_strategy_spec(spec: str) -> list[str]:
  names = [n.strip() for n in spec.split("+") if n.strip()]
  unknown = [n for n in names if n not in REGISTRY]
  if not names or unknown:
    raise ValueError(f"strategy={spec!r}: unknown strategy {unknown or spec!r}; "
                     f"valid names: {sorted(REGISTRY)} (chain them with '+')")
  return names


def build_strategy(spec: str, config, learner: Learner) -> Strategy:
  return chain(*[REGISTRY[n](config, learner) for n in parse_strategy_spec(spec)])


__all__ = ["Strategy", "LossContext", "LossFn", "TaskData", "TaskInfo", "Learner", "chain",
           "build_strategy", "parse_strategy_spec", "REGISTRY", "DEFAULT_CONFIGS"]
