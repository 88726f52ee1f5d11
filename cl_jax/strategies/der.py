"""Dark experience replay, DER and DER++ (Buzzega et al. 2020, "Dark Experience for General Continual Learning").

A reservoir buffer (Vitter's Algorithm R over the whole stream, `buffer.reservoir_add`) is filled during training:
every step offers the current batch's examples together with the logits z the network gave them in that step's
forward pass (before the update). Each step then adds to the task loss

  DER:    α · mean_{(x', z') ~ M} ‖f(x') − z'‖²                     (logit matching: "dark knowledge")
  DER++:  α · mean_{(x', z') ~ M} ‖f(x') − z'‖² + β · mean_{(x'', y'') ~ M} CE(f(x''), y'')

with two independent uniform draws of `der.batch_size` from the buffer (x', x''), each *without* replacement as the
reference code draws (mammoth's `Buffer.get_data`: min(batch, stored) distinct examples; `der.replacement=True`
draws with replacement instead). ‖·‖² is averaged over the logits as well as the examples (the mean squared error
of the reference implementation, so α there is α here). Logits are the model's raw outputs for the example's own
task (every class, no logit mask: the paper stores the whole response); the CE term uses the logit mask of the
current task, as the task loss does. Both terms are 0 while the buffer is empty.

The reference code's class-IL protocol trains every output unit from the first task on (no mask of the classes not
seen yet: `scenario.mask_unseen=False`), so a stored z holds strongly negative logits for the classes still to come
and the matching term keeps them low for old examples; under this codebase's default mask those logits were never
trained when z was stored. At the paper's Split MNIST protocol DER with 200 examples scores 84.5 unmasked (paper:
84.55) and 76.1 masked (results/der_protocol.md).

State: the rehearsal strategies' one `buffer.Buffer`, with the stored logits as its extra field 'logits'
[capacity, C] (C: the model's outputs), of static shape, sharded along its slots. On a language model (continual
pre-training) an example is a token row, its labels the next tokens and its stored response the next-token logits
[L, V]: the buffer holds capacity x L x V floats (500 x 127 x 256 x 4 bytes = 65 MB for the byte-level model; a
32k vocabulary needs ~128x that, so keep `der.capacity` small there), and DER++'s CE is the mean next-token CE.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.losses import cross_entropy, token_cross_entropy
from cl_jax.strategies import buffer as buffer_lib
from cl_jax.strategies.base import LossContext, StepInfo, Strategy

_LOGIT_STREAM, _LABEL_STREAM = 0xDE41, 0xDE42


def default_config() -> ml_collections.ConfigDict:
  """The `der` config section (strategies 'der' and 'derpp')."""
  return ml_collections.ConfigDict(dict(
      capacity=500,      # buffer slots (examples)
      batch_size=32,     # examples drawn from the buffer for each term, each step
      alpha=0.3,         # α: weight of the logit-matching term
      beta=0.5,          # β: weight of the buffer cross-entropy term (DER++ only)
      replacement=False,  # draw the buffer batch with replacement (False: distinct examples, the reference code's)
  ))


def check_config(config) -> None:
  """Raises ValueError naming the bad `der.*` key."""
  dc = config.der
  capacity, batch_size, alpha, beta = int(dc.capacity), int(dc.batch_size), float(dc.alpha), float(dc.beta)
  if capacity < 1:
    raise ValueError(f"der.capacity={capacity}: expected a positive number of examples")
  if batch_size < 1:
    raise ValueError(f"der.batch_size={batch_size}: expected a positive batch size")
  if alpha < 0:
    raise ValueError(f"der.alpha={alpha}: expected a non-negative weight")
  if beta < 0:
    raise ValueError(f"der.beta={beta}: expected a non-negative weight")
  if not isinstance(dc.replacement, bool):
    raise ValueError(f"der.replacement={dc.replacement!r}: expected True or False")


def der(config, learner, *, plus_plus: bool = False) -> Strategy:
  """DER (or DER++ with `plus_plus`) from `config.der`; see the module docstring."""
  check_config(config)
  dc = config.der
  capacity, batch_size, alpha = int(dc.capacity), int(dc.batch_size), float(dc.alpha)
  beta = float(dc.beta) if plus_plus else 0.0
  replacement = bool(dc.replacement)

  def draw(buffer, rng):
    """A buffer batch and each row's weight in the term's mean (0: a row past the examples stored)."""
    if replacement:
      return buffer_lib.sample(buffer, rng, batch_size), jnp.ones((batch_size,), jnp.float32)
    m, valid = buffer_lib.sample_distinct(buffer, rng, batch_size)
    return m, valid.astype(jnp.float32)

  def init(params, task_info):
    probe = jax.eval_shape(learner.apply, params, jnp.zeros((1, *task_info.input_shape), task_info.input_dtype),
                           jnp.zeros((1,), jnp.int32))
    # One example's whole response: [C] class logits, or [L, V] next-token logits of a language model.
    return buffer_lib.empty(capacity, tuple(task_info.input_shape), extra={"logits": tuple(probe.shape[1:])},
                            label_shape=tuple(task_info.label_shape))

  def loss(loss_fn):
    def der_loss(params, batch, ctx: LossContext):
      buffer = ctx.strategy_state
      value, aux = loss_fn(params, batch, ctx)
      filled = (buffer.size > 0).astype(jnp.float32)
      m, w = draw(buffer, jax.random.fold_in(ctx.rng, _LOGIT_STREAM))
      out = learner.apply(params, m["x"].astype(batch["x"].dtype), m["task"]).astype(jnp.float32)
      match = _weighted_mean(jnp.mean(jnp.square(out - m["logits"]), axis=tuple(range(1, out.ndim))), w)
      total = value + filled * alpha * match
      extra = {"der_logit_mse": filled * match}
      if plus_plus:
        r, w = draw(buffer, jax.random.fold_in(ctx.rng, _LABEL_STREAM))
        logits = learner.logits(params, r["x"].astype(batch["x"].dtype), r["task"], ctx.task_index)
        ce = _weighted_mean(_cross_entropy(logits, r["y"]), w)
        total = total + filled * beta * ce
        extra["der_buffer_ce"] = filled * ce
      return total, {**aux, **extra}
    return der_loss

  def update(buffer, step: StepInfo):
    batch = step.batch
    n = batch["y"].shape[0]
    raw = step.aux.get("_raw_logits")
    stored = buffer.extra["logits"].shape[1:]
    if raw is None or raw.shape[1:] != stored or raw.shape[0] < n:  # no forward pass to reuse: run one at the old params
      raw = learner.apply(step.old_params, batch["x"], batch["task"])
    logits = jax.lax.stop_gradient(raw[:n]).astype(jnp.float32)
    examples = {"x": batch["x"].astype(jnp.float32), "y": batch["y"], "task": batch["task"], "logits": logits}
    return buffer_lib.reservoir_add(buffer, examples, step.rng)

  return Strategy(init=init, loss=loss, name="derpp" if plus_plus else "der", update=update)


def _weighted_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _cross_entropy(logits, labels):
  """Per-example CE: of the class label, or the mean over positions of next-token CE (labels [B, L])."""
  if labels.ndim == 1:
    return cross_entropy(logits, labels)
  return jnp.mean(token_cross_entropy(logits, labels), axis=tuple(range(1, labels.ndim)))


def derpp(config, learner) -> Strategy:
  """DER++: DER plus β · CE on the labels of a second buffer draw."""
  return der(config, learner, plus_plus=True)
