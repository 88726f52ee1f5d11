"""cl_jax: continual learning in JAX/Flax.

The functional core: models are Flax NNX modules split once into a graphdef and a plain params pytree;
train steps, strategies, Fisher, task vectors and merges all work on those pytrees.
"""
__version__ = "0.1.0"
