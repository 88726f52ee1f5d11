"""SFT: chat templates, assistant-only loss masks, packing with segment ids, the masked loss."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax.data.tokenizer import ByteTokenizer
from cl_jax.lm import sft, templates
from cl_jax.models.transformer import build_lm, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [("system", "Be brief."), ("user", "Hi?"), ("assistant", "Yo."), ("user", "Bye"), ("assistant", "Ok")]


def test_plain_template_rendering_and_mask_by_hand():
  tok = ByteTokenizer()
  ids, mask = templates.encode_chat(CHAT, tok)
  b = lambda s: list(s.encode())
  expected = ([257] + b("<|system|>\nBe brief.\n") + b("<|user|>\nHi?\n") + b("<|assistant|>\n") + b("Yo.") + [258]
              + b("<|user|>\nBye\n") + b("<|assistant|>\n") + b("Ok") + [258])
  assert ids.tolist() == expected
  # mask: exactly "Yo." + eos and "Ok" + eos
  trained = [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
  assert trained == b("Yo.") + [258] + b("Ok") + [258]
  first = len([257] + b("<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n"))
  assert mask.tolist().index(1) == first and mask[first:first + 4].tolist() == [1, 1, 1, 1] and mask[first + 4] == 0
  prompt = templates.encode_prompt(CHAT[:3], tok)
  assert prompt.tolist() == ids[:first].tolist()


def test_bad_messages_are_refused():
  with pytest.raises(ValueError, match="role='bot'"):
    templates.encode_chat([("bot", "x")], ByteTokenizer())
  with pytest.raises(ValueError, match="system message may only come first"):
    templates.encode_chat([("user", "x"), ("system", "y")], ByteTokenizer())


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_checkpoint_chat_template_rendered_with_jinja(tmp_path):
  pytest.importorskip("jinja2")
  pytest.importorskip("tokenizers")
  from cl_jax.models import hf_checkpoint
  src = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")
  for f in ("config.json", "tokenizer.json"):
    shutil.copy(os.path.join(src, f), tmp_path / f)
  cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
  cfg["chat_template"] = CHATML
  json.dump(cfg, open(tmp_path / "tokenizer_config.json", "w"))
  tok = hf_checkpoint.load_tokenizer(str(tmp_path), hf_checkpoint.read_config(str(tmp_path)))
  template = templates.template_for(tok, str(tmp_path))
  assert isinstance(template, templates.HFChatTemplate)
  text = template.render([templates.Message(r, c) for r, c in CHAT[1:3]])
  assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nYo.<|im_end|>\n"
  ids, mask = templates.encode_chat(CHAT[1:3], tok, template)
  # The whole text at once, as transformers' apply_chat_template encodes it; targets: the tokens that overlap the
  # answer and its end-of-turn text.
  full = "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nYo.<|im_end|>\n"
  assert ids.tolist() == tok.encode(full).tolist()
  start = len(full) - len("Yo.<|im_end|>\n")
  assert mask.tolist() == [int(end > start) for _, end in tok.encode_with_offsets(full)[1]]
  assert 0 < mask.sum() < len(mask)
  # no template in the directory -> the plain one
  assert isinstance(templates.template_for(tok, os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")),
                    templates.PlainTemplate)


def _examples():
  tok = ByteTokenizer()
  chats = [[("user", "a" * k), ("assistant", "b" * (k + 1))] for k in (3, 10, 5, 2, 30)]
  return tok, [templates.encode_chat(c, tok) for c in chats]


def test_pack_boundaries_segments_and_positions():
  tok, examples = _examples()
  lens = [len(i) for i, _ in examples]
  rows, row_of, stats = sft.pack(examples, 96, tok.pad_id, return_index=True)
  expected_rows, used, r = [], 0, 0
  for n in lens:
    if used + n > 96:
      r, used = r + 1, 0
    expected_rows.append(r)
    used += n
  assert expected_rows == [0, 0, 1, 1, 2]
  assert row_of.tolist() == expected_rows and stats.rows == expected_rows[-1] + 1 and stats.truncated == 0
  for row in range(stats.rows):
    members = [i for i, rr in enumerate(expected_rows) if rr == row]
    at = 0
    for s, i in enumerate(members):
      n = lens[i]
      np.testing.assert_array_equal(rows["tokens"][row, at:at + n], examples[i][0])
      np.testing.assert_array_equal(rows["mask"][row, at:at + n], examples[i][1])
      assert (rows["segment_ids"][row, at:at + n] == s + 1).all()
      np.testing.assert_array_equal(rows["positions"][row, at:at + n], np.arange(n))
      at += n
    assert (rows["segment_ids"][row, at:] == 0).all() and (rows["tokens"][row, at:] == tok.pad_id).all()
    assert (rows["mask"][row, at:] == 0).all()
  batch = sft.sft_batch(rows, task=3)
  assert batch["x"].shape == (stats.rows, 95, 3) and batch["task"].tolist() == [3] * stats.rows
  # a target never belongs to another segment than its input
  seg = rows["segment_ids"]
  assert not (batch["mask"] * (seg[:, 1:] != seg[:, :-1])).any()
  assert batch["mask"].sum() == sum(int(m[1:].sum()) + int(m[0]) for _, m in examples)


def test_packed_masked_loss_equals_mean_assistant_nll_computed_alone():
  """The packed SFT loss == the mean NLL over every assistant token, each example run alone (no packing)."""
  tok, examples = _examples()
  cfg = model_config("tiny", vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2, max_len=96)
  model, params = build_lm(cfg, seed=0)
  rows, stats = sft.pack(examples, 96, tok.pad_id)
  assert stats.rows < len(examples)  # something is actually packed
  loss_fn = jax.jit(lambda p, b: sft.sft_loss(model)(p, b)[0])
  loss = loss_fn(params, jax.tree.map(jnp.asarray, sft.sft_batch(rows)))
  nll, count = 0.0, 0
  forward = jax.jit(model.apply)
  for ids, mask in examples:
    logits = forward(params, jnp.asarray(ids[None, :-1]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
    for t in range(1, len(ids)):
      if mask[t]:
        nll -= float(logp[t - 1, ids[t]])
        count += 1
  assert count == sum(int(m.sum()) for _, m in examples)
  np.testing.assert_allclose(float(loss), nll / count, rtol=2e-5)
  # without the segment mask the packed loss would differ (attention across examples changes the logits)
  rows_noseg = dict(rows, segment_ids=np.where(rows["segment_ids"] > 0, 1, 0))
  b = sft.sft_batch(rows_noseg)
  b["mask"] = sft.sft_batch(rows)["mask"]
  leaky = loss_fn(params, jax.tree.map(jnp.asarray, b))
  assert abs(float(leaky) - float(loss)) > 1e-4


def test_truncation_counted():
  tok, examples = _examples()
  _, stats = sft.pack(examples, 40, tok.pad_id)
  assert stats.truncated == sum(len(i) > 40 for i, _ in examples) > 0
