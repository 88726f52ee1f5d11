"""A fully connected variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"): the
generator of classic generative replay (`cl_jax.strategies.generative_replay_classic`).

The shape van de Ven & Tolias (2019, "Three scenarios for continual learning") use on Split MNIST: an encoder of
fully connected ReLU layers (2 x 400) onto the mean and log-variance of a diagonal Gaussian posterior over a
100-d latent, and a mirrored decoder whose last layer gives one Bernoulli logit per input value. Inputs are
flattened; their values are read as Bernoulli means, so they should lie in [0, 1] (MNIST / digits as loaded).

The loss of one example x (D input values, z ~ q(z|x) by the reparameterisation trick) is the negative ELBO
divided by D, as in the paper's code (reconstruction averaged over pixels, the KL term scaled by 1/D):

  L(x) = (1/D) sum_d BCE(x_d, sigmoid(g(z))_d) + (1/D) KL(N(mu, diag sigma^2) || N(0, I))
  KL   = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cl_jax.models import FunctionalModel, functional


class VAE(nnx.Module):
  """`enc_0..enc_{n-1}` -> (`mu`, `logvar`) | `dec_0..dec_{n-1}` -> `out` (Bernoulli logits, D values)."""

  def __init__(self, in_features: int, hidden: Sequence[int], latent: int, *, rngs: nnx.Rngs):
    self.num_hidden = len(hidden)
    sizes = [in_features, *hidden]
    for i in range(len(hidden)):
      setattr(self, f"enc_{i}", nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
    self.mu = nnx.Linear(sizes[-1], latent, rngs=rngs)
    self.logvar = nnx.Linear(sizes[-1], latent, rngs=rngs)
    back = [latent, *reversed(hidden)]
    for i in range(len(hidden)):
      setattr(self, f"dec_{i}", nnx.Linear(back[i], back[i + 1], rngs=rngs))
    self.out = nnx.Linear(back[-1], in_features, rngs=rngs)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x.reshape(x.shape[0], -1)
    for i in range(self.num_hidden):
      h = jax.nn.relu(getattr(self, f"enc_{i}")(h))
    return self.mu(h), self.logvar(h)

  def decode(self, z: jax.Array) -> jax.Array:
    h = z
    for i in range(self.num_hidden):
      h = jax.nn.relu(getattr(self, f"dec_{i}")(h))
    return self.out(h)

  def __call__(self, x: jax.Array, task: jax.Array | None = None) -> jax.Array:
    del task
    return self.decode(self.encode(x)[0])


def vae_initializer(in_features: int, hidden: Sequence[int], latent: int):
  """(FunctionalModel, init): `init(key) -> params` is one jitted program (the module is traced once, as
  `cl_jax.models.model_initializer` does for the classifier)."""
  make = lambda key: VAE(in_features, tuple(hidden), latent, rngs=nnx.Rngs(key))
  model, _ = functional(nnx.eval_shape(lambda: make(jax.random.key(0))))
  return model, jax.jit(lambda key: functional(make(key))[1])


def vae_loss(model: FunctionalModel, params, x: jax.Array, rng: jax.Array) -> jax.Array:
  """Per-example negative ELBO / D [B] (module docstring); x [B, ...] with values in [0, 1]."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  mu, logvar = model.apply(params, x, method="encode")
  z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape)
  logits = model.apply(params, z, method="decode")
  # BCE with logits, stable form: max(l, 0) - l x + log(1 + exp(-|l|)).
  bce = jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  kl = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)
  return jnp.mean(bce, axis=-1) + kl / x.shape[-1]


def vae_sample(model: FunctionalModel, params, rng: jax.Array, n: int, latent: int, input_shape) -> jax.Array:
  """`n` inputs [n, *input_shape] decoded from z ~ N(0, I): the Bernoulli means sigmoid(g(z))."""
  z = jax.random.normal(rng, (n, latent))
  return jax.nn.sigmoid(model.apply(params, z, method="decode")).reshape(n, *input_shape)


def in_features(input_shape) -> int:
  return int(np.prod(input_shape))


__all__ = ["VAE", "vae_initializer", "vae_loss", "vae_sample"]
