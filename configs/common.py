"""Shared helpers for configs: parse `get_config(arg)` strings like 'scenario=task,strategy=ewc+replay'."""


def parse_arg(arg: str, **defaults) -> dict:
  """Parses 'k=v,k=v' into a dict over `defaults`; an unknown key is an error naming the valid ones."""
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ValueError(f"config arg {item!r}: expected key=value; valid keys: {sorted(defaults)}")
    k, v = (s.strip() for s in item.split("=", 1))
    if k not in defaults:
      raise ValueError(f"config arg {k!r}: unknown; valid keys: {sorted(defaults)}")
    out[k] = v
  return out
