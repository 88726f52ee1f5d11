"""experiments/forgetting_factors.py: the verdict rule on known numbers; scenario.train_sizes on a tiny dataset."""
import numpy as np
import pytest

from cl_jax.data.scenarios import make_scenario
from cl_jax.data.sources import LabelledData
from experiments.forgetting_factors import js_divergence, verdict

X = [128, 512, 2048, 8192]


def _seeds(slope_per_decade, noise, seeds=5, rng=0):
  r = np.random.default_rng(rng)
  base = 0.2 + slope_per_decade * np.log10(X)
  return base[None] + noise * r.standard_normal((seeds, len(X)))


def test_verdict_agrees_disagrees_inconclusive():
  # The claim for data size: fewer examples, more forgetting (expected sign -1 on log10 size).
  agree = verdict(X, _seeds(-0.05, 0.005), expected_sign=-1, kind="log10")
  assert agree["verdict"] == "agrees"
  assert agree["slope_mean"] == pytest.approx(-0.05, abs=0.01)
  assert agree["slope_interval"][1] < 0
  assert verdict(X, _seeds(+0.05, 0.005), expected_sign=-1, kind="log10")["verdict"] == "disagrees"
  # Seeds whose slopes disagree with each other (+3, -3, +2, -2, +1 points per decade): the mean is 0.2, the
  # interval wide.
  mixed = np.asarray([0.2 + b * np.log10(X) for b in (0.03, -0.03, 0.02, -0.02, 0.01)])
  flat = verdict(X, mixed, expected_sign=-1, kind="log10")
  assert flat["slope_mean"] == pytest.approx(0.002)
  assert flat["verdict"].startswith("inconclusive")
  assert flat["slope_interval"][0] < 0 < flat["slope_interval"][1]


def test_verdict_uses_the_per_seed_slopes():
  # Seeds differ by a constant offset (a paired design): the slope is exact despite the spread between seeds.
  x = [0.0, 30.0, 60.0, 90.0]
  f = np.asarray([[0.1 * s + 0.002 * a for a in x] for s in range(4)])
  v = verdict(x, f, expected_sign=+1)
  assert v["per_seed_slopes"] == pytest.approx([0.002] * 4)
  assert v["slope_ci95"] == pytest.approx(0.0, abs=1e-12)
  assert v["verdict"] == "agrees"
  assert v["spearman_rho"] > 0.3
  with pytest.raises(ValueError, match="seeds"):
    verdict(x, f[:, :3], expected_sign=+1)


def _data(n=200):
  rng = np.random.default_rng(0)
  y = np.arange(n) % 10
  return LabelledData(rng.random((n, 4, 4), np.float32), y.astype(np.int32), rng.random((50, 4, 4), np.float32),
                      (np.arange(50) % 10).astype(np.int32), "tiny")


def _cfg(**kw):
  import ml_collections
  return ml_collections.ConfigDict({"name": "rotated", "kind": "domain", "num_tasks": 2, "angles": [0.0, 90.0],
                                    "seed": 0, **kw})


def test_train_sizes_subsample_one_task_only():
  data = _data()
  s = make_scenario(data, _cfg(train_sizes=[0, 30]))
  assert s.tasks[0].num_train == 200 and s.tasks[1].num_train == 30
  assert len(s.tasks[1].y_test) == 50  # test data untouched
  # The kept examples are real rows of the source, with their own labels.
  rows = {x.tobytes(): y for x, y in zip(data.x_train, data.y_train)}
  assert all(rows[x.tobytes()] == y for x, y in zip(s.tasks[1].x_train, s.tasks[1].y_train))
  # Nested: the 10-example subset is part of the 30-example one; another scenario.seed picks others.
  small = make_scenario(data, _cfg(train_sizes=[0, 10])).tasks[1].x_train
  big = {x.tobytes() for x in s.tasks[1].x_train}
  assert all(x.tobytes() in big for x in small)
  other = make_scenario(data, _cfg(train_sizes=[0, 30], seed=1)).tasks[1].x_train
  assert {x.tobytes() for x in other} != big


@pytest.mark.parametrize("sizes", [[10], [0, -1], [0, 1.5]])
def test_train_sizes_rejected(sizes):
  with pytest.raises(ValueError, match="scenario.train_sizes"):
    make_scenario(_data(), _cfg(train_sizes=sizes))


def test_train_sizes_checked_with_the_config():
  from cl_jax.kinds import validate
  from cl_jax.errors import ConfigError
  from configs.rotated_mnist import get_config
  c = get_config("num_tasks=2")
  c.data.name = "digits"  # bundled: the data check passes and the scenario's is reached
  c.scenario.train_sizes = [0, 500, 100]
  with pytest.raises(ConfigError, match=r"scenario.train_sizes=\[0, 500, 100\]: expected 2"):
    validate(c)


def test_js_divergence_bounds():
  p = np.asarray([0.5, 0.5, 0.0, 0.0])
  assert js_divergence(p, p) == pytest.approx(0.0)
  assert js_divergence(p, p[::-1]) == pytest.approx(1.0)  # disjoint supports: 1 bit
  q = np.asarray([0.25, 0.25, 0.25, 0.25])
  # ½·KL(p‖m) + ½·KL(q‖m) with m = (3/8, 3/8, 1/8, 1/8), by hand.
  by_hand = 0.5 * (np.log2(0.5 / 0.375)) + 0.5 * (0.5 * np.log2(0.25 / 0.375) + 0.5 * np.log2(0.25 / 0.125))
  assert js_divergence(p, q) == pytest.approx(by_hand)
  assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
