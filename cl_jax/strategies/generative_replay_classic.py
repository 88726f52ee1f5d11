"""Deep generative replay for classification (Shin et al. 2017, "Continual Learning with Deep Generative Replay"),
in the form van de Ven & Tolias (2019, "Three scenarios for continual learning") report on Split MNIST: DGR, and
DGR + distillation.

A generator, a VAE (`cl_jax.models.vae`: fully connected, `generative_replay.vae_hidden` ReLU layers, a
`generative_replay.latent`-d Gaussian latent; the paper's 2 x 400 and 100), is trained beside the classifier
(the solver), one Adam step (lr `generative_replay.vae_lr`) per train step, inside the same jitted step
(the strategy's `update` hook). At the end of each task `after_task` freezes copies of both: the previous generator
G' and the previous solver S'. While task t (1-based) trains, every step draws R = `generative_replay.replay_batch_size`
inputs x' = sigmoid(G'(z)), z ~ N(0, I), labels them with S' and adds their loss with the paper's weighting

  L = (1/t) L_current + (1 - 1/t) L_replay        (t = 1: L = L_current, nothing is replayed)

  L_replay, targets='hard' (DGR):          CE(S(x'), argmax S'(x'))
  L_replay, targets='soft' (DGR + distill): T^2 KL(softmax(S'(x')/T) || softmax(S(x')/T)),  T = `distill_temperature`

The targets S'(x') come from the outputs the previous tasks used (class-IL: the classes of tasks 1..t-1), the
student S(x') is scored on the outputs of the current task (class-IL: the classes of tasks 1..t, the new ones getting
target probability 0), as in the paper's code; domain-IL uses all outputs for both. In task-IL
(scenario.kind='task') every replayed input is scored once per past task k < t, with that task's head (or its
classes' logit mask), and L_replay is the mean over the t - 1 tasks, as the paper does.
The generator is trained the same way, on the current batch and on inputs G' replays:

  L_G = (1/t) mean_x L_VAE(x) + (1 - 1/t) mean_{x'} L_VAE(x')

State (a dict; in the train state, sharded by the parameter rule, saved in every checkpoint):
  vae, vae_opt     the generator's params and its Adam state
  prev_vae         G', the generator at the end of the previous task
  teacher          S', the solver's params at the end of the previous task
  finished         int32, tasks finished so far (replay is on while it is > 0)
The generator's initial params are drawn from a key folded from the classifier's initial params, so each seed of a
many-seed program gets its own (`init` has no key of its own), and a seed's run alone draws the same ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cl_jax.losses import cross_entropy, distillation_loss
from cl_jax.models import vae as vae_lib
from cl_jax.strategies.base import LossContext, StepInfo, Strategy

TARGETS = ("hard", "soft")
_REPLAY_STREAM = 0xD6E1  # the loss's draw of generated inputs, apart from other strategies' ctx.rng streams


def classic_defaults() -> dict:
  """The `generative_replay` keys the classic kind reads (the section also holds the LM's, see
  `strategies.generative_replay`)."""
  return dict(
      targets="hard",              # hard: DGR (the previous solver's argmax) | soft: DGR + distill
      distill_temperature=2.0,     # T of the soft targets (the paper's 2)
      replay_batch_size=128,       # R: generated inputs per step (the paper: the batch size)
      latent=100,                  # the VAE's latent size (the paper's 100)
      vae_hidden=[400, 400],       # the VAE's encoder layers; the decoder mirrors them (the paper's 2 x 400)
      vae_lr=1e-3,                 # the generator's Adam lr (the paper: the solver's)
  )


def check_classic_config(config) -> None:
  """Raises ValueError naming the bad `generative_replay.*` key (classic kind)."""
  g = config.generative_replay
  if g.targets not in TARGETS:
    raise ValueError(f"generative_replay.targets={g.targets!r}: expected one of {TARGETS} (soft: DGR + distill)")
  if not float(g.distill_temperature) > 0:
    raise ValueError(f"generative_replay.distill_temperature={g.distill_temperature}: expected a value > 0")
  for key in ("replay_batch_size", "latent"):
    if not isinstance(g[key], int) or isinstance(g[key], bool) or g[key] < 1:
      raise ValueError(f"generative_replay.{key}={g[key]!r}: expected a positive integer")
  hidden = list(g.vae_hidden)
  if not hidden or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
    raise ValueError(f"generative_replay.vae_hidden={hidden}: expected a non-empty list of positive integers")
  if not float(g.vae_lr) > 0:
    raise ValueError(f"generative_replay.vae_lr={g.vae_lr}: expected a learning rate > 0")


def _key_from_params(params) -> jax.Array:
  """A key that depends on the classifier's initial params: every leaf's sum, bit for bit, folded in (biases may
  all start at 0, so no single leaf would do)."""
  key = jax.random.key(0xD6E0)
  for leaf in jax.tree.leaves(params):
    key = jax.random.fold_in(key, jax.lax.bitcast_convert_type(jnp.sum(leaf.astype(jnp.float32)), jnp.uint32))
  return key


def _copy(tree):
  """Fresh buffers: a snapshot must not alias the params (the step donates the whole state, each buffer once)."""
  return jax.tree.map(jnp.copy, tree)


def generative_replay_classic(config, learner) -> Strategy:
  """DGR (or DGR + distill with `generative_replay.targets='soft'`); see the module docstring."""
  check_classic_config(config)
  g = config.generative_replay
  soft, temperature = g.targets == "soft", float(g.distill_temperature)
  replay_n, latent, hidden = int(g.replay_batch_size), int(g.latent), tuple(int(h) for h in g.vae_hidden)
  per_task = config.scenario.kind == "task"
  num_tasks = int(config.scenario.num_tasks)
  vae_opt = optax.adam(float(g.vae_lr))
  shapes = {}  # the input shape, set by init (the model of the VAE depends on it)

  def models(input_shape):
    if "model" not in shapes:
      shapes["input_shape"] = tuple(input_shape)
      shapes["model"], shapes["init"] = vae_lib.vae_initializer(vae_lib.in_features(input_shape), hidden, latent)
    return shapes["model"]

  def init(params, task_info):
    models(task_info.input_shape)
    vae = shapes["init"](_key_from_params(params))
    return dict(vae=vae, vae_opt=vae_opt.init(vae), prev_vae=_copy(vae), teacher=_copy(params),
                finished=jnp.zeros((), jnp.int32))

  def current_weight(state, task_index):
    """1/t while replaying (t = task_index + 1), else 1."""
    t = task_index.astype(jnp.float32) + 1.0
    return jnp.where(state["finished"] > 0, 1.0 / t, 1.0)

  def replay_loss(params, state, x_gen, task_index):
    """L_replay of generated inputs x_gen [R, ...] (module docstring); 0 before the first task ends."""
    prev = jnp.maximum(task_index - 1, 0)
    if per_task:  # each input once per task k (0-based): weight 1/(t-1) for the past tasks k < t - 1, 0 for the rest
      tasks = jnp.repeat(jnp.arange(num_tasks, dtype=jnp.int32), replay_n)
      x = jnp.tile(x_gen, (num_tasks,) + (1,) * (x_gen.ndim - 1))
      row_w = (tasks < task_index).astype(jnp.float32) / jnp.maximum(task_index, 1).astype(jnp.float32)
    else:  # class-IL: the classes of tasks 1..t-1 (the mask of the previous task index); domain-IL: all outputs
      tasks = jnp.full((replay_n,), prev, jnp.int32)
      x, row_w = x_gen, jnp.ones((replay_n,), jnp.float32)
    teacher = jax.lax.stop_gradient(learner.logits(state["teacher"], x, tasks, prev)).astype(jnp.float32)
    # The student is scored on every output the current task uses (class-IL: the new classes too), so replay also
    # teaches it to keep old inputs off the new classes; the teacher's targets give those classes probability 0.
    student = learner.logits(params, x, tasks, task_index).astype(jnp.float32)
    if soft:
      per = distillation_loss(student, teacher, temperature)
    else:
      per = cross_entropy(student, jnp.argmax(teacher, axis=-1))
    return jnp.sum(row_w * per) / replay_n

  def loss(loss_fn):
    def dgr_loss(params, batch, ctx: LossContext):
      state = ctx.strategy_state
      value, aux = loss_fn(params, batch, ctx)
      model = models(batch["x"].shape[1:])
      x_gen = vae_lib.vae_sample(model, state["prev_vae"], jax.random.fold_in(ctx.rng, _REPLAY_STREAM), replay_n,
                                 latent, batch["x"].shape[1:]).astype(batch["x"].dtype)
      replayed = replay_loss(params, state, jax.lax.stop_gradient(x_gen), ctx.task_index)
      w = current_weight(state, ctx.task_index)
      total = w * value + (1.0 - w) * replayed
      return total, {**aux, "dgr_replay_loss": (state["finished"] > 0) * replayed}
    return dgr_loss

  def update(state, step: StepInfo):
    model = models(step.batch["x"].shape[1:])
    k_gen, k_cur, k_rep = jax.random.split(step.rng, 3)
    x_cur = step.batch["x"]
    x_gen = jax.lax.stop_gradient(vae_lib.vae_sample(model, state["prev_vae"], k_gen, replay_n, latent,
                                                     x_cur.shape[1:]))
    w = current_weight(state, step.task_index)

    def generator_loss(vae):
      current = jnp.mean(vae_lib.vae_loss(model, vae, x_cur, k_cur))
      replayed = jnp.mean(vae_lib.vae_loss(model, vae, x_gen, k_rep))
      return w * current + (1.0 - w) * replayed

    grads = jax.grad(generator_loss)(state["vae"])
    updates, opt_state = vae_opt.update(grads, state["vae_opt"], state["vae"])
    return {**state, "vae": optax.apply_updates(state["vae"], updates), "vae_opt": opt_state}

  def after_task(state, params, task_data, rng):
    del task_data, rng
    return {**state, "prev_vae": _copy(state["vae"]), "teacher": _copy(params), "finished": state["finished"] + 1}

  return Strategy(init=init, loss=loss, after_task=after_task, name="generative_replay", update=update)


# One name, `generative_replay`, for both kinds: the kind of the run picks the implementation (a language model
# writes its own replay text, `strategies.generative_replay`; a classifier gets a VAE, this module). They share the
# config section; each reads its own keys.

_LM_KINDS = ("lm",)
_CLASSIC_KINDS = ("classic",)


def default_config() -> ml_collections.ConfigDict:
  """The `generative_replay` section: the LM's keys and the classic kind's."""
  from cl_jax.strategies import generative_replay as lm
  c = lm.default_config()
  for key, value in classic_defaults().items():
    c[key] = value
  return c


def check_config(config) -> None:
  """The check of the run's kind (`config.kind`); another kind is refused in one line."""
  from cl_jax.strategies import generative_replay as lm
  kind = config.get("kind", "classic")
  if kind in _LM_KINDS:
    return lm.check_config(config)
  if kind in _CLASSIC_KINDS:
    return check_classic_config(config)
  raise ValueError(f"strategy={config.strategy!r}: generative_replay runs on kind 'lm' (the model samples its own "
                   f"replay text) or 'classic' (a VAE generator), not on kind={kind!r}")


def generative_replay(config, learner) -> Strategy:
  """The kind's generative replay: the LM's (`config.kind='lm'`) or DGR with a VAE (classic)."""
  check_config(config)
  if config.get("kind", "classic") in _LM_KINDS:
    from cl_jax.strategies import generative_replay as lm
    return lm.generative_replay(config, learner)
  return generative_replay_classic(config, learner)


# What each implementation needs (`strategies.CAPABILITIES`): token logits and a mixture whose general rows it
# replaces (LM), or class logits scored under the scenario's mask and the step's update hook (classic).
_LM_NEEDS, _CLASSIC_NEEDS = frozenset({"token_logits", "mixture"}), frozenset({"class_logits", "step_hooks"})
NEEDS_BY_KIND = (_LM_NEEDS, _CLASSIC_NEEDS)


def config_needs(config) -> dict[str, str]:
  """The needs of the config's kind's implementation, each with the kind as the reason."""
  kind = config.get("kind", "classic")
  return {cap: f"kind={kind!r}" for cap in sorted(_CLASSIC_NEEDS if kind in _CLASSIC_KINDS else _LM_NEEDS)}


generative_replay.check_config = check_config
generative_replay.config_sections = ("generative_replay",)

__all__ = ["generative_replay", "generative_replay_classic", "default_config", "classic_defaults", "check_config",
           "check_classic_config", "config_needs", "TARGETS", "NEEDS_BY_KIND"]
