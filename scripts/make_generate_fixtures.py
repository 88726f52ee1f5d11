"""Builds tests/fixtures/generate_reference.json: transformers' greedy `generate` on the tiny HF fixtures.

    pip install torch==2.13.0 transformers    # reference-only: never needed by the test suite
    python scripts/make_generate_fixtures.py [--out tests/fixtures/generate_reference.json]

For each family in FAMILIES (tests/fixtures/hf/<family>/, built by scripts/make_hf_fixtures.py) and each prompt
in PROMPTS, it runs `AutoModelForCausalLM.generate` on the prompt alone (batch 1, no padding; float32, CPU):

  free    greedy, max_new_tokens=NEW, stopping only at the checkpoint's eos
  stop    the same with `stop_strings`: for each prompt, the two characters of its free completion's text at 60%
          of its length, all of them for every prompt (so most prompts really stop early, some at an earlier
          occurrence or on another prompt's string, which is the point)
  penalty greedy with repetition_penalty=PENALTY and the same stop strings

and records the prompt's ids (`tokenizer(text, add_special_tokens=False)`) and the new ids of each run. The test
(tests/test_generate.py) decodes the same prompts with cl_jax batched and left-padded into length buckets and
requires the very same ids.
"""
from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("llama", "gpt2")
NEW = 16
PENALTY = 1.3
# Lengths spread over two buckets (16 and 32 tokens under the default buckets) with the fixture tokenizer.
PROMPTS = ("def f(x):", "The quick brown", "return x + 1 for all", "Once upon a time, the lazy dog; def g(y): pass")


def main() -> None:
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "generate_reference.json"))
  args = ap.parse_args()
  torch.manual_seed(0)
  out = {"new": NEW, "penalty": PENALTY, "families": {}}
  for family in FAMILIES:
    path = os.path.join(ROOT, "tests", "fixtures", "hf", family)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()

    def run(ids, **kw):
      x = torch.tensor([ids])
      with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=tok.eos_token_id, **kw)
      return [int(t) for t in y[0, len(ids):]]

    rows = []
    for text in PROMPTS:
      ids = tok(text, add_special_tokens=False)["input_ids"]
      free = run(ids)
      free_text = tok.decode(free, skip_special_tokens=True)
      k = max(0, min(len(free_text) - 2, int(0.6 * len(free_text))))
      rows.append({"text": text, "ids": ids, "free": free, "picked": free_text[k:k + 2] or "\n"})
    # One list of stop strings for every prompt of the family (what a batched call takes): a prompt may stop on
    # another prompt's string.
    stops = sorted({r.pop("picked") for r in rows})
    for r in rows:
      r["stop"] = run(r["ids"], stop_strings=stops, tokenizer=tok)
      r["penalty"] = run(r["ids"], stop_strings=stops, tokenizer=tok, repetition_penalty=PENALTY)
      print(family, repr(r["text"]), len(r["ids"]), "new", len(r["free"]), len(r["stop"]), len(r["penalty"]))
    out["families"][family] = {"stop_strings": stops, "rows": rows}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
