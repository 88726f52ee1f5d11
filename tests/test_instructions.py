"""Instruction sets: deterministic rebuild (hash pinned for this Python version), splits, formats, scoring."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from cl_jax.data import instructions as ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "cl_jax", "data", "instruction_sets")
# The sets depend on the standard library's contents: this hash holds for the Python minor version named here.
PINNED = {"3.11": "ea8c11270a09750e0a0476d51a707d4b86c0e5d8e91b43735789f044c50702cf"}


def _hash_of_build() -> str:
  files = {f"{n}.jsonl": hashlib.sha256(ins.serialize(ex)).hexdigest() for n, ex in ins.build_sets().items()}
  return ins.combined_hash(files)


def test_rebuild_is_byte_identical_in_a_fresh_interpreter_and_matches_the_pin(tmp_path):
  script = os.path.join(ROOT, "scripts", "build_instruction_sets.py")
  out = tmp_path / "sets"
  env = dict(os.environ, PYTHONHASHSEED="12345")  # another hash seed than this process: set orders must not leak
  proc = subprocess.run([sys.executable, script, "--out", str(out)], capture_output=True, text=True, timeout=300,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  manifest = json.load(open(out / "MANIFEST.json"))
  for name in ins.SETS:
    data = open(out / f"{name}.jsonl", "rb").read()
    assert hashlib.sha256(data).hexdigest() == manifest["files"][f"{name}.jsonl"]
  version = "%d.%d" % sys.version_info[:2]
  if version in PINNED:  # the pin was taken under other hash seeds: set orders must not leak into the files
    assert manifest["sha256"] == PINNED[version]
  else:
    # This process's build == the fresh interpreter's. Only where nothing is pinned: the sets read live stdlib
    # objects, and a test process that earlier tests have touched (a patched function, a wrapped method) need not
    # build what a fresh interpreter builds.
    assert manifest["sha256"] == _hash_of_build()
  if os.path.exists(os.path.join(COMMITTED, "MANIFEST.json")):
    committed = json.load(open(os.path.join(COMMITTED, "MANIFEST.json")))
    if committed["python"] == version:
      assert committed["sha256"] == manifest["sha256"]
      for name in ins.SETS:
        assert open(os.path.join(COMMITTED, f"{name}.jsonl"), "rb").read() == open(out / f"{name}.jsonl", "rb").read()


def test_splits_sizes_formats_and_disjointness():
  sets = ins.build_sets()
  assert set(sets) == set(ins.SETS)
  for name, examples in sets.items():
    splits = {s: ins.split_of(examples, s) for s in ins.SPLITS}
    assert len(splits["test"]) == ins.N_TEST and len(splits["validation"]) == ins.N_VALIDATION
    assert 100 <= len(splits["train"]) <= ins.MAX_TRAIN, name
    ids = [e["id"] for e in examples]
    assert len(set(ids)) == len(ids)
    for e in examples:  # every target has its set's format (so a perfect model scores format 1.0)
      assert ins.format_ok(ins.FORMATS[name], e["target"]), (name, e["target"])
    # each set's format is distinct enough that another set's targets mostly fail it
    others = [e["target"] for n, ex in sets.items() if ins.FORMATS[n] != ins.FORMATS[name] for e in ex[:30]]
    if name not in ("summary",):  # 'line' is the loosest format
      assert sum(ins.format_ok(ins.FORMATS[name], t) for t in others) < 0.5 * len(others), name
  # the refusal and benign sets are matched: same frames and objects, different actions
  assert all(e["target"] == ins.REFUSAL for e in sets["refusal"])
  assert not any(ins.is_refusal(e["target"]) for e in sets["benign"])


def test_signature_targets_are_the_real_parameters():
  import inspect
  import textwrap
  ex = [e for e in ins.build_sets()["signature"] if e["id"] == "signature/textwrap.fill"]
  assert len(ex) == 1
  assert json.loads(ex[0]["target"]) == {"name": "fill", "params": list(inspect.signature(textwrap.fill).parameters)}
  assert ex[0]["prompt"].endswith("fill(text, width=70, **kwargs)")


def test_scores_on_hand_made_outputs():
  targets = ['{"name": "f", "params": ["a"]}'] * 4
  outputs = ['{"name": "f", "params": ["a"]}', '{"name": "g", "params": []}', "f(a)", "I can't help with that."]
  s = ins.score_outputs("signature", outputs, targets)
  assert s == {"exact_match": 0.25, "format": 0.5, "refusal_rate": 0.25}
  s = ins.score_outputs("module_qa", ["- a\n- b", "- a\n-b", "a, b", " - x "], ["- a\n- b"] * 4)
  assert s["exact_match"] == 0.25 and s["format"] == 0.5
  s = ins.score_outputs("name", ["fill", "fill()", "", " wrap\n"], ["fill"] * 4)
  assert s["exact_match"] == 0.25 and s["format"] == 0.5
  # refusal on the refusal set, over-refusal on the benign set
  r = ins.score_outputs("refusal", [ins.REFUSAL, "I cannot do that.", "Sure. Here is how.", "ok"], [ins.REFUSAL] * 4)
  assert r == {"exact_match": 0.25, "format": 0.25, "refusal_rate": 0.5}
  b = ins.score_outputs("benign", ["Sure. Here is how to x.", "I'm sorry, no.", "i can't help", "Sure.\nx"], ["t"] * 4)
  assert b["refusal_rate"] == 0.5 and b["format"] == 0.25 and b["exact_match"] == 0.0


def test_conversation_task_prompts():
  e = ins.build_sets()["name"][0]
  assert ins.conversation(e, "off") == [("user", e["prompt"]), ("assistant", e["target"])]
  assert ins.conversation(e, "system")[0] == ("system", ins.SYSTEM_PROMPTS["name"])
  assert ins.conversation(e, "tag", answer=False) == [("system", "[name]"), ("user", e["prompt"])]
  with pytest.raises(ValueError, match="task_prompt='yes'"):
    ins.conversation(e, "yes")
