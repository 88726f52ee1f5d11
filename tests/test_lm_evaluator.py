"""The LM evaluator's chunking: a short last chunk is padded to a power of two, not to a whole batch, and the scores
do not depend on how the set was cut."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax import sharding
from cl_jax.data.text import ClozeItems
from cl_jax.eval.evaluator import chunk_rows, make_lm_evaluator


def test_a_short_chunk_is_padded_to_a_power_of_two_on_the_mesh():
  one, eight = sharding.make_mesh(1, 1), type("Mesh", (), {"size": 8})()
  assert [chunk_rows(n, 21, one) for n in (1, 3, 5, 8, 9, 17, 21, 40)] == [1, 4, 8, 8, 16, 21, 21, 21]
  assert [chunk_rows(n, 24, eight) for n in (1, 9, 17, 24)] == [8, 16, 24, 24]


def test_scores_do_not_depend_on_the_batch_size():
  vocab, width = 13, 9
  rng = np.random.default_rng(0)
  params = {"emb": jnp.asarray(rng.normal(size=(vocab, 8)), jnp.float32),
            "out": jnp.asarray(rng.normal(size=(8, vocab)), jnp.float32)}

  def apply(p, tokens):   # a bigram model: enough to give every position its own distribution
    return jnp.tanh(p["emb"][tokens]) @ p["out"]

  tokens = rng.integers(0, vocab, size=(11, width)).astype(np.int32)
  cloze = ClozeItems(context=rng.integers(0, vocab, size=(7, 4)).astype(np.int32),
                     choices=rng.integers(0, vocab, size=(7, 3, 3)).astype(np.int32),
                     choice_mask=np.ones((7, 3, 3), bool), answer=rng.integers(0, 3, size=7))
  mesh = sharding.make_mesh(1, 1)
  results = []
  for batch in (1, 6, 8, 64):
    items = {}
    out = make_lm_evaluator(apply, batch, mesh)(params, {"general": tokens}, cloze, per_item=items)
    results.append((out, items))
  ref_out, ref_items = results[0]
  for out, items in results[1:]:
    for k in ref_out:
      np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-5)
      np.testing.assert_allclose(items[k], ref_items[k], rtol=1e-5, atol=1e-7)
  # the bigram model's mean NLL computed here directly: the evaluator scores what it was given
  logp = jax.nn.log_softmax(apply(params, jnp.asarray(tokens[:, :-1])), -1)
  nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1)[..., 0].mean(-1)
  np.testing.assert_allclose(ref_items["general/perplexity"], nll, rtol=1e-5)
