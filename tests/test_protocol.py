"""experiments/protocol.py: when a finished run may stand in for a requested one."""
from experiments.protocol import _agree

DEFAULTS = {"model": {"hidden": [400, 400], "init": "lecun"}, "seed": 0, "train": {"num_seeds": 1}}


def test_a_key_added_after_the_run_matches_only_at_its_default():
  finished = {"model": {"hidden": [400, 400]}, "seed": 3, "train": {"num_seeds": 10}}
  want = {"model": {"hidden": [400, 400], "init": "lecun"}, "seed": 3, "train": {"num_seeds": 10}}
  assert _agree(finished, want, DEFAULTS)                       # the new key at its default: same run
  want["model"]["init"] = "torch"
  assert not _agree(finished, want, DEFAULTS)                   # set away from it: a different run
  assert not _agree(finished, {**want, "model": {"hidden": [400, 400]}, "seed": 4}, DEFAULTS)  # shared key differs
  assert not _agree(finished, {**want, "model": {"hidden": [400, 400]}, "extra": 1}, DEFAULTS)  # no default known
  assert _agree({**finished, "removed": 1}, {**finished}, DEFAULTS)  # a key the codebase dropped is ignored


def test_hill_climb_stops_at_a_local_optimum_scoring_each_point_once():
  from experiments.protocol import hill_climb
  curve = [1.0, 3.0, 4.0, 6.0, 5.0, 9.0]          # local optimum at 3; the global one (5) is past a dip
  calls = []
  best, scores = hill_climb(len(curve), 1, lambda i: calls.append(i) or curve[i])
  assert best == 3
  assert sorted(calls) == [0, 1, 2, 3, 4]           # never 5: index 4 is worse than 3
  assert len(calls) == len(set(calls))
  assert scores == {i: curve[i] for i in range(5)}
  assert hill_climb(3, 0, lambda i: [2.0, 1.0, 0.0][i]) == (0, {0: 2.0, 1: 1.0})   # at the grid's edge
  assert hill_climb(3, 2, lambda i: 1.0) == (2, {1: 1.0, 2: 1.0})   # a tie keeps the current point
  assert hill_climb(3, 1, lambda i: [2.0, 1.0, 2.0][i])[0] == 0     # equal better neighbours: the lower


def test_refine_scores_one_setting_per_program_and_returns_them_in_grid_order(monkeypatch):
  from experiments import protocol
  acc = {1.0: 0.80, 10.0: 0.84, 100.0: 0.87, 1000.0: 0.85, 10000.0: 0.50}
  asked = []

  def fake_select(make, grid, seed, n, workroot, log):
    (key, values), = grid.items()
    assert key == "ewc.lam" and len(values) == 1 and (seed, n) == (100, 1)
    asked.append(values[0])
    return {key: values[0]}, [({key: values[0]}, acc[values[0]])]

  monkeypatch.setattr(protocol, "select_on_validation", fake_select)
  grid = {"ewc.lam": list(acc)}
  best, scores = protocol.refine_on_validation(None, grid, {"ewc.lam": 10.0}, 100, 1, "/nowhere", print)
  assert best == {"ewc.lam": 100.0}
  assert sorted(asked) == [1.0, 10.0, 100.0, 1000.0]           # 10000 is never run: 1000 is already worse
  assert scores == [({"ewc.lam": v}, acc[v]) for v in (1.0, 10.0, 100.0, 1000.0)]
  import pytest
  with pytest.raises(ValueError, match="not in the grid"):
    protocol.refine_on_validation(None, grid, {"ewc.lam": 3.0}, 100, 1, "/nowhere", print)
  with pytest.raises(ValueError, match="one key"):
    protocol.refine_on_validation(None, {"a": [1], "b": [2]}, {"a": 1}, 100, 1, "/nowhere", print)


def test_a_setting_finished_inside_another_sweep_is_reused(tmp_path):
  import json
  from cl_jax.config import set_overrides
  from cl_jax.kinds import base_config
  from cl_jax.train.loop import config_dict
  from experiments.protocol import settings_from_sweeps

  def config(sweep, seed=100):
    c = base_config()
    set_overrides(c, {"strategy": "ewc", "seed": seed, "train.sweep": sweep})
    return c

  run = tmp_path / "finished"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(config_dict(config("ewc.lam=10,100"))))
  settings = [{"overrides": {"ewc.lam": v}, "acc": {"mean": a}} for v, a in ((10.0, 0.84), (100.0, 0.87))]
  (run / "results.json").write_text(json.dumps({"settings": settings}))
  assert settings_from_sweeps(config("ewc.lam=100"), str(tmp_path)) == [settings[1]]
  assert settings_from_sweeps(config("ewc.lam=100,10"), str(tmp_path)) == [settings[1], settings[0]]
  assert settings_from_sweeps(config("ewc.lam=100,1000"), str(tmp_path)) is None   # 1000 was never run
  single = tmp_path / "single"                    # a one-run program writes a plain record, without 'settings'
  single.mkdir()
  (single / "config.json").write_text(json.dumps(config_dict(config("ewc.lam=1000"))))
  (single / "results.json").write_text(json.dumps({"acc": 0.5, "bwt": -0.25}))
  got = settings_from_sweeps(config("ewc.lam=100,1000"), str(tmp_path))
  assert got[0] == settings[1] and got[1]["overrides"] == {"ewc.lam": 1000.0}
  assert got[1]["acc"]["mean"] == 0.5 and got[1]["bwt"]["mean"] == -0.25
  assert settings_from_sweeps(config("ewc.lam=100", seed=101), str(tmp_path)) is None  # another seed
  assert settings_from_sweeps(config("ewc.lam=100"), str(tmp_path / "missing")) is None


def test_extend_geometric_continues_each_end_at_its_own_ratio():
  from experiments.protocol import extend_geometric
  assert extend_geometric([1e2, 1e3, 1e4], 2) == [1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6]
  assert extend_geometric([0.1, 1.0, 10.0, 100.0], 1) == [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
  assert extend_geometric([0.5, 1.0, 4.0], 1) == [0.25, 0.5, 1.0, 4.0, 16.0]
  assert extend_geometric([1.0, 10.0], 0) == [1.0, 10.0]


def test_refine_climbs_past_the_grid_edge_when_extended(monkeypatch):
  from experiments import protocol
  acc = lambda lam: {1e4: 0.60, 1e5: 0.62, 1e6: 0.65, 1e7: 0.67, 1e8: 0.66}.get(lam, 0.1)
  asked = []

  def fake_select(make, grid, seed, n, workroot, log):
    (key, (v,)), = grid.items()
    asked.append(v)
    return {key: v}, [({key: v}, acc(v))]

  monkeypatch.setattr(protocol, "select_on_validation", fake_select)
  grid = {"ewc.lam": [1e4, 1e5, 1e6]}
  real = fake_select

  def diverging(make, grid, seed, n, workroot, log):        # too strong a penalty blows the loss up
    from cl_jax.errors import DivergenceError
    if grid["ewc.lam"][0] >= 1e8:
      raise DivergenceError("loss exceeds train.divergence_factor")
    return real(make, grid, seed, n, workroot, log)

  monkeypatch.setattr(protocol, "select_on_validation", diverging)
  best, scores = protocol.refine_on_validation(None, grid, {"ewc.lam": 1e6}, 100, 1, "/nowhere", print, extend=3)
  assert best == {"ewc.lam": 1e7} and scores[-1] == ({"ewc.lam": 1e8}, float("-inf"))
  assert protocol.fmt_score(scores[-1][1]) == "diverged" and protocol.fmt_score(0.675) == "67.5"
  monkeypatch.setattr(protocol, "select_on_validation", real)
  asked.clear()
  best, scores = protocol.refine_on_validation(None, grid, {"ewc.lam": 1e6}, 100, 1, "/nowhere", print, extend=3)
  assert best == {"ewc.lam": 1e7}
  assert sorted(asked) == [1e5, 1e6, 1e7, 1e8]                # 1e9 never: 1e8 is already worse than 1e7
  assert [o["ewc.lam"] for o, _ in scores] == [1e5, 1e6, 1e7, 1e8]
  assert protocol.refine_on_validation(None, grid, {"ewc.lam": 1e6}, 100, 1, "/nowhere", print)[0] == {"ewc.lam": 1e6}


def test_only_cached_trains_nothing_and_names_the_missing_run(tmp_path):
  import pytest
  from cl_jax.config import set_overrides
  from cl_jax.kinds import base_config
  from experiments.protocol import NotCached, only_cached, run_cached
  c = base_config()
  set_overrides(c, {"strategy": "ewc", "seed": 7, "train.sweep": "ewc.lam=10"})
  with only_cached(), pytest.raises(NotCached, match="ewc seeds 7"):
    run_cached(c, str(tmp_path), print)
  assert list(tmp_path.iterdir()) == []            # nothing was started or written


def test_a_diverged_run_is_cached_and_raises_again_without_training(tmp_path, monkeypatch):
  import pytest
  import cl_jax
  from cl_jax.config import set_overrides
  from cl_jax.kinds import base_config
  from cl_jax.errors import DivergenceError
  from cl_jax.train.loop import config_dict
  from experiments.protocol import DIVERGED, config_key, run_cached
  c = base_config()
  set_overrides(c, {"strategy": "ewc", "seed": 7, "train.sweep": "ewc.lam=1e9"})
  calls = []

  def diverge(config, workdir, **kw):           # what cl_jax.run leaves behind: the config, then the error
    import json, os
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict(config), f)
    raise DivergenceError("loss 221 exceeds train.divergence_factor")

  monkeypatch.setattr(cl_jax, "run", diverge)
  for _ in range(2):
    with pytest.raises(DivergenceError, match="loss 221"):
      run_cached(c, str(tmp_path), print)
  assert len(calls) == 1                                       # the second call read the cached verdict
  assert (tmp_path / config_key(c) / DIVERGED).exists()


def test_a_row_whose_setting_diverges_on_a_reported_seed_runs_at_the_next_validated_one(monkeypatch):
  import pytest
  from cl_jax.errors import DivergenceError
  from experiments import protocol
  scores = [({"ewc.lam": 1e6}, 0.994), ({"ewc.lam": 1e7}, 0.995), ({"ewc.lam": 1e8}, 0.9951),
            ({"ewc.lam": 1e9}, float("-inf")), ("a note", None)]
  assert protocol.by_score(scores) == [{"ewc.lam": 1e8}, {"ewc.lam": 1e7}, {"ewc.lam": 1e6}]
  asked = []

  def fake_run(lam, workroot, log):              # λ ≥ 1e8 blows up on a reported seed
    asked.append(lam)
    if lam >= 1e8:
      raise DivergenceError(f"loss exceeds train.divergence_factor at lam={lam:g}")
    return {"acc": lam}

  monkeypatch.setattr(protocol, "run_cached", fake_run)
  make = lambda setting: setting["ewc.lam"]
  best = {"ewc.lam": 1e8}
  record, setting, diverged = protocol.run_reported(make, [best] + protocol.by_score(scores), "/nowhere", print)
  assert record == {"acc": 1e7} and setting == {"ewc.lam": 1e7} and diverged == [{"ewc.lam": 1e8}]
  assert asked == [1e8, 1e7]                      # the chosen setting once (not again as a candidate), then the next
  assert protocol.fmt_scores([protocol.diverged_note(d) for d in diverged]) == "lam=1e+08 diverged on a reported seed"
  asked.clear()
  with pytest.raises(DivergenceError, match="lam=1e\\+08"):   # all diverge: the last one's error reaches the caller
    protocol.run_reported(make, [{"ewc.lam": 1e9}, {"ewc.lam": 1e8}, {"ewc.lam": 1e9}], "/nowhere", print)
  assert asked == [1e9, 1e8]


def test_the_papers_digit_grouping_gives_digit_d_the_papers_label():
  """van de Ven & Tolias' data.py relabels digit d as perm[d] (perm drawn right after np.random.seed(seed)) and task
  t holds labels 2t, 2t+1: our class order must put digit d at position perm[d]."""
  import numpy as np

  from experiments.split_mnist_gaps import paper_class_order
  for seed in (1, 7):
    np.random.seed(seed)
    perm = np.random.permutation(list(range(10)))
    order = paper_class_order(seed)
    assert [order.index(d) for d in range(10)] == perm.tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10))
