"""Builds tests/fixtures/lm_eval_reference.json: lm-eval's own `hf` model and transformers' `generate` on the tiny
HF fixtures, the reference the cl_jax engine must reproduce (tests/test_lm_engine.py).

    pip install torch==2.13.0 transformers lm_eval==0.4.13    # reference-only: never needed by the test suite
    python scripts/make_lm_eval_reference.py [--out tests/fixtures/lm_eval_reference.json] [--limit 24]

For each family in FAMILIES (tests/fixtures/hf/<family>/, built by scripts/make_hf_fixtures.py), with
`lm_eval.models.huggingface.HFLM(pretrained=<dir>, dtype=float32, device=cpu)`:

  loglikelihood          HFLM.loglikelihood of LL_REQUESTS: (log-likelihood, is_greedy) per request. They cover an
                         empty context (the prefix token), a context with trailing spaces (moved to the
                         continuation), multi-token continuations and a context longer than the model's positions
                         (left truncation).
  loglikelihood_rolling  HFLM.loglikelihood_rolling of DOCUMENTS, one shorter and two longer than the positions
                         (several disjoint windows).
  generate_until         HFLM.generate_until of GEN_REQUESTS (greedy, batch 1; stop strings, 32 new tokens at most).
  generate_ids           transformers' `model.generate` greedy, 32 new tokens, eos ignored (no eos_token_id), on
                         the ids of GEN_PROMPTS (`tokenizer(text, add_special_tokens=False)`): the decoder's tokens.
  sets                   for every offline benchmark set (`cl_jax.eval.benchmark_sets.BUILTIN`, lm-eval tasks
                         under `benchmark_sets.task_dir()`): lm-eval's evaluation of the first --limit items with
                         the `hf` model (gen_kwargs max_gen_toks=GEN_TOKS): per sample and filter its requests'
                         arguments by their sha1 (`_digest`), the responses (log-likelihoods
                         / generated text), the filtered responses and metrics (acc, acc_norm, exact_match); and
                         the task's aggregate metrics. SKIP names the pairs the `hf` model cannot run.

float32 on CPU throughout: the reference numbers are what lm-eval's `hf` model gives there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("llama", "gpt2")
NEW = 32
GEN_TOKS = 32  # new tokens of the arithmetic set's generations on the tiny fixtures
LONG = ("the cat sat on the mat and then it ran to the door; " * 6).strip()
LL_REQUESTS = [
    ("The quick brown", " fox"),
    ("def f(x):", " return x + 1"),
    ("", "hello world"),
    ("Question: what is 2 + 2? Answer: ", "2"),
    ("a b c ", " d e"),
    ("Once upon a time", ", the lazy dog slept."),
    (LONG, " and the end."),
    ("import os\n", "print(os.path)"),
]
DOCUMENTS = ["short text.", LONG + " " + LONG, "def g(y):\n  return y * 2\n" * 12]
# Greedy requests with the same budget and number of stop strings (one decoding program on the cl_jax side), stop
# strings that do and do not occur, do_sample / temperature spelled in lm-eval's ways.
GEN_REQUESTS = [
    ("Question: Tom has 3 apples. How many?\nAnswer:", {"until": ["\n\n", "Question:"], "max_gen_toks": NEW,
                                                         "do_sample": False}),
    ("def f(x):", {"until": ["e", "zz"], "max_gen_toks": NEW}),
    ("The quick brown", {"until": ["\n", "Question:"], "max_gen_toks": NEW, "do_sample": False, "temperature": 0.0}),
    ("Once upon a time", {"until": ["the", "an"], "max_gen_toks": NEW}),
]
GEN_PROMPTS = ("def f(x):", "The quick brown", "Once upon a time, the lazy dog")


def _digest(arguments) -> str:
  """sha1 of a sample's request arguments [[context, continuation or gen_kwargs], ...] as compact sorted JSON."""
  return hashlib.sha1(json.dumps(arguments, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _instances(kind: str, args: list) -> list:
  from lm_eval.api.instance import Instance
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# (family, set) pairs lm-eval's hf model cannot evaluate: the completion set's endings run to 82 tokens under the
# fixtures' 128-token vocabulary, beyond gpt2's 64 positions (HFLM asserts len(continuation) <= max_length; the
# cl_jax engine refuses such a request with a ConfigError).
SKIP = {("gpt2", "completion"), ("gpt2", "knowledge_cloze")}  # continuations longer than its 64 positions


def _sets(path: str, limit: int) -> dict:
  """lm-eval's evaluation of the offline sets with the `hf` model (module docstring); {} without the sets."""
  try:
    from cl_jax.eval import benchmark_sets
  except ImportError:
    return {}
  import lm_eval
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  model = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=8)
  manager = TaskManager(include_path=benchmark_sets.task_dir())
  out = {}
  for name in benchmark_sets.BUILTIN:
    if (os.path.basename(path), name) in SKIP:
      continue
    task = benchmark_sets.TASK_NAMES[name]
    # The tiny fixtures have 64 / 128 positions: generation gets GEN_TOKS new tokens (lm-eval's default 256 would
    # leave no room for a context), the same override the test passes to `cl-jax lm-eval`.
    res = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                                  gen_kwargs=f"max_gen_toks={GEN_TOKS}", random_seed=0, numpy_random_seed=1234,
                                  fewshot_random_seed=1234)
    samples = []
    for s in res["samples"][task]:
      metrics = {k: s[k] for k in ("acc", "acc_norm", "exact_match") if k in s}
      row = {"doc_id": s["doc_id"], "filter": s["filter"], "resps": s["resps"], "filtered_resps": s["filtered_resps"],
             "metrics": metrics}
      args = [list(a) for a in s["arguments"]]
      # The requests by their digest (kept small): the test rebuilds them with benchmark_sets.requests and checks it.
      row["arguments_sha1"] = _digest(args)
      if isinstance(args[0][1], dict):  # generate_until: the generation kwargs lm-eval passed
        row["gen_kwargs"] = args[0][1]
      samples.append(row)
    aggregate = {k: float(v) for k, v in res["results"][task].items()
                 if isinstance(v, float) and "stderr" not in k}
    out[name] = {"task": task, "limit": limit, "samples": samples, "results": aggregate}
    print(name, aggregate)
  return out


def main() -> None:
  import torch
  from lm_eval.models.huggingface import HFLM
  from transformers import AutoModelForCausalLM, AutoTokenizer
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "lm_eval_reference.json"))
  ap.add_argument("--limit", type=int, default=24, help="items per offline set")
  args = ap.parse_args()
  torch.manual_seed(0)
  out = {"new": NEW, "families": {}}
  for family in FAMILIES:
    path = os.path.join(ROOT, "tests", "fixtures", "hf", family)
    lm = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=4)
    ll = lm.loglikelihood(_instances("loglikelihood", LL_REQUESTS), disable_tqdm=True)
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in DOCUMENTS]),
                                       disable_tqdm=True)
    lm1 = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=1)
    gen = lm1.generate_until(_instances("generate_until", GEN_REQUESTS), disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    ids = []
    for text in GEN_PROMPTS:
      p = tok(text, add_special_tokens=False)["input_ids"]
      x = torch.tensor([p])
      with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)
      ids.append({"text": text, "ids": p, "new": [int(t) for t in y[0, len(p):]]})
    out["families"][family] = {
        "max_length": lm.max_length, "prefix_token_id": lm.prefix_token_id,
        "loglikelihood": [{"context": c, "continuation": x, "logprob": float(v), "greedy": bool(g)}
                          for (c, x), (v, g) in zip(LL_REQUESTS, ll)],
        "loglikelihood_rolling": [{"text": d, "logprob": float(v)} for d, v in zip(DOCUMENTS, rolling)],
        "generate_until": [{"context": c, "gen_kwargs": k, "text": t} for (c, k), t in zip(GEN_REQUESTS, gen)],
        "generate_ids": ids,
        "sets": _sets(path, args.limit),
    }
    print(family, "ll", [round(v, 3) for v, _ in ll], "rolling", [round(v, 2) for v in rolling], "gen", gen)
  with open(args.out, "w") as f:
    json.dump(out, f, separators=(",", ":"))
  print("wrote", args.out)


if __name__ == "__main__":
  main()
