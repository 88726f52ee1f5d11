"""Continual-learning metrics from the accuracy matrix.

R has T+1 rows and T columns: R[0, i] is the accuracy on task i before any training, R[j, i] (j >= 1) the
accuracy on task i after training tasks 1..j (tasks are 1-indexed here, as in the papers; row j of the array is
"after task j"). With T tasks:

  ACC        = 1/T Σ_i R[T, i]                                       (Lopez-Paz & Ranzato 2017)
  BWT        = 1/(T-1) Σ_{i<T} (R[T, i] − R[i, i])                   (Lopez-Paz & Ranzato 2017)
  FWT        = 1/(T-1) Σ_{i≥2} (R[i-1, i] − R[0, i])                 (Lopez-Paz & Ranzato 2017, with R[0] as b̄)
  forgetting = 1/(T-1) Σ_{i<T} max_{l∈[i, T-1]} (R[l, i] − R[T, i])  (Chaudhry et al. 2018, average forgetting)

BWT < 0 is forgetting; FWT > 0 means earlier tasks helped later ones before they were trained on. With one task,
BWT, FWT and forgetting are 0.
"""
from __future__ import annotations

import numpy as np


def check_accuracy_matrix(r) -> np.ndarray:
  r = np.asarray(r, np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] + 1:
    raise ValueError(f"accuracy matrix must have shape (T+1, T); got {r.shape}")
  return r


def acc(r) -> float:
  r = check_accuracy_matrix(r)
  return float(r[-1].mean())


def bwt(r) -> float:
  r = check_accuracy_matrix(r)
  t = r.shape[1]
  if t < 2:
    return 0.0
  return float(np.mean([r[t, i] - r[i + 1, i] for i in range(t - 1)]))


def fwt(r) -> float:
  r = check_accuracy_matrix(r)
  t = r.shape[1]
  if t < 2:
    return 0.0
  return float(np.mean([r[i, i] - r[0, i] for i in range(1, t)]))


def forgetting(r) -> float:
  r = check_accuracy_matrix(r)
  t = r.shape[1]
  if t < 2:
    return 0.0
  return float(np.mean([np.max(r[i + 1:t, i]) - r[t, i] for i in range(t - 1)]))


def summarize(r) -> dict:
  """ACC, BWT, FWT and forgetting of a complete accuracy matrix."""
  return {"acc": acc(r), "bwt": bwt(r), "fwt": fwt(r), "forgetting": forgetting(r)}
