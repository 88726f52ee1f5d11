"""cl_jax as a model of EleutherAI's lm-evaluation-harness (`lm_eval`, 0.4.13), registered as `cl_jax`.

From Python:

    import lm_eval
    import cl_jax.lm.lm_eval_model  # registers the model
    lm_eval.simple_evaluate(model="cl_jax", model_args="pretrained=path/to/hf_dir_or_lm_workdir,batch_size=16",
                            tasks=[...])
    lm_eval.simple_evaluate(model=ClJaxLM(engine=engine), tasks=[...])   # an engine a run already holds

From the command line, lm-eval's own CLI with the model registered (lm-eval 0.4.13 loads no plugins by entry point):

    cl-jax lm-eval --model cl_jax --model_args pretrained=<dir> --tasks <tasks> --include_path <dir> \\
        --output_path <dir> --log_samples

model_args: pretrained (a Hugging Face checkpoint directory or a finished cl_jax LM workdir, read by
`cl_jax.lm.generation.load`), batch_size (rows per forward pass; 'auto' is the default, 16), max_length (the longest
input, default the model's positions), add_bos_token (as lm-eval's `hf` model), seed (sampling). Every request goes
through `cl_jax.eval.lm_engine.Engine`, which encodes and scores exactly as lm-eval's `hf` model does, so a task
gives the same numbers through `--model cl_jax` as through `--model hf` on the same checkpoint.

It lives in `cl_jax.lm` (not beside the engine in `cl_jax.eval`) because it loads models, which is this layer's.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cl_jax.errors import ConfigError
from cl_jax.eval.lm_engine import Engine

DEFAULT_BATCH_SIZE = 16


def _as_bool(value, key: str) -> bool | None:
  if value is None or isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("true", "1", "yes"):
    return True
  if text in ("false", "0", "no"):
    return False
  raise ConfigError(f"model_args {key}={value!r}: expected true or false")


def _as_int(value, key: str, default: int | None) -> int | None:
  if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
    return default
  try:
    out = int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"model_args {key}={value!r}: expected a positive integer") from None
  if out < 1:
    raise ConfigError(f"model_args {key}={value!r}: expected a positive integer")
  return out


_LAST: dict = {}  # the last engine load_engine built, by its arguments


def load_engine(pretrained: str, *, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                add_bos_token: bool | None = None, seed: int = 0) -> Engine:
  """The engine of a model directory (`cl_jax.lm.generation.load`). The last one built is kept: evaluating the same
  model again in this process (a notebook, lm-eval called task by task) reuses its params and compiled programs."""
  key = (os.path.realpath(pretrained), batch_size, max_length, add_bos_token, seed)
  if key not in _LAST:
    from cl_jax.lm import generation
    m = generation.load(pretrained)
    _LAST.clear()
    _LAST[key] = Engine.from_model(m, batch_size=batch_size, max_len=max_length or m.max_len,
                                   add_bos_token=add_bos_token, seed=seed)
  return _LAST[key]


def _as_seed(value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"model_args seed={value!r}: expected an integer") from None


@register_model("cl_jax")
class ClJaxLM(LM):
  """lm-eval's `LM` over a cl_jax `Engine` (module docstring)."""

  def __init__(self, pretrained: str | None = None, batch_size=None, max_length=None, add_bos_token=None,
               seed=0, engine: Engine | None = None, max_batch_size=None, device=None, **unknown):
    super().__init__()
    del max_batch_size, device  # lm-eval passes them to every model; jax places the work itself
    if unknown:
      raise ConfigError(f"model_args {sorted(unknown)}: not understood by the cl_jax model; it takes pretrained, "
                        "batch_size, max_length, add_bos_token, seed")
    if engine is None:
      if not pretrained:
        raise ConfigError("model_args pretrained=<Hugging Face directory or cl_jax LM workdir> is required")
      engine = load_engine(str(pretrained), batch_size=_as_int(batch_size, "batch_size", DEFAULT_BATCH_SIZE),
                           max_length=_as_int(max_length, "max_length", None),
                           add_bos_token=_as_bool(add_bos_token, "add_bos_token"), seed=_as_seed(seed))
    self.engine = engine

  # ------------------------------------------------------------------------------------------- requests

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    args = [tuple(r.args) for r in requests]
    out = self.engine.loglikelihood(args)
    for a, o in zip(args, out):
      self.cache_hook.add_partial("loglikelihood", a, o)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    texts = [r.args[0] for r in requests]
    out = self.engine.loglikelihood_rolling(texts)
    for t, o in zip(texts, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (t,), o)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    args = [(r.args[0], dict(r.args[1])) for r in requests]
    out = self.engine.generate_until(args)
    for a, o in zip(args, out):
      self.cache_hook.add_partial("generate_until", a, o)
    return out

  # ------------------------------------------------------------------------------------------- chat templates

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    return self.engine.apply_chat_template(chat_history, add_generation_prompt)

  @property
  def tokenizer_name(self) -> str:
    return self.engine.tokenizer_name

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self.engine.chat_template if chat_template else None

  # lm-eval reads these for its logs
  @property
  def max_length(self) -> int:
    return self.engine.max_len

  @property
  def batch_size(self) -> int:
    return self.engine.batch_size


def main(argv: Sequence[str]) -> int:
  """`cl-jax lm-eval <lm-eval's arguments>`: lm-eval's command line with the `cl_jax` model registered."""
  from lm_eval.__main__ import cli_evaluate
  saved = sys.argv
  sys.argv = ["lm-eval", *argv]
  try:
    cli_evaluate()
  except SystemExit as e:  # argparse's --help / errors
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
  finally:
    sys.argv = saved
  return 0


__all__ = ["ClJaxLM", "load_engine", "main"]
