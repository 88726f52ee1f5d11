"""Chat templates of Hugging Face checkpoints: read where transformers reads them, rendered and encoded to the ids
transformers' `apply_chat_template` gives, written back on export (issue 22 item 1).

The references (tests/fixtures/chat/<name>/reference.json) were produced by transformers 5 with
scripts/make_peft_fixtures.py: `chatml` stores its template in chat_template.jinja, `llama3` in
tokenizer_config.json (and its tokenizer's post-processor prepends a bos, so encoding with special tokens would
double it), `inst` folds the system message into the first [INST] turn and raises on non-alternating roles.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("jinja2")
pytest.importorskip("tokenizers")

from cl_jax.errors import ConfigError  # noqa: E402
from cl_jax.lm import templates  # noqa: E402
from cl_jax.models import hf_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = os.path.join(ROOT, "tests", "fixtures", "chat")
QWEN2 = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")
NAMES = ("chatml", "llama3", "inst")


def _fixture(name):
  d = os.path.join(CHAT, name)
  with open(os.path.join(d, "reference.json")) as f:
    cases = json.load(f)["cases"]
  return d, hf_checkpoint.load_tokenizer(d), templates.load_chat_template(d), cases


@pytest.mark.parametrize("name", NAMES)
def test_rendering_and_ids_equal_transformers(name):
  d, tok, template, cases = _fixture(name)
  assert isinstance(template, templates.HFChatTemplate)
  for case in cases:
    t = template.with_variables(**case["variables"])
    gen = case["add_generation_prompt"]
    assert t.render(templates.as_messages(case["messages"]), gen) == case["text"]
    ids, mask = templates.encode_chat(case["messages"], tok, t, add_generation_prompt=gen)
    assert ids.tolist() == case["ids"]
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    if gen:  # a prompt: what greedy decoding continues, the same ids
      assert templates.encode_prompt(case["messages"], tok, t).tolist() == case["ids"]


def test_template_sources_jinja_first_then_tokenizer_config(tmp_path):
  for name, expected in (("chatml", "chat_template.jinja"), ("llama3", "tokenizer_config.json"),
                         ("inst", "chat_template.jinja")):
    source, file = templates.chat_template_source(os.path.join(CHAT, name))
    assert os.path.basename(file) == expected and "messages" in source
  # Both present: chat_template.jinja wins (as in transformers >= 5); a list of named templates: 'default'.
  shutil.copytree(os.path.join(CHAT, "llama3"), tmp_path / "both")
  (tmp_path / "both" / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
  assert templates.load_chat_template(str(tmp_path / "both")).render([templates.Message("user", "x")]) == "Jx"
  os.remove(tmp_path / "both" / "chat_template.jinja")
  cfg = json.loads((tmp_path / "both" / "tokenizer_config.json").read_text())
  cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
  (tmp_path / "both" / "tokenizer_config.json").write_text(json.dumps(cfg))
  assert templates.load_chat_template(str(tmp_path / "both")).render([]) == "D<|begin_of_text|>"


def test_assistant_mask_covers_the_answer_and_its_end_of_turn():
  _, tok, template, cases = _fixture("chatml")
  ids, mask = templates.encode_chat(cases[1]["messages"], tok, template)  # user, assistant
  first = int(np.argmax(mask))
  assert mask[first:].all() and not mask[:first].any()  # one span, to the end of the conversation
  answer = tok._tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
  assert answer.startswith("It jumps over the la") and "<|im_end|>" in answer
  header = tok._tok.decode(ids[:first].tolist(), skip_special_tokens=False)
  assert header.endswith("<|im_start|> assistant\n")
  # llama3: the trained text is the answer and <|eot_id|>; the bos and headers are not targets
  _, tok, template, cases = _fixture("llama3")
  ids, mask = templates.encode_chat(cases[1]["messages"], tok, template.with_variables(date_string="x"))
  eot = tok.token_id("<|eot_id|>")
  assert ids[0] == tok.token_id("<|begin_of_text|>") and ids[1] != ids[0] and mask[0] == 0
  assert ids[mask == 1][-1] == eot and int(mask.sum()) < len(ids) // 2


def test_template_refusals_and_globals():
  _, tok, template, _ = _fixture("inst")
  with pytest.raises(templates.ChatTemplateError, match="roles must alternate"):
    templates.encode_chat([("user", "a"), ("user", "b")], tok, template)
  _, tok, template, _ = _fixture("llama3")  # no date_string given: strftime_now supplies today's
  text = template.render([templates.Message("user", "hi")], True)
  assert f"Today Date: {datetime.datetime.now().strftime('%d %b %Y')}\n" in text
  tojson = templates.HFChatTemplate("{{ messages[0]['content'] | tojson }}{{ x | tojson(indent=1) }}")
  assert tojson.render([templates.Message("user", "<a & b>")], x={"k": [1]}) == '"<a & b>"{\n "k": [\n  1\n ]\n}'
  with pytest.raises(templates.ChatTemplateError, match="does not compile"):
    templates.HFChatTemplate("{% for m in messages %}")


def test_no_template_gives_a_one_line_notice(capsys):
  tok = hf_checkpoint.load_tokenizer(QWEN2, hf_checkpoint.read_config(QWEN2))
  assert isinstance(templates.template_for(tok, QWEN2), templates.PlainTemplate)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and QWEN2 in err[0] and "no chat template" in err[0]


@pytest.mark.parametrize("explicit", [True, False])
def test_export_writes_the_template_in_both_places(tmp_path, explicit):
  src, tok, template, cases = _fixture("chatml")
  loaded = hf_checkpoint.load(QWEN2, tokenizer=False)
  out = str(tmp_path / "hf")
  files = hf_checkpoint.export(out, loaded.hf_config, loaded.params, tokenizer=tok,
                               chat_template=template if explicit else None)
  assert {"chat_template.jinja", "tokenizer_config.json", "tokenizer.json"} <= set(files)
  source = open(os.path.join(src, "chat_template.jinja")).read()
  assert open(os.path.join(out, "chat_template.jinja")).read() == source
  assert json.load(open(os.path.join(out, "tokenizer_config.json")))["chat_template"] == source
  back = templates.load_chat_template(out)
  assert back.special_tokens == template.special_tokens
  assert templates.encode_chat(cases[0]["messages"], hf_checkpoint.load_tokenizer(out), back,
                               add_generation_prompt=True)[0].tolist() == cases[0]["ids"]
  os.remove(os.path.join(out, "chat_template.jinja"))  # an older reader: tokenizer_config.json alone
  assert templates.load_chat_template(out).source == source


def test_document_separator_is_end_of_text_not_end_of_turn():
  d = os.path.join(CHAT, "chatml")
  # An instruct config.json names the chat end-of-turn token as eos (Qwen2.5-Instruct: <|im_end|>).
  tok = hf_checkpoint.load_tokenizer(d, {"eos_token_id": 129})
  assert tok.eos_id == tok.token_id("<|im_end|>") == 129
  assert tok.separator_id == tok.token_id("<|endoftext|>") != tok.eos_id
  tok = hf_checkpoint.load_tokenizer(d, {"eos_token_id": 129}, separator="<|im_end|>")
  assert tok.separator_id == 129
  with pytest.raises(Exception, match="no such token"):
    hf_checkpoint.load_tokenizer(d, separator="<|nope|>")


def test_doc_separator_key_packs_documents_with_the_chosen_token(tmp_path):
  """`lm.doc_separator`: '' packs with the end-of-text token, a token string with that token; an unknown one is
  refused at validation (ConfigError naming the key)."""
  import ml_collections

  from cl_jax.data import text as textdata
  from cl_jax.errors import ConfigError
  from cl_jax.lm.data import run_tokenizer
  ckpt = tmp_path / "ckpt"
  shutil.copytree(QWEN2, ckpt)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(CHAT, "chatml", f), ckpt / f)
  c = ml_collections.ConfigDict({"lm": {"init_from": str(ckpt), "doc_separator": "", "tokenizer": "byte"}})
  cfg = json.load(open(ckpt / "config.json"))
  json.dump({**cfg, "eos_token_id": 129}, open(ckpt / "config.json", "w"))  # an instruct model: eos = <|im_end|>
  docs = [np.asarray([5, 6], np.int32), np.asarray([7], np.int32)]
  tok = run_tokenizer(c)
  assert textdata.pack(docs, 5, tok.separator_id).tokens.tolist() == [[5, 6, 130, 7, 130]]
  for k in range(6):
    (tmp_path / f"doc{k}.txt").write_text(f"the quick brown fox {k} " * 3)
  packed = textdata.load_domain(f"files:{tmp_path}/doc*.txt", tok, 8, validation=0.0, test=0.0).splits["train"]
  assert (packed.tokens == 130).sum() >= 4 and not (packed.tokens == 129).any()
  c.lm.doc_separator = "<|im_end|>"
  assert run_tokenizer(c).separator_id == 129
  c.lm.doc_separator = "<|nope|>"
  with pytest.raises(ConfigError, match=r"lm.doc_separator='<\|nope\|>'"):
    run_tokenizer(c)
  c.lm.init_from = ""
  with pytest.raises(ConfigError, match="byte tokenizer has no named tokens"):
    run_tokenizer(c)


def test_sentencepiece_checkpoint_tokenizer_equals_transformers(tmp_path):
  """A checkpoint with tokenizer.model and no tokenizer.json (Llama 2's layout) loads, converted without the
  sentencepiece / protobuf packages, to transformers' LlamaTokenizer ids; its template renders on it; the export
  writes tokenizer.json beside the model file."""
  src = os.path.join(ROOT, "tests", "fixtures", "spm", "llama")
  with open(os.path.join(src, "reference.json")) as f:
    ref = json.load(f)
  tok = hf_checkpoint.load_tokenizer(src)
  for text, ids, decoded in zip(ref["texts"], ref["ids"], ref["decoded"]):
    assert tok.encode(text).tolist() == ids
    assert tok._tok.decode(ids, skip_special_tokens=False) == decoded
  assert any(i > 3 and i < 3 + 256 for i in ref["ids"][1])  # byte-fallback pieces occur (the emoji)
  assert (tok.bos_id, tok.eos_id, tok.separator_id) == (1, 2, 2)
  template = templates.template_for(tok, src)
  assert templates.encode_chat(ref["chat"]["messages"], tok, template)[0].tolist() == ref["chat"]["ids"]
  files = hf_checkpoint.write_tokenizer(str(tmp_path), tok)
  assert {"tokenizer.json", "tokenizer.model", "chat_template.jinja"} <= set(files)
  back = hf_checkpoint.load_tokenizer(str(tmp_path))
  assert back.path.endswith("tokenizer.json") and back.encode(ref["texts"][1]).tolist() == ref["ids"][1]
  with open(tmp_path / "tokenizer.model", "wb") as f:
    f.write(b"\x0a\x09trunc")  # a piece field longer than the file
  os.remove(tmp_path / "tokenizer.json")
  with pytest.raises(ConfigError, match="not a SentencePiece model"):
    hf_checkpoint.load_tokenizer(str(tmp_path))
