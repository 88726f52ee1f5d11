"""Evaluation: the accuracy matrix and its metrics."""
from cl_jax.eval.metrics import acc, bwt, forgetting, fwt, summarize
