"""The long-context stage (`long_context.*`): RoPE changes, the same params, and the stage through `cl_jax.run`."""
from __future__ import annotations

import json
import os
import sysconfig

import jax
import numpy as np
import pytest

import cl_jax
from cl_jax import lm, sharding
from cl_jax.errors import ConfigError
from cl_jax.lm.long_context import model_with_config, stretched_config
from cl_jax.models.transformer import build_lm, model_config, rope_frequencies

CFG = model_config("tiny", vocab_size=40, d_model=32, num_heads=2, num_layers=1, max_len=32, init_std=0.3)


def test_stretched_rope_frequencies():
  f = rope_frequencies(CFG)
  dh = CFG.head_dim
  ntk = stretched_config(CFG, 32, 128, "ntk")
  assert ntk.max_len == 128 and ntk.rope_base == pytest.approx(CFG.rope_base * 4 ** (dh / (dh - 2)))
  f_ntk = rope_frequencies(ntk)
  # NTK-aware: the highest frequency is kept, the lowest is interpolated by exactly the factor.
  assert f_ntk[0] == pytest.approx(f[0]) and f_ntk[-1] == pytest.approx(f[-1] / 4, rel=1e-6)
  np.testing.assert_allclose(rope_frequencies(stretched_config(CFG, 32, 128, "linear")), f / 4, rtol=1e-6)
  l3 = stretched_config(CFG, 32, 128, "llama3", factor=8.0)
  assert (l3.rope_scaling, l3.rope_factor, l3.rope_original_max_len) == ("llama3", 8.0, 32)
  assert stretched_config(CFG, 32, 128, "none", rope_base=5e5).rope_base == 5e5


def test_same_params_new_rope():
  model, params = build_lm(CFG)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 40)
  plain = model_with_config(stretched_config(CFG, 32, 128, "none"))  # only max_len changes: the same function
  np.testing.assert_allclose(plain.apply(params, tokens), model.apply(params, tokens), rtol=1e-5, atol=1e-5)
  # Linear interpolation by s: positions p, s p, 2 s p, ... see what the original saw at 0, 1, 2, ...; the first
  # token (position 0) is unaffected, later ones differ.
  lin = model_with_config(stretched_config(CFG, 32, 128, "linear", factor=4.0))
  a, b = np.asarray(lin.apply(params, tokens)), np.asarray(model.apply(params, tokens))
  np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def _tiny(**changes):
  c = lm.default_config()
  c.lm.d_model, c.lm.num_layers, c.lm.num_heads, c.lm.seq_len = 32, 1, 2, 32
  c.text.update(domain="files:" + os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"),
                max_train_sequences=256, eval_sequences=16, cloze_items=16, validation=0.15, test=0.15,
                cloze_context=16)
  if "general_eval_sequences" in c.text:
    c.text.general_eval_sequences = 32
  c.optim.lr = 1e-2
  c.pretrain.update(steps=10, batch_size=8)
  c.adapt.update(steps=6, batch_size=8, mixture="70_30")
  c.regression.update(eval_every=3, eval_batch_size=16, hard_stop=False)
  c.train.log_every_steps = 3
  c.long_context.update(seq_len=64, scaling="linear", eval_sequences=8)
  for k, v in changes.items():
    section, key = k.split("__")
    c[section][key] = v
  return c


def test_stage_through_the_run(tmp_path):
  results = cl_jax.run(_tiny(), str(tmp_path), progress=False).as_dict()
  stage = json.load(open(tmp_path / "long_context.json"))
  assert results["provenance"]["process_count"] == 1 and results["provenance"]["config_sha256"]  # as every kind
  assert stage["before"]["rope_scaling"] == "none"
  assert (stage["after"]["rope_scaling"], stage["after"]["rope_factor"]) == ("linear", 2.0)  # 64 / 32
  assert stage["long_seq_len"] == 64 and stage["batch_size"] == 4  # 8 x 32 tokens per step, at 64 tokens
  for name in ("base", "final"):
    m = results["test"][name]
    assert np.isfinite(m["long_domain/perplexity"]) and np.isfinite(m["general/perplexity"])
  # The monitor guards the short-context general metrics only.
  assert set(results["baseline"]) >= {"general/perplexity", "long_general/perplexity"}
  guarded = set(results["history"][-1]["regressions"])
  assert "general/perplexity" in guarded and not any(k.startswith("long_") for k in guarded)
  assert results["test"]["final"]["long_domain/perplexity"] < results["test"]["base"]["long_domain/perplexity"]
  train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  # The monitor's baseline is the model *before* the RoPE change (the original base at short context), not the
  # stretched model at the stage's first step.
  from cl_jax.checkpoint import boundary_params
  from cl_jax.eval.evaluator import make_lm_evaluator
  from cl_jax.lm.data import load_data
  from cl_jax.lm.runner import model_config as run_model_config
  c = _tiny()
  data = load_data(c)
  original, _ = build_lm(run_model_config(c, data.tokenizer.vocab_size))
  want = make_lm_evaluator(original.apply, 16, sharding.make_mesh(1, 1))(
      boundary_params(str(tmp_path / "pretrain")), {"general": data.eval["validation"]["general"]})
  assert results["baseline"]["general/perplexity"] == pytest.approx(want["general/perplexity"], rel=1e-5)
  start = next(r for r in train if r.get("phase") == "adapt" and "general/perplexity" in r)
  # Interpolation changed the function (a 10-step base uses positions little: a small but real change).
  assert abs(start["general/perplexity"] / want["general/perplexity"] - 1) > 5e-5
  assert any(r.get("phase") == "adapt" and r.get("step") == 6 for r in train)


@pytest.mark.parametrize("changes, key", [
    (dict(long_context__seq_len=32), "long_context.seq_len"),
    (dict(long_context__scaling="yarn"), "long_context.scaling"),
    (dict(long_context__seq_len=0), "long_context.scaling"),
    (dict(long_context__batch_size=3, train__grad_accum=2), "long_context.batch_size")])
def test_config_errors_name_the_key(changes, key):
  from cl_jax.kinds import validate
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate(_tiny(**changes))
