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
