"""Mixtures and curricula (cl_jax.data.mixture): ratios, stage weights, determinism, resume, epochs."""
from __future__ import annotations

import numpy as np
import pytest

from cl_jax.data import mixture as mx

SIZES = {"code": 97, "general": 61}


def _within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
  return abs(count / n - p) <= sigmas * np.sqrt(p * (1 - p) / n) + 1e-12


def test_realised_ratios_match_configured_weights():
  for weights in ({"code": 0.7, "general": 0.3}, {"code": 0.5, "general": 0.5},
                  {"code": 0.2, "general": 0.3, "extra": 0.5}):
    sizes = {**SIZES, "extra": 40} if "extra" in weights else SIZES
    s = mx.MixtureSampler(mx.constant(weights), sizes, batch_size=32, seed=1)
    steps = 200
    ids = s.domain_ids(np.arange(steps))
    n = ids.size
    for d, w in weights.items():
      count = int((ids == s.domains.index(d)).sum())
      assert _within_binomial(count, n, w), (weights, d, count / n)
    # The logged realised mixture is the same count.
    real = s.realised(0, steps)
    for d, w in weights.items():
      assert real[d] == pytest.approx(float((ids == s.domains.index(d)).mean()))
  # A zero weight is never drawn.
  s = mx.MixtureSampler(mx.from_spec("domain_only", 100), SIZES, batch_size=16, seed=0)
  assert s.realised(0, 100) == {"code": 1.0, "general": 0.0}


def test_each_curriculum_gives_its_stage_weights_at_its_steps():
  total = 900
  three = mx.three_phase(total)
  expect = {0: 0.8, 299: 0.8, 300: 0.5, 599: 0.5, 600: 0.2, 899: 0.2}
  for step, g in expect.items():
    w = mx.weights_at(three, step)
    assert w["general"] == pytest.approx(g) and w["code"] == pytest.approx(1 - g), step
  two = mx.two_phase(1000, stable_fraction=0.75, decay_domain_fraction=0.9)
  assert mx.weights_at(two, 749)["code"] == pytest.approx(0.5)
  assert mx.weights_at(two, 750)["code"] == pytest.approx(0.9)
  cyc = mx.cyclical(400, 100, {"code": 0.9, "general": 0.1}, {"code": 0.5, "general": 0.5})
  assert [mx.weights_at(cyc, s)["code"] for s in (0, 99, 100, 199, 200, 399)] == pytest.approx(
      [0.9, 0.9, 0.5, 0.5, 0.9, 0.5])
  assert mx.weights_at(mx.from_spec("70_30", 10), 5) == pytest.approx({"code": 0.7, "general": 0.3})
  # The sampler's realised mixture inside each stage of the three-phase curriculum matches that stage.
  s = mx.MixtureSampler(three, SIZES, batch_size=32, seed=4)
  for (start, end), g in zip([(0, 300), (300, 600), (600, 900)], (0.8, 0.5, 0.2)):
    n = (end - start) * 32
    count = round(s.realised(start, end)["general"] * n)
    assert _within_binomial(count, n, g), (start, count / n)


def test_resume_mid_stage_gives_identical_batches():
  stages = mx.three_phase(600)
  data = {"code": np.arange(97)[:, None] + 1000, "general": np.arange(61)[:, None] + 2000}
  full = mx.MixtureSampler(stages, SIZES, batch_size=24, seed=7)
  reference = [full.batch(s, data) for s in range(0, 450)]
  # A fresh sampler (nothing cached: a restarted process) resumes mid-stage at step 437.
  resumed = mx.MixtureSampler(stages, SIZES, batch_size=24, seed=7)
  for s in range(437, 450):
    b = resumed.batch(s, data)
    np.testing.assert_array_equal(b["tokens"], reference[s]["tokens"])
    np.testing.assert_array_equal(b["domain"], reference[s]["domain"])
  # The grain view of the same mixture, started at the resume step, reads the same batches.
  ds = mx.grain_dataset(mx.MixtureSampler(stages, SIZES, batch_size=24, seed=7), data, 450, 437)
  for i, s in enumerate(range(437, 450)):
    np.testing.assert_array_equal(ds[i]["tokens"], reference[s]["tokens"])
  # Another seed gives another order.
  other = mx.MixtureSampler(stages, SIZES, batch_size=24, seed=8).batch(437, data)
  assert not np.array_equal(other["tokens"], reference[437]["tokens"])


def test_each_domain_is_an_epoch_stream_without_repeats():
  s = mx.MixtureSampler(mx.domain_ratio(0.6), SIZES, batch_size=16, seed=2)
  seen = {d: [] for d in s.domains}
  for step in range(60):
    ids, ex = s.indices(step)
    for d, e in zip(ids, ex):
      seen[s.domains[d]].append(int(e))
  for d, n in SIZES.items():
    stream = seen[d]
    assert len(stream) > 2 * n
    # Every epoch visits every example exactly once, in a fresh order.
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]


def test_difficulty_order_moderate_first_most_ood_last():
  doc_index = np.array([0, 0, 1, 2, 2, 2, 3])
  ppl = np.array([5.0, 2.0, 9.0, 3.0])
  order = mx.difficulty_order(doc_index, ppl)
  np.testing.assert_array_equal(order, [2, 6, 0, 1, 3, 4, 5])  # doc 1, doc 3, doc 0, doc 2
  s = mx.MixtureSampler(mx.constant({"code": 1.0}), {"code": 7}, batch_size=3, seed=0,
                        orders={"code": order})
  consumed = np.concatenate([s.indices(step)[1] for step in range(3)])
  np.testing.assert_array_equal(consumed[:7], order)
  np.testing.assert_array_equal(consumed[7:], order[:2])  # the next epoch repeats the order
  assert np.all(np.diff(ppl[doc_index[consumed[:7]]]) >= 0)


@pytest.mark.parametrize("stages,match", [
    ([(5, {"code": 1.0})], "must start at step 0"),
    ([(0, {"code": 1.0}), (0, {"general": 1.0})], "strictly increase"),
    ([(0, {"code": -0.1, "general": 1.0})], ">= 0"),
    ([(0, {"python": 1.0})], "unknown domain"),
])
def test_bad_stages_are_clear_errors(stages, match):
  with pytest.raises(ValueError, match=match):
    mx.MixtureSampler(stages, SIZES, batch_size=4)


def test_bad_specs_and_empty_domains():
  with pytest.raises(ValueError, match="sum to 100"):
    mx.from_spec("70_20", 10)
  with pytest.raises(ValueError, match="mixture='foo'"):
    mx.from_spec("foo", 10)
  with pytest.raises(ValueError, match="no examples"):
    mx.MixtureSampler(mx.domain_ratio(0.5), {"code": 10, "general": 0}, batch_size=4)
