"""Continual instruction tuning: replay fraction, left-padded greedy decoding, config errors, runs end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cl_jax
from cl_jax.lm import cit


def tiny_cit_config(**overrides):
  c = cit.default_config()
  c.cit.tasks = "name,refusal+benign"
  c.cit.steps_per_task = 6
  c.cit.batch_size = 4
  c.cit.eval_examples = 4
  c.cit.max_new_tokens = 8
  c.sft.seq_len = 256
  c.lm.d_model, c.lm.num_layers, c.lm.num_heads = 32, 1, 2
  c.train.log_every_steps = 2
  for k, v in overrides.items():
    section, key = k.split(".") if "." in k else (None, k)
    if section:
      c[section][key] = v
    else:
      c[key] = v
  return c


@pytest.fixture(scope="module")
def data():
  return cit.load_data(tiny_cit_config(**{"cit.tasks": "name,signature,refusal+benign"}))


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2])
def test_replay_fraction_is_realised(data, fraction):
  b, steps = 16, 50
  src = cit.ReplaySource(data, 2, b, fraction, seed=0)
  replayed = 0
  for s in range(steps):
    batch = next(src)
    n_rep = int((batch["task"] < 2).sum())
    assert n_rep == src.replayed_at(s)
    assert (batch["task"][:b - n_rep] == 2).all() and set(batch["task"][b - n_rep:]) <= {0, 1}
    replayed += n_rep
  assert replayed == int(np.floor(steps * b * fraction + 1e-9))  # the realised share is f up to one row
  assert abs(replayed / (steps * b) - fraction) <= 1 / (steps * b)
  assert src.counts["replay_rows"] == replayed and src.counts["rows"] == steps * b
  # both earlier tasks are replayed (uniform over their pooled rows)
  src2 = cit.ReplaySource(data, 2, b, 0.5, seed=0)
  tasks = np.concatenate([next(src2)["task"] for _ in range(20)])
  assert (tasks == 0).sum() > 20 and (tasks == 1).sum() > 20
  # the source resumes by step: the same batch after a restart from its state
  state = src.get_state()
  again = cit.ReplaySource(data, 2, b, fraction, seed=0, state=json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(again)["x"], next(src)["x"])
  # task 1 has nothing earlier to replay
  first = cit.ReplaySource(data, 0, b, fraction, seed=0)
  assert all((next(first)["task"] == 0).all() for _ in range(5))


def test_task_scores_pool_a_tasks_sets_by_examples(data):
  scores = {"name": {"exact_match": 0.5, "format": 1.0}, "signature": {"exact_match": 0.25, "format": 0.75},
            "refusal": {"exact_match": 1.0, "format": 1.0}, "benign": {"exact_match": 0.0, "format": 0.5}}
  data = data._replace(eval_targets={"name": ["a"] * 4, "signature": ["b"] * 4, "refusal": ["c"] * 4,
                                     "benign": ["d"] * 12})
  assert cit.task_scores(data, scores) == [0.5, 0.25, 0.25]  # (4 * 1.0 + 12 * 0.0) / 16
  assert cit.task_scores(data, scores, "format") == [1.0, 0.75, 0.625]


def test_left_padded_greedy_decoding_matches_unpadded_generate(data):
  from cl_jax import sharding
  from cl_jax.models.sampling import generate
  model, params = cit.build_model(tiny_cit_config(), data, sharding.make_mesh(-1, 1))
  toks, valid = data.eval_prompts["name"]
  out = np.asarray(cit.greedy_decode(model, params, jnp.asarray(toks[:2]), jnp.asarray(valid[:2]), max_new_tokens=6,
                                     eos_id=data.tokenizer.eos_id))
  for i in range(2):
    prompt = toks[i][valid[i] == 1][None]
    ref = np.asarray(generate(model, params, jnp.asarray(prompt), jax.random.PRNGKey(0), max_new_tokens=6,
                              temperature=0.0, eos_id=data.tokenizer.eos_id))[0, prompt.shape[1]:]
    np.testing.assert_array_equal(out[i], ref)
  assert valid[:2].sum(1)[0] != valid[:2].sum(1)[1]  # the two prompts really differ in length


@pytest.mark.parametrize("key,value,message", [
    ("cit.tasks", "name,nope", "cit.tasks='name,nope': unknown set"),
    ("cit.tasks", "name,name", "a set appears twice"),
    ("strategy", "ewc", "strategy='ewc'"),
    ("sft.task_prompt", "yes", "sft.task_prompt='yes'"),
    ("cit.replay_fraction", 1.5, "cit.replay_fraction=1.5"),
    ("cit.eval_split", "train", "cit.eval_split='train'"),
    ("strategy", "lora+lora_per_task", "lora and lora_per_task each change the model"),
])
def test_config_errors_name_the_key(key, value, message):
  from cl_jax.kinds import validate
  from cl_jax.errors import ConfigError
  c = tiny_cit_config(**{key: value})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    validate(c)
  c = tiny_cit_config(strategy="replay", **{"cit.replay_fraction": 0.0})
  with pytest.raises(ConfigError, match="cit.replay_fraction=0.0"):
    validate(c)


RUN = {"cit.replay_fraction": 0.25, "sft.task_prompt": "tag"}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
  """Two tasks (name; refusal+benign) through cl_jax.run, uninterrupted."""
  import cl_jax
  return cl_jax.run(tiny_cit_config(strategy="replay", **RUN), str(tmp_path_factory.mktemp("cit") / "w"),
                    progress=False)


def test_two_sets_through_cl_jax_run(whole_run):
  from cl_jax.eval import metrics
  results = whole_run
  tmp_path = results.workdir
  r = results.accuracy_matrix
  assert results.kind == "cit" and r.shape == (3, 2) and ((0 <= r) & (r <= 1)).all()
  assert results.bwt == pytest.approx(metrics.bwt(r)) and results.acc == pytest.approx(metrics.acc(r))
  e = results.extra
  assert set(e["final_sets"]) == {"name", "refusal", "benign"}
  # the matrix's last row is the exact-match rate over each task's sets (4 examples each)
  fs = e["final_sets"]
  assert r[-1, 0] == pytest.approx(fs["name"]["exact_match"])
  assert r[-1, 1] == pytest.approx((fs["refusal"]["exact_match"] + fs["benign"]["exact_match"]) / 2)
  assert e["refusal_rate"] == fs["refusal"]["refusal_rate"] and e["over_refusal_rate"] == fs["benign"]["refusal_rate"]
  # replay only in task 2: 6 steps x 4 rows x 0.25 = 6 of 24 rows
  assert e["replay_share"]["rows"] == pytest.approx(0.25)
  saved = json.load(open(os.path.join(tmp_path, "results.json")))
  assert saved["kind"] == "cit" and np.allclose(saved["accuracy_matrix"], r)
  assert saved["provenance"]["process_count"] == 1 and saved["provenance"]["config_sha256"]  # every kind records it
  train = [m for m in results.metrics("train")]
  assert len(train) == 12 and train[-1]["loss"] < train[0]["loss"]  # SFT on the masked loss learns something
  for name in ("summary.md", "accuracy_matrix.png", "accuracy_curves.png"):
    assert os.path.exists(os.path.join(tmp_path, name))
  assert "| name |" in results.summary() or "ACC" in results.summary()


# A chat template in the style of ChatML whose markup the fixture's 128-token vocabulary spells out in full (its
# BPE has no '<'), so decoded spans can be compared as text.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}|end|\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]\n{% endif %}")


def user_rows(n: int = 12) -> list[dict]:
  """A user's instruction file: prompt / response pairs and multi-turn chats (one with a system turn)."""
  rows = [{"prompt": f"capital of land {c}", "response": f"city {c}."} for c in "abcdefghijklmn"[:n - 2]]
  rows.append({"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello."}, {"role": "user", "content": "bye"},
                            {"role": "assistant", "content": "later."}]})
  rows.append({"messages": [{"role": "user", "content": "one plus one"}, {"role": "assistant", "content": "2"}]})
  return rows


def write_jsonl(path, rows, gz: bool = False) -> str:
  import gzip
  text = "".join(json.dumps(r) + "\n" for r in rows).encode()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(text)
  return str(path)


def test_imported_instruct_checkpoint_with_a_user_set_exports_and_chats(tmp_path, monkeypatch, capsys):
  """An HF checkpoint (the qwen2 fixture, given a ChatML template) continues on a built-in set then the user's own
  JSONL with LoRA: the rows are the template's rendering with the loss on assistant tokens only; hf/ holds the
  final model (adapter folded in), its tokenizer and template, loads back with the run's logits; hf_adapter/ is the
  adapter on the unchanged base; `cl-jax chat` on the workdir answers as the run's own evaluation decoded."""
  pytest.importorskip("jinja2")
  pytest.importorskip("safetensors")
  import io
  import shutil
  from flax import nnx
  from cl_jax import checkpoint, cli
  from cl_jax.lm.templates import HFChatTemplate, encode_chat, encode_prompt, load_chat_template
  from cl_jax.models import hf_checkpoint as hc
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src, ckpt = os.path.join(root, "tests", "fixtures", "hf", "qwen2"), tmp_path / "ckpt"
  shutil.copytree(src, ckpt)
  cfg = json.load(open(ckpt / "tokenizer_config.json"))
  cfg["chat_template"] = TEMPLATE
  json.dump(cfg, open(ckpt / "tokenizer_config.json", "w"))
  faq = write_jsonl(tmp_path / "faq.jsonl", user_rows())
  held = write_jsonl(tmp_path / "faq_eval.jsonl.gz", [{"prompt": "capital of land z", "response": "city z."},
                                                     {"prompt": "capital of land y", "response": "city y."}], gz=True)
  c = tiny_cit_config(strategy="lora", **{"lm.init_from": str(ckpt), "cit.tasks": f"name,file:{faq}:{held}",
                                          "cit.steps_per_task": 2, "cit.eval_examples": 2, "cit.max_new_tokens": 4,
                                          "optim.lr": 3e-2})
  data = cit.load_data(c)
  assert isinstance(data.template, HFChatTemplate) and data.end_text == "|end|"
  assert data.tokenizer.vocab_size == 128 and data.names == ["name", "faq"]
  # The user set's rows: every packed segment is one training conversation as the template renders it, with the
  # loss on its assistant turns (content + |end|\n) only.
  train = [e for e in cit.load_sets(c)["faq"] if e["split"] == "train"]
  assert len(train) == 12 and data.eval_targets["faq"] == ["city z.", "city y."]  # the evaluation file's
  encoded = [encode_chat(e["messages"], data.tokenizer, data.template) for e in train]
  masks = {tuple(i.tolist()): m for i, m in encoded}
  rows, seen = data.rows[1], []
  for r in range(len(rows["tokens"])):
    for seg in range(1, rows["segment_ids"][r].max() + 1):
      at = rows["segment_ids"][r] == seg
      ids = tuple(rows["tokens"][r][at].tolist())
      np.testing.assert_array_equal(rows["mask"][r][at], masks[ids])
      seen.append(ids)
  assert sorted(seen) == sorted(tuple(i.tolist()) for i, _ in encoded)  # each training line once
  multi = next(e for e in train if len(e["messages"]) == 5)
  ids, mask = encode_chat(multi["messages"], data.tokenizer, data.template)
  assert data.tokenizer.decode(ids) == ("[system]\nbe brief.|end|\n[user]\nhi|end|\n[assistant]\nhello.|end|\n"
                                        "[user]\nbye|end|\n[assistant]\nlater.|end|\n")
  assert data.tokenizer.decode(ids[mask == 1]) == "hello.|end|\nlater.|end|\n"

  workdir = tmp_path / "w"
  results = cl_jax.run(c, str(workdir), progress=False, data=data)
  assert results.accuracy_matrix.shape == (3, 2) and set(results.extra["final_sets"]) == {"name", "faq"}
  assert len(results.metrics("train")) == 4
  u = results.extra["user_sets"]["faq"]
  assert u["rows"] == {"train": 12, "heldout": 2} and u["evaluated"] == 2 and u["eval"] == held
  summary = (workdir / "summary.md").read_text()
  assert f"User set `faq`: {faq} (12 training lines" in summary and f"{workdir / 'hf_adapter'}" in summary
  # hf/: the final params with the adapter folded in, its tokenizer and chat template
  assert results.extra["hf_export"] == str(workdir / "hf")
  final = cit.decoding_params(checkpoint.boundary_params(str(workdir)), c)
  exported, base = hc.load(str(workdir / "hf")), hc.load(str(ckpt))
  x = jnp.asarray(data.rows[1]["tokens"][:1, :32])
  logits = jax.jit(lambda p: nnx.merge(exported.model.graphdef, p)(x))
  out = np.asarray(logits(exported.params))
  np.testing.assert_allclose(out, np.asarray(logits(jax.tree.map(jnp.asarray, final))), atol=1e-5)
  assert np.abs(out - np.asarray(logits(base.params))).max() > 1e-3  # the run changed the model
  assert load_chat_template(str(workdir / "hf")).source == TEMPLATE
  chat = [("user", "Hi?"), ("assistant", "Yo.")]
  assert encode_chat(chat, exported.tokenizer, load_chat_template(str(workdir / "hf")))[0].tolist() == \
      encode_chat(chat, data.tokenizer, data.template)[0].tolist()
  # hf_adapter/: PEFT's format on the imported checkpoint, base + (alpha / r) A B = the exported kernels
  assert results.extra["hf_adapter"] == str(workdir / "hf_adapter")
  assert json.load(open(workdir / "hf_adapter" / "adapter_config.json"))["base_model_name_or_path"] == str(ckpt)
  adapter, spec = hc.import_peft_adapter(str(workdir / "hf_adapter"), base.config, base.params)
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                       for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  a, b = flat(base.params), flat(exported.params)
  assert adapter
  for path, layer in adapter.items():
    kernel = a[path + "/kernel"]
    delta = (spec.alpha / spec.rank) * np.asarray(layer["A"]) @ np.asarray(layer["B"])
    np.testing.assert_allclose(b[path + "/kernel"], kernel + delta.reshape(kernel.shape), atol=1e-5)
  # `cl-jax chat --model <workdir>`: the reply to a held-out prompt is the run's own greedy answer to it
  held = [e for e in cit.load_sets(c)["faq"] if e["split"] == "heldout"][0]
  assert held["messages"][0][0] == "user" and len(held["messages"]) == 2
  last = [m for m in results.metrics("eval") if m.get("boundary")][-1]
  monkeypatch.setattr("sys.stdin", io.StringIO(held["messages"][0][1] + "\n"))
  capsys.readouterr()
  assert cli.main(["chat", "--model", str(workdir), "--max_new_tokens", "4"], prog="cl-jax") == 0
  reply = capsys.readouterr().out
  assert reply == last["examples"]["faq"][0] + "\n"
  assert encode_prompt(held["messages"], data.tokenizer, data.template).tolist() == \
      data.eval_prompts["faq"][0][0][data.eval_prompts["faq"][1][0] == 1].tolist()


def test_user_file_split_is_by_content_and_deterministic(tmp_path):
  """`file:TRAIN` alone: ceil(heldout * n) lines held out by the SHA-256 of their content, a duplicate line on the
  same side as its copy; the same lines in another order, or gzipped, give the same split."""
  from cl_jax.data import instructions as ins
  rows = user_rows(14) + [user_rows(14)[3]]  # line 15 repeats line 4
  a = ins.load_user_set(write_jsonl(tmp_path / "a.jsonl", rows), heldout=0.2)
  held = [e for e in a if e["split"] == ins.HELDOUT]
  assert len(a) == 15 and 3 <= len(held) <= 4  # ceil(0.2 * 15) = 3, plus the copy of a held-out line
  side = {}
  for e in a:
    side.setdefault(e["messages"], set()).add(e["split"])
  assert all(len(v) == 1 for v in side.values())  # copies never straddle train and held out
  key = lambda examples: sorted((e["messages"], e["split"]) for e in examples)
  b = ins.load_user_set(write_jsonl(tmp_path / "b.jsonl.gz", rows[::-1], gz=True), heldout=0.2)
  assert key(b) == key(a)
  assert ins.split_of(a, "test") == ins.split_of(a, "validation") == held  # one held-out split serves both
  assert [e["target"] for e in held] == [e["messages"][-1][1] for e in held]
  assert {e["messages"] for e in held} != {e["messages"] for e in ins.load_user_set(  # another fraction, another cut
      write_jsonl(tmp_path / "c.jsonl", rows), heldout=0.5) if e["split"] == ins.HELDOUT}


GOOD = {"prompt": "p", "response": "r"}


@pytest.mark.parametrize("name,lines,message", [
    ("gone.jsonl", None, "gone.jsonl: no such instruction file"),
    ("empty.jsonl", ["", "  "], "empty.jsonl: empty (no conversations)"),
    ("noreply.jsonl", [GOOD, {"messages": [{"role": "user", "content": "hi"}]}], "noreply.jsonl:2: no assistant turn"),
    ("role.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "hi"}]}], "role.jsonl:2: message 0 has role 'bot'"),
    ("last.jsonl", [GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}]}], "last.jsonl:2: the last message is the user's"),
    ("half.jsonl", [GOOD, {"prompt": "hi"}], "half.jsonl:2: has no 'response'"),
    ("json.jsonl", [GOOD, "{not json"], "json.jsonl:2 is not valid JSON"),
    ("notes.txt", [], "notes.txt: an instruction file must be .jsonl / .jsonl.gz / .jsonl.zst"),
    ("name.jsonl", [], "would be named 'name', a built-in set's name"),
])
def test_bad_user_files_are_one_line_naming_file_and_line(tmp_path, name, lines, message):
  """Each bad file is one ConfigError line naming the file (and line), from validation: nothing is written."""
  from cl_jax.errors import ConfigError
  path = tmp_path / name
  if lines is not None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  c = tiny_cit_config(**{"cit.tasks": f"refusal,file:{path}"})
  with pytest.raises(ConfigError) as e:
    cl_jax.run(c, str(tmp_path / "w"), progress=False)
  assert message in str(e.value) and len(str(e.value).splitlines()) == 1
  assert not (tmp_path / "w").exists()


def test_byte_model_run_chats_from_its_workdir(whole_run):
  """A byte-model CIT run is not exported (a notice, recorded) and `generation.load` reads its final checkpoint
  with the plain template: the reply to an evaluated prompt is the run's own greedy answer to it."""
  from cl_jax.data import instructions as ins
  from cl_jax.lm import generation
  e = whole_run.extra
  assert e["hf_export"] is None and "byte model" in e["hf_export_skipped"]
  assert not os.path.exists(os.path.join(whole_run.workdir, "hf"))
  m = generation.load(whole_run.workdir)
  assert m.max_len == e["model"]["max_len"] and m.vocab_size == 259
  example = ins.split_of(ins.load_sets(["name"])["name"], "test")[0]
  reply = generation.chat_reply(m, ins.conversation(example, "tag", answer=False), max_new_tokens=8)
  last = [r for r in whole_run.metrics("eval") if r.get("boundary")][-1]
  assert reply == last["examples"]["name"][0]


def test_preempted_run_resumes_to_the_same_results(whole_run, tmp_path, monkeypatch):
  """SIGTERM mid-task 2 -> Preempted; rerunning resumes (replay source by step, counts via checkpoint meta) and ends
  with the results of the uninterrupted run."""
  from cl_jax.errors import Preempted
  from cl_jax.faults import SIGNAL_ENV
  c = tiny_cit_config(strategy="replay", **RUN)
  data = cit.load_data(c)
  whole = whole_run
  monkeypatch.setenv(SIGNAL_ENV, "8")
  with pytest.raises(Preempted):
    cl_jax.run(c, str(tmp_path / "b"), progress=False, data=data)
  monkeypatch.delenv(SIGNAL_ENV)
  resumed = cl_jax.run(c, str(tmp_path / "b"), progress=False, data=data)
  np.testing.assert_array_equal(resumed.accuracy_matrix, whole.accuracy_matrix)
  assert resumed.extra["final_sets"] == whole.extra["final_sets"]
  assert resumed.extra["replay_share"] == whole.extra["replay_share"]
  loss = lambda r: [(m["step"], m["loss"]) for m in r.metrics("train")]
  assert [s for s, _ in loss(resumed)] == [s for s, _ in loss(whole)]
  np.testing.assert_allclose([v for _, v in loss(resumed)], [v for _, v in loss(whole)], rtol=1e-5)


def with_random_adapters(strategy_name: str, data, num_tasks: int, scale: float, seed: int = 2):
  """(config, model, base params, adapted apply, LoRA params whose every adapter is random at `scale`): adapters
  far from their identity start, so a wrong fold, mask or route shows in the numbers."""
  from cl_jax import sharding
  from cl_jax.strategies import TaskInfo, build_strategy
  c = tiny_cit_config(strategy=strategy_name)
  model, params = cit.build_model(c, data, sharding.make_mesh(-1, 1))
  strategy = build_strategy(strategy_name, c, None)
  apply, lp, _ = strategy.prepare(model, params, TaskInfo(num_tasks, 259, (255,)), jax.random.PRNGKey(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1000))
  lp = {"base": lp["base"], "adapters": jax.tree.map(lambda a: scale * jax.random.normal(next(keys), a.shape),
                                                     lp["adapters"])}
  return c, model, params, apply, lp, strategy


def test_adapters_are_folded_for_decoding(data):
  """decoding_params(base + O-LoRA slots) gives the logits of the adapted model (the sum of all slots)."""
  from cl_jax.lm.sft import sft_batch
  c, model, params, apply, lp, _ = with_random_adapters("olora", data, 2, 0.3)
  x = jnp.asarray(sft_batch({k: v[:2] for k, v in data.rows[0].items()})["x"])
  adapted = apply(lp, x)
  folded = model.apply(cit.decoding_params(lp, c), x)
  assert float(jnp.abs(adapted - model.apply(params, x)).max()) > 1e-3  # the adapters matter
  np.testing.assert_allclose(np.asarray(folded), np.asarray(adapted), atol=2e-4, rtol=2e-4)


def test_lora_per_task_trains_and_applies_only_the_current_slot(data):
  """While task t trains, the model is the base plus slot t alone: the loss equals the plain model with slot t
  folded in, even with the other slots far from zero, and gradients reach slot t only."""
  from cl_jax.losses import next_token_loss
  from cl_jax.lm.sft import packed_apply, sft_batch
  from cl_jax.models import lora
  from cl_jax.strategies import Learner, LossContext
  from cl_jax.strategies.lora_per_task import slot_params
  c, model, _, apply, lp, strategy = with_random_adapters("lora_per_task", data, 3, 0.3)
  batch = sft_batch({k: v[:2] for k, v in data.rows[1].items()}, 1)
  loss_of = lambda apply_fn: next_token_loss(Learner(apply_fn, lambda task, index: None))
  wrapped = strategy.loss(loss_of(apply))
  ctx = LossContext(task_index=jnp.int32(1), strategy_state=None, rng=jax.random.PRNGKey(0))
  (value, _), grads = jax.value_and_grad(wrapped, has_aux=True)(lp, batch, ctx)
  spec = lora.spec_from_config(c.lora)
  alone, _ = loss_of(packed_apply(model))(slot_params(lp, 1, spec), batch, ctx)
  summed, _ = loss_of(apply)(lp, batch, ctx)
  np.testing.assert_allclose(float(value), float(alone), rtol=1e-5)
  assert abs(float(summed) - float(alone)) > 1e-3  # the other slots would have changed the loss
  norm = lambda tree: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))
  assert norm(grads["base"]) == 0.0
  assert norm(grads["adapters"]["task_0"]) == 0.0 and norm(grads["adapters"]["task_2"]) == 0.0
  assert norm(grads["adapters"]["task_1"]) > 0.0


def test_router_sends_prompts_to_their_own_sets_adapter(data):
  """Prompt prototypes route every set to its own task once that task is trained (the sets differ in wording and
  format); before, only trained tasks are chosen; the routed decoding equals decoding with that task's adapter."""
  from cl_jax.models import lora
  from cl_jax.strategies.lora_per_task import slot_params
  routes = cit.route_prompts(data, 2)
  task_of = {s: t for t, task in enumerate(data.tasks) for s in task}
  for s, r in routes.items():
    assert np.mean(r == task_of[s]) >= 0.75, (s, r)
  assert all(set(np.unique(r)) <= {0} for r in cit.route_prompts(data, 0).values())
  assert all(set(np.unique(r)) <= {0, 1} for r in cit.route_prompts(data, 1).values())
  c, model, _, _, lp, _ = with_random_adapters("lora_per_task", data, 3, 0.5, seed=3)
  spec = lora.spec_from_config(c.lora)
  _, routed, acc = cit.evaluate_routed(model, lp, data, 2, spec, 8)
  for t in range(3):
    _, direct = cit.evaluate_sets(model, slot_params(lp, t, spec), data, 8)
    for s in data.tasks[t]:
      hits = routes[s] == t
      assert [o for o, h in zip(routed[s], hits) if h] == [o for o, h in zip(direct[s], hits) if h]
      assert acc[s] == float(np.mean(hits))
  _, direct0 = cit.evaluate_sets(model, slot_params(lp, 0, spec), data, 8)
  _, direct1 = cit.evaluate_sets(model, slot_params(lp, 1, spec), data, 8)
  assert direct0["name"] != direct1["name"]  # the adapters decode differently, so the routing is visible


def test_lora_per_task_is_refused_where_nothing_routes():
  from cl_jax.kinds import base_config, validate
  from cl_jax.errors import ConfigError
  c = base_config()
  c.strategy = "lora_per_task"
  with pytest.raises(ConfigError, match="kind 'classic' cannot run lora_per_task .needs routing"):
    validate(c)


def test_lora_per_task_run_keeps_the_first_sets_answers(tmp_path):
  """Through cl_jax.run: prompts of the first set are routed to its adapter, which later tasks never touch, so its
  decoded answers after the last task are the ones after the first; while the base alone (before training) and
  the trained adapter answer differently."""
  import cl_jax
  r = cl_jax.run(tiny_cit_config(strategy="lora_per_task", **{"cit.steps_per_task": 8, "optim.lr": 3e-2}),
                 str(tmp_path / "w"), progress=False)
  evals = [m for m in r.metrics("eval") if m.get("boundary")]
  assert len(evals) == 3 and r.extra["routing_accuracy"]["name"] == 1.0
  assert r.extra["hf_export_skipped"].startswith("lora_per_task keeps one adapter per task")  # no single model
  assert evals[1]["examples"]["name"] == evals[2]["examples"]["name"]
  assert evals[0]["examples"]["name"] != evals[1]["examples"]["name"]
  assert r.accuracy_matrix[2][0] == r.accuracy_matrix[1][0] and r.bwt == 0.0
