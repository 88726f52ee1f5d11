"""Builds the chat-template and PEFT fixtures of tests/test_hf_templates.py and tests/test_peft.py.

    pip install torch transformers peft     # reference-only: never needed by the test suite
    python scripts/make_peft_fixtures.py [--out tests/fixtures] [--check]

Writes, from the tiny checkpoints of scripts/make_hf_fixtures.py (tests/fixtures/hf/):

  chat/<name>/     tokenizer.json + tokenizer_config.json (+ chat_template.jinja), saved by transformers'
                   `save_pretrained`, and reference.json: for a few conversations, the text and the ids
                   `AutoTokenizer.from_pretrained(dir).apply_chat_template` gives. Three templates, all on the
                   qwen2 fixture's BPE with the template's control tokens added:
                     chatml   Qwen-style ChatML with a default system message and a tools block (`tojson`);
                              stored in chat_template.jinja (the transformers >= 5 layout)
                     llama3   Llama-3-style headers, `bos_token`, `strftime_now` / `date_string`, `trim`; stored
                              in tokenizer_config.json["chat_template"] (the older layout); its tokenizer's
                              post-processor prepends <|begin_of_text|>, so encoding the rendered text with
                              special tokens added would double it
                     inst     Llama-2 / Mistral-style [INST] turns: the system message folded into the first user
                              turn, `bos_token` / `eos_token`, `raise_exception` on roles that do not alternate;
                              stored in chat_template.jinja
  spm/llama/       a SentencePiece BPE tokenizer.model (byte fallback; no tokenizer.json) + tokenizer_config.json
                   with the inst template, and reference.json: transformers' LlamaTokenizer ids of a few texts
                   and of one chat (`build_spm`)
  peft/qwen2_lora/ adapter_config.json + adapter_model.safetensors, a LoRA adapter saved by `peft` on the qwen2
                   fixture (q/k/v/o/gate/up/down; a rank_pattern and an alpha_pattern, so per-module scales
                   differ; random A and B), and reference.npz: tokens [2, T] and the PeftModel's logits [2, T, V].

`--check` runs the other direction with cl_jax (after building): cl_jax imports the PEFT adapter (max |logit|
difference against peft's), exports a LoRA adapter and an O-LoRA pair in PEFT's layout which `PeftModel.from_pretrained`
loads on the exported base (max difference against cl_jax's logits), and transformers renders the exported chat
templates (ids equal to the fixture's).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")

CHATML = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are a helpful assistant.{%- endif %}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' }}{{- tool | tojson }}
{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (tools and message['role'] == 'system') %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

INST = """{% if messages[0]['role'] == 'system' %}
{% set loop_messages = messages[1:] %}
{% set system_message = messages[0]['content'] %}
{% else %}
{% set loop_messages = messages %}
{% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if loop.index0 == 0 and system_message != false %}
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
{% else %}
{% set content = message['content'] %}
{% endif %}
{% if message['role'] == 'user' %}
{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
{% elif message['role'] == 'assistant' %}
{{ ' ' + content.strip() + ' ' + eos_token }}
{% endif %}
{% endfor %}
"""

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
TURNS = [{"role": "user", "content": "What does the quick brown fox do?"},
         {"role": "assistant", "content": "It jumps over the lazy dog."},
         {"role": "user", "content": "def f(x): return x + 1 -- what is f(1)?"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up <in> a dictionary",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]

# name -> (template, where it is stored, control tokens added to the BPE, special-token strings, cases)
# A case: (messages, add_generation_prompt, extra template variables).
TEMPLATES = {
    "chatml": (CHATML, "jinja", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
               dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"),
               [([SYSTEM, *TURNS], True, {}), (TURNS[:2], False, {}), (TURNS[:1], True, {}),
                ([SYSTEM, *TURNS[:1]], True, {"tools": TOOLS})]),
    "llama3": (LLAMA3, "config", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>"),
               [([SYSTEM, *TURNS], True, {"date_string": "26 Jul 2024"}),
                (TURNS[:2], False, {"date_string": "26 Jul 2024"}),
                (TURNS[:1], True, {"date_string": "01 Jan 2025"})]),
    "inst": (INST, "jinja", [], dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
             [([SYSTEM, *TURNS], False, {}), (TURNS, False, {}), (TURNS[:2], False, {})]),
}


def build_chat(out: str) -> None:
  import transformers as tf
  from tokenizers import Tokenizer, processors
  for name, (template, where, added, specials, cases) in TEMPLATES.items():
    tok = Tokenizer.from_file(os.path.join(BASE, "tokenizer.json"))
    tok.add_special_tokens(added)
    if name == "llama3":  # as Llama 3's tokenizer.json: a post-processor that prepends the bos token
      bos = "<|begin_of_text|>"
      tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                         special_tokens=[(bos, tok.token_to_id(bos))])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in specials.items() if v})
    fast.chat_template = template
    directory = os.path.join(out, "chat", name)
    shutil.rmtree(directory, ignore_errors=True)
    fast.save_pretrained(directory, save_jinja_files=where == "jinja")
    reloaded = tf.AutoTokenizer.from_pretrained(directory)  # what a user of the fixture gets
    refs = []
    for messages, gen, extra in cases:
      text = reloaded.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **extra)
      ids = reloaded.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False,
                                         **extra)
      refs.append({"messages": messages, "add_generation_prompt": gen, "variables": extra, "text": text,
                   "ids": [int(i) for i in ids]})
    with open(os.path.join(directory, "reference.json"), "w") as f:
      json.dump({"cases": refs}, f, indent=1, ensure_ascii=False)
    files = sorted(os.listdir(directory))
    print(f"chat/{name}: {files}; {len(refs)} cases, ids {[len(r['ids']) for r in refs]}")


SPM_TEXTS = ["The quick brown fox  jumps over the lazy dog; def f(x): return x + 1",
             "h\u00e9llo w\u00f6rld \U0001F642 <s>[INST] hi [/INST]", "  leading spaces\nand\ttabs <|tool|> end</s>", "x"]


def build_spm(out: str) -> None:
  """spm/llama/: a SentencePiece BPE model (byte fallback, identity normalization, a user-defined <|tool|>: the
  Llama 2 recipe) with no tokenizer.json, the inst template in tokenizer_config.json, and reference.json: the ids
  and decodings transformers' LlamaTokenizer (converted from tokenizer.model) gives, and one chat's ids."""
  import sentencepiece as spm
  import transformers as tf
  from pydoc_data.topics import topics
  directory = os.path.join(out, "spm", "llama")
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([topics[k] for k in sorted(topics)[:40]]), model_prefix=os.path.join(directory, "tokenizer"),
      vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=0.98, user_defined_symbols=["<|tool|>"],
      unk_id=0, bos_id=1, eos_id=2, normalization_rule_name="identity", minloglevel=2)
  os.remove(os.path.join(directory, "tokenizer.vocab"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "legacy": False, "chat_template": INST}, f, indent=2)
  tok = tf.AutoTokenizer.from_pretrained(directory)
  assert type(tok).__name__ == "LlamaTokenizer", type(tok)
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in SPM_TEXTS]
  chat = tok.apply_chat_template([SYSTEM, *TURNS], tokenize=True, return_dict=False)
  with open(os.path.join(directory, "reference.json"), "w") as f:
    json.dump({"texts": SPM_TEXTS, "ids": ids, "decoded": [tok.decode(i) for i in ids],
               "chat": {"messages": [SYSTEM, *TURNS], "ids": list(chat)}}, f, indent=1, ensure_ascii=False)
  print(f"spm/llama: {sorted(os.listdir(directory))}; ids {[len(i) for i in ids]}, chat {len(chat)}")


def peft_config():
  import peft
  return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0})


def build_peft(out: str) -> None:
  import peft
  import torch
  import transformers as tf
  torch.manual_seed(0)
  base = tf.AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager", dtype=torch.float32).eval()
  model = peft.get_peft_model(base, peft_config()).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # A and B large enough that a mis-mapped or mis-scaled one moves the logits
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  directory = os.path.join(out, "peft", "qwen2_lora")
  shutil.rmtree(directory, ignore_errors=True)
  model.save_pretrained(directory)
  os.remove(os.path.join(directory, "README.md"))
  cfg_path = os.path.join(directory, "adapter_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["base_model_name_or_path"] = "tests/fixtures/hf/qwen2"  # not this machine's absolute path
  cfg["target_modules"] = sorted(cfg["target_modules"])  # peft writes a set: a fixed order keeps the file stable
  with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  ref = np.load(os.path.join(BASE, "reference.npz"))
  tokens = ref["tokens"]
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  np.savez(os.path.join(directory, "reference.npz"), tokens=tokens, logits=logits)
  change = np.abs(logits - ref["logits"]).max()
  print(f"peft/qwen2_lora: {sorted(os.listdir(directory))}; max |adapted - base logits| = {change:.2f}")


# ----------------------------------------------------------------------------------------------- --check

def _peft_logits(base_dir: str, adapter_dir: str, tokens) -> np.ndarray:
  import peft
  import torch
  import transformers as tf
  base = tf.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32).eval()
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()


def check(out: str) -> None:
  import jax
  import jax.numpy as jnp
  from cl_jax.lm import templates
  from cl_jax.models import hf_checkpoint, lora
  loaded = hf_checkpoint.load(BASE)
  directory = os.path.join(out, "peft", "qwen2_lora")
  ref = np.load(os.path.join(directory, "reference.npz"))
  adapter, spec = hf_checkpoint.import_peft_adapter(directory, loaded.config, loaded.params)
  lm = lora.LoraModel(loaded.model, spec)
  params = lora.lora_params(loaded.params, {"peft": adapter})
  ours = np.asarray(lm.apply(params, jnp.asarray(ref["tokens"]), adapter="peft"))
  print(f"peft -> cl_jax: max |cl_jax - peft logits| = {np.abs(ours - ref['logits']).max():.2e} "
        f"(logits up to {np.abs(ref['logits']).max():.1f})")
  # cl_jax -> peft: a LoRA adapter (all-linear, random A and B) and an O-LoRA pair summed, on the exported base.
  spec = lora.LoraSpec(targets="all-linear", rank=3, alpha=6.0)
  lm = lora.LoraModel(loaded.model, spec)
  params = lora.lora_params(loaded.params)
  for k, name in enumerate(("task_0", "task_1")):
    params = lm.add_adapter(params, name, jax.random.key(k))
    params["adapters"][name] = jax.tree.map(
        lambda x, k=k: 0.3 * jax.random.normal(jax.random.key(10 + k), x.shape), params["adapters"][name])
  # task_2 adapts the query projections only: summed with task_0, those modules have rank 6 and the rest 3, so
  # the export needs a rank_pattern.
  q_only = lora.LoraSpec(targets=("block_*/attn/q",), rank=3, alpha=6.0)
  params = lora.LoraModel(loaded.model, q_only).add_adapter(params, "task_2", jax.random.key(2))
  params["adapters"]["task_2"] = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(12), x.shape),
                                              params["adapters"]["task_2"])
  for names in (("task_0",), ("task_0", "task_1"), ("task_0", "task_2")):
    ours = np.asarray(lm.apply(params, jnp.asarray(ref["tokens"]), adapter=names))
    with tempfile.TemporaryDirectory() as tmp:
      base_dir, adapter_dir = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
      hf_checkpoint.export(base_dir, loaded.hf_config, params["base"], tokenizer=loaded.tokenizer)
      hf_checkpoint.export_peft_adapter(adapter_dir, params, names, spec, loaded.hf_config, base_model=base_dir)
      theirs = _peft_logits(base_dir, adapter_dir, ref["tokens"])
      pattern = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["rank_pattern"]
    print(f"cl_jax {'+'.join(names)} -> peft: max |peft - cl_jax logits| = {np.abs(theirs - ours).max():.2e}"
          f" (rank_pattern {pattern})")
  # Chat templates: cl_jax reads each fixture, exports it with the qwen2 weights; transformers reads the export's
  # template from chat_template.jinja, and (the file removed) from tokenizer_config.json, as older versions do.
  # The ids come from PreTrainedTokenizerFast (tokenizer.json as written): AutoTokenizer would pick Qwen2Tokenizer
  # from config.json, which rebuilds a byte-level pipeline the fixture's small Metaspace BPE does not have.
  import transformers as tf
  for name in TEMPLATES:
    src = os.path.join(out, "chat", name)
    cases = json.load(open(os.path.join(src, "reference.json")))["cases"]
    tok = hf_checkpoint.load_tokenizer(src)
    template = templates.load_chat_template(src)
    with tempfile.TemporaryDirectory() as tmp:
      hf_checkpoint.export(tmp, loaded.hf_config, loaded.params, tokenizer=tok, chat_template=template)
      files = sorted(os.listdir(tmp))
      same, total = 0, 0
      for where in ("chat_template.jinja", "tokenizer_config.json"):
        exported = tf.PreTrainedTokenizerFast.from_pretrained(tmp)
        auto = tf.AutoTokenizer.from_pretrained(tmp)
        for case in cases:
          kwargs = dict(add_generation_prompt=case["add_generation_prompt"], **case["variables"])
          ids = exported.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kwargs)
          text = auto.apply_chat_template(case["messages"], tokenize=False, **kwargs)
          ours = templates.encode_chat(case["messages"], tok, template.with_variables(**case["variables"]),
                                       add_generation_prompt=case["add_generation_prompt"])[0]
          same += list(ids) == case["ids"] == [int(i) for i in ours] and text == case["text"]
          total += 1
        if where == "chat_template.jinja":
          os.remove(os.path.join(tmp, where))
    print(f"chat/{name}: exported {files}; transformers on the export (template read from chat_template.jinja, "
          f"then from tokenizer_config.json) == fixture == cl_jax for {same}/{total} renderings")


def check_spm(out: str) -> None:
  """cl_jax's conversion of the SentencePiece fixture == transformers' ids; its export (tokenizer.json written,
  tokenizer.model copied) read back by transformers gives the same ids."""
  import transformers as tf
  from cl_jax.lm import templates
  from cl_jax.models import hf_checkpoint
  src = os.path.join(out, "spm", "llama")
  ref = json.load(open(os.path.join(src, "reference.json")))
  tok = hf_checkpoint.load_tokenizer(src)
  same = sum(tok.encode(t).tolist() == i for t, i in zip(ref["texts"], ref["ids"]))
  chat = templates.encode_chat(ref["chat"]["messages"], tok, templates.load_chat_template(src))[0].tolist()
  with tempfile.TemporaryDirectory() as tmp:
    hf_checkpoint.write_tokenizer(tmp, tok)
    exported = tf.PreTrainedTokenizerFast.from_pretrained(tmp)
    again = sum(exported(t, add_special_tokens=False)["input_ids"] == i for t, i in zip(ref["texts"], ref["ids"]))
    files = sorted(os.listdir(tmp))
  print(f"spm/llama: cl_jax == transformers on {same}/{len(ref['texts'])} texts, chat ids equal: "
        f"{chat == ref['chat']['ids']}; export {files} read by transformers: {again}/{len(ref['texts'])}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
  parser.add_argument("--check", action="store_true", help="also check cl_jax against peft / transformers")
  parser.add_argument("--skip-build", action="store_true", help="only check the existing fixtures")
  args = parser.parse_args()
  if not args.skip_build:
    build_chat(args.out)
    build_spm(args.out)
    build_peft(args.out)
  if args.check:
    check_spm(args.out)
    check(args.out)


if __name__ == "__main__":
  main()
