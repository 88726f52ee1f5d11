"""Data mixtures and curricula as config data; a deterministic, resumable mixture sampler.

A mixture is a list of stages `[(start_step, {domain: weight}), ...]` (the levanter convention): from
`start_step` until the next stage starts, each example of a batch comes from domain `d` with probability
`weight_d / sum(weights)`. Curricula are just stage lists; the helpers below build the usual ones.

Sampling is a pure function of `(seed, step, position)`:
  * the domain of example `(step, p)` is a categorical draw from the stage weights with the uniform
    `u = splitmix64(seed, step, p) / 2^64`, so realised counts are Binomial(n, w_d);
  * inside a domain, examples are consumed as a stream: the `q`-th draw of domain `d` over the whole run
    is `perm_{seed,d,e}[q mod N_d]` with epoch `e = q div N_d`, so every example is seen once per epoch
    (or, with a fixed `order`, in that order: difficulty-aware curricula). `q` = draws of `d` before
    `step` (a prefix count, recomputed from the pure domain draws) + the rank of `p` among `d`'s
    positions in this batch.
So a run resumed at any step (mid-stage included) gets exactly the batches an uninterrupted run gets, and
different hosts can each take their own slice of positions without communicating.

Stages in a config (`data.stages` of an LM run, `check_stages`) follow the same convention as levanter's
`train_weights` list: each pair is `(start_step, weights)`, the weights in force from that step on, the first
pair at step 0 (a list of `until_step`s never starts at 0, so it is refused rather than read shifted by a stage).
The named presets (`from_spec`) are stages over two roles; `expand_roles` spreads a role's weight over the
sources that share it.
"""
from __future__ import annotations

import bisect
from typing import Mapping, Sequence

import numpy as np

Stages = Sequence[tuple[int, Mapping[str, float]]]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mixer, vectorised."""
  with np.errstate(over="ignore"):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, step: np.ndarray, position: np.ndarray) -> np.ndarray:
  """U[0,1) as a pure function of (seed, step, position): three chained SplitMix64 rounds."""
  with np.errstate(over="ignore"):
    h = _splitmix64(np.full(np.shape(step), np.uint64(seed % 2**64), np.uint64))
    h = _splitmix64(h ^ np.asarray(step, np.uint64))
    h = _splitmix64(h ^ np.asarray(position, np.uint64))
  return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


# ----------------------------------------------------------------------------- stages

def normalize_stages(stages: Stages, domains: Sequence[str] | None = None) -> tuple:
  """Validates stages and returns `((start_step, (w_d for d in domains)), ...)` with weights summing to 1.

  Accepts any mapping type for the weights (dict, ConfigDict) and lists for the pairs, because configs
  round-trip through JSON. `domains` fixes the order of the weight vector (default: sorted names seen).
  """
  if isinstance(stages, Mapping):
    stages = [(0, stages)]
  stages = [tuple(s) for s in stages]
  if not stages:
    raise ValueError("mixture stages: empty; expected [(start_step, {domain: weight}), ...]")
  names = sorted({d for _, w in stages for d in dict(w)}) if domains is None else list(domains)
  out, prev = [], -1
  for i, pair in enumerate(stages):
    if len(pair) != 2:
      raise ValueError(f"mixture stage {i}: {pair!r} is not a (start_step, {{domain: weight}}) pair")
    start, weights = int(pair[0]), dict(pair[1])
    if i == 0 and start != 0:
      raise ValueError(f"mixture stage 0 starts at step {start}; the first stage must start at step 0")
    if start <= prev:
      raise ValueError(f"mixture stage {i} starts at step {start}, not after stage {i - 1} ({prev}); "
                       "start steps must strictly increase")
    unknown = sorted(set(weights) - set(names))
    if unknown:
      raise ValueError(f"mixture stage {i}: unknown domain(s) {unknown}; domains are {names}")
    w = np.array([float(weights.get(d, 0.0)) for d in names])
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"mixture stage {i}: weights {weights} must be finite, >= 0, with a positive sum")
    out.append((start, tuple(w / w.sum())))
    prev = start
  return tuple(out)


def weights_at(stages: Stages, step: int, domains: Sequence[str] | None = None) -> dict[str, float]:
  """The normalised weights in force at `step`."""
  names = sorted({d for _, w in stages for d in dict(w)}) if domains is None else list(domains)
  norm = normalize_stages(stages, names)
  i = bisect.bisect_right([s for s, _ in norm], int(step)) - 1
  return dict(zip(names, norm[i][1]))


def constant(weights: Mapping[str, float]) -> list:
  """One stage for the whole run, e.g. `constant({'code': 0.7, 'general': 0.3})`."""
  return [(0, dict(weights))]


def domain_ratio(domain_fraction: float, *, domain: str = "code", general: str = "general") -> list:
  """A constant domain/general ratio: 0.7 -> 70% domain, 30% general replay."""
  if not 0 <= domain_fraction <= 1:
    raise ValueError(f"domain_fraction={domain_fraction}: expected a number in [0, 1]")
  return constant({domain: domain_fraction, general: 1.0 - domain_fraction})


def three_phase(total_steps: int, *, domain: str = "code", general: str = "general",
                general_fractions: Sequence[float] = (0.8, 0.5, 0.2),
                boundaries: Sequence[float] = (1 / 3, 2 / 3)) -> list:
  """Three-phase curriculum: general/domain 80/20 -> 50/50 -> 20/80, switching at `boundaries` of the run.

  The gradual shift of data towards the target domain (cf. Gupta et al. 2023, "Continual pre-training of
  large language models: how to (re)warm your model?"; Ibrahim et al. 2024, "Simple and scalable
  strategies to continually pre-train LLMs") so the model meets the new domain in small doses first.
  """
  if len(general_fractions) != len(boundaries) + 1:
    raise ValueError(f"three_phase: {len(general_fractions)} general_fractions need "
                     f"{len(general_fractions) - 1} boundaries, got {len(boundaries)}")
  starts = [0] + [int(round(b * total_steps)) for b in boundaries]
  return [(s, {general: g, domain: 1.0 - g}) for s, g in zip(starts, general_fractions)]


def cyclical(total_steps: int, period: int, first: Mapping[str, float],
             second: Mapping[str, float]) -> list:
  """Alternates `first` and `second` every `period` steps (first, second, first, ...)."""
  if period <= 0:
    raise ValueError(f"cyclical: period={period} must be positive")
  return [(s, dict(first if (s // period) % 2 == 0 else second)) for s in range(0, total_steps, period)]


def two_phase(total_steps: int, *, stable_fraction: float = 0.75, domain: str = "code",
              general: str = "general", mixed_domain_fraction: float = 0.5,
              decay_domain_fraction: float = 0.9) -> list:
  """The two-phase recipe: mixed data while WSD's LR is high, domain-heavy data during its decay.

  Stage 1 (steps [0, stable_fraction * T)): `mixed_domain_fraction` domain; stage 2 (the LR decay):
  `decay_domain_fraction` domain. `stable_fraction` (0.7-0.8 in the recipe) must equal the WSD schedule's
  decay start so the data switch coincides with the LR decay (Hu et al. 2024, MiniCPM: high-quality /
  domain data is most effective when introduced in the decay phase).
  """
  if not 0 < stable_fraction < 1:
    raise ValueError(f"two_phase: stable_fraction={stable_fraction} must be in (0, 1)")
  switch = int(round(stable_fraction * total_steps))
  return [(0, {domain: mixed_domain_fraction, general: 1 - mixed_domain_fraction}),
          (switch, {domain: decay_domain_fraction, general: 1 - decay_domain_fraction})]


def from_spec(spec: str, total_steps: int, *, domain: str = "code", general: str = "general",
              stable_fraction: float = 0.75, period: int | None = None) -> list:
  """Stages from a short name: `domain_only`, `general_only`, `<D>_<G>` (e.g. `70_30`: D% domain),
  `three_phase`, `two_phase`, `cyclical`, `difficulty` (= domain_only; the order is the curriculum)."""
  if spec in ("domain_only", "difficulty"):
    return constant({domain: 1.0, general: 0.0})
  if spec == "general_only":
    return constant({domain: 0.0, general: 1.0})
  if spec == "three_phase":
    return three_phase(total_steps, domain=domain, general=general)
  if spec == "two_phase":
    return two_phase(total_steps, stable_fraction=stable_fraction, domain=domain, general=general)
  if spec == "cyclical":
    period = period or max(1, total_steps // 8)
    return cyclical(total_steps, period, {domain: 0.9, general: 0.1}, {domain: 0.5, general: 0.5})
  parts = spec.split("_")
  if len(parts) == 2 and all(p.isdigit() for p in parts):
    d, g = int(parts[0]), int(parts[1])
    if d + g != 100:
      raise ValueError(f"mixture={spec!r}: the two percentages must sum to 100 (domain_general)")
    return domain_ratio(d / 100, domain=domain, general=general)
  raise ValueError(f"mixture={spec!r}: expected domain_only, general_only, <D>_<G> (e.g. 70_30), "
                   "three_phase, two_phase, cyclical or difficulty")


def check_stages(stages, names: Sequence[str], total_steps: int | None = None, key: str = "data.stages") -> list:
  """Config stages `[(start_step, {name: weight}), ...]` checked against the source `names`: returns them as
  `[(int start, {name: float weight})]` (weights as given; `normalize_stages` divides by each stage's sum), or
  raises ConfigError, one line naming `key` and the stage: not a pair, a stage with no weights, an unknown name, a
  weight that is negative / not finite, all zero, a first start other than 0, starts not increasing, a start at or
  past `total_steps` (that stage would never run)."""
  from cl_jax.errors import ConfigError
  names = list(names)
  if isinstance(stages, Mapping) or not isinstance(stages, (list, tuple)) or not stages:
    raise ConfigError(f"{key}={stages!r}: expected a non-empty list of [start_step, {{source: weight}}] pairs, "
                      f"sources {names}")
  out, prev = [], -1
  for i, pair in enumerate(stages):
    where = f"{key}[{i}]"
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not hasattr(pair[1], "keys"):
      raise ConfigError(f"{where}={pair!r}: expected a [start_step, {{source: weight}}] pair")
    start, given = pair[0], pair[1]
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
      raise ConfigError(f"{where}: start step {start!r} must be an integer >= 0")
    weights = {str(k): given[k] for k in given.keys()}
    if not weights:
      raise ConfigError(f"{where}: an empty stage (no weights); give at least one source a positive weight, "
                        f"sources {names}")
    unknown = sorted(set(weights) - set(names))
    if unknown:
      raise ConfigError(f"{where}: unknown source(s) {unknown}; the sources are {names}")
    bad = {k: v for k, v in weights.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0}
    if bad:
      raise ConfigError(f"{where}: weight(s) {bad} must be finite numbers >= 0")
    if sum(weights.values()) <= 0:
      raise ConfigError(f"{where}: weights {weights} are all zero; a stage draws from at least one source")
    if i == 0 and start != 0:
      raise ConfigError(f"{where}: starts at step {start}; stages are [start_step, weights] pairs (levanter's "
                        "convention), the first starting at step 0")
    if start <= prev:
      raise ConfigError(f"{where}: starts at step {start}, not after the stage before it ({prev}); start steps must "
                        "strictly increase")
    if total_steps is not None and start >= total_steps:
      raise ConfigError(f"{where}: starts at step {start}, at or past the run's {total_steps} steps: it would "
                        "never run")
    out.append((int(start), {k: float(v) for k, v in weights.items()}))
    prev = start
  return out


def expand_roles(stages: Stages, roles: Mapping[str, Sequence[str]],
                 sizes: Mapping[str, int] | None = None) -> list:
  """Stages over roles (`{role: weight}`, e.g. a preset's `general` / `domain`) as stages over sources: a role with
  one source passes its weight to it unchanged; a role with several splits it in proportion to their sizes
  (`sizes`: train sequences), as drawing from their concatenation would: w_s = w_role * n_s / sum_role n."""
  out = []
  for start, weights in stages:
    spread = {}
    for role, w in dict(weights).items():
      members = list(roles[role])
      if len(members) == 1:
        spread[members[0]] = w
        continue
      if sizes is None:
        raise ValueError(f"expand_roles: role {role!r} has sources {members}; their sizes are needed to share "
                         "its weight")
      total = sum(int(sizes[m]) for m in members)
      for m in members:
        spread[m] = w * int(sizes[m]) / total if total else 0.0
    out.append((start, spread))
  return out


# ----------------------------------------------------------------------------- sampler

def difficulty_order(doc_index: np.ndarray, doc_perplexity: np.ndarray) -> np.ndarray:
  """Order of a domain's sequences for a difficulty-aware curriculum: moderate first, most OOD last.

  Documents are ranked by the base model's perplexity on them, ascending: the documents closest to what
  the model already knows come first and the most out-of-distribution ones last (in the spirit of
  curriculum learning, Bengio et al. 2009, with the base model as the difficulty scorer). Sequences keep
  their document's rank (stable, so a document's sequences stay in text order).
  """
  doc_index = np.asarray(doc_index)
  doc_perplexity = np.asarray(doc_perplexity, np.float64)
  if doc_index.size and (doc_index.min() < 0 or doc_index.max() >= len(doc_perplexity)):
    raise ValueError("difficulty_order: doc_index refers to documents without a perplexity")
  return np.argsort(doc_perplexity[doc_index], kind="stable").astype(np.int64)


class MixtureSampler:
  """Which example of which domain fills each batch position; see the module docstring for the law.

  Args:
    stages: `[(start_step, {domain: weight})]` (see `normalize_stages`).
    sizes: `{domain: number of examples}`; defines the domain order (domain id = index in `domains`).
    batch_size: examples per step (global batch).
    seed: the data seed.
    orders: optional `{domain: int array of example indices}` to consume that domain in a fixed order
      (repeated each epoch) instead of a fresh permutation per epoch.
  """

  _BLOCK = 256  # prefix counts are cached every _BLOCK steps; derived data, so the API stays pure

  def __init__(self, stages: Stages, sizes: Mapping[str, int], batch_size: int, seed: int = 0,
               orders: Mapping[str, np.ndarray] | None = None):
    self.domains = tuple(sizes)
    self.sizes = np.array([int(sizes[d]) for d in self.domains], np.int64)
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive")
    self.stages = normalize_stages(stages, self.domains)
    for start, w in self.stages:
      empty = [d for d, wd, n in zip(self.domains, w, self.sizes) if wd > 0 and n <= 0]
      if empty:
        raise ValueError(f"mixture stage at step {start} samples domain(s) {empty}, which have no examples")
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self._starts = [s for s, _ in self.stages]
    self._cum = [np.cumsum(w) for _, w in self.stages]
    self.orders = {}
    for d, order in (orders or {}).items():
      if d not in self.domains:
        raise ValueError(f"orders: unknown domain {d!r}; domains are {list(self.domains)}")
      order = np.asarray(order, np.int64)
      n = self.sizes[self.domains.index(d)]
      if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"orders[{d!r}] must be a permutation of range({n})")
      self.orders[d] = order
    self._prefix = {0: np.zeros(len(self.domains), np.int64)}
    self._perms: dict = {}

  # -- domain draws
  def domain_ids(self, steps: np.ndarray | int) -> np.ndarray:
    """Domain id of every position of every step in `steps`: int [len(steps), B] (or [B] for an int)."""
    scalar = np.ndim(steps) == 0
    steps = np.atleast_1d(np.asarray(steps, np.int64))
    pos = np.arange(self.batch_size, dtype=np.int64)
    u = uniform(self.seed, steps[:, None], pos[None, :])
    stage = np.searchsorted(np.asarray(self._starts), steps, side="right") - 1
    out = np.empty(u.shape, np.int64)
    for si in np.unique(stage):
      rows = stage == si
      # min() guards u in the last float ulp of a cumsum that rounds below 1.
      out[rows] = np.minimum(np.searchsorted(self._cum[si], u[rows], side="right"), len(self.domains) - 1)
    return out[0] if scalar else out

  def counts_before(self, step: int) -> np.ndarray:
    """Draws of each domain over steps [0, step): int [num_domains]."""
    step = int(step)
    base = (step // self._BLOCK) * self._BLOCK
    known = max(k for k in self._prefix if k <= base)
    counts = self._prefix[known].copy()
    for start in range(known, base, self._BLOCK):
      ids = self.domain_ids(np.arange(start, start + self._BLOCK))
      counts += np.bincount(ids.ravel(), minlength=len(self.domains))
      self._prefix[start + self._BLOCK] = counts.copy()
    if step > base:
      ids = self.domain_ids(np.arange(base, step))
      counts = counts + np.bincount(ids.ravel(), minlength=len(self.domains))
    return counts

  def _epoch_perm(self, d: int, epoch: int) -> np.ndarray:
    """Domain d's order in `epoch`: a permutation seeded by (seed, d, epoch); the last few are cached."""
    key = (d, epoch)
    if key not in self._perms:
      if len(self._perms) >= 8:
        self._perms.pop(next(iter(self._perms)))
      self._perms[key] = np.random.default_rng([self.seed, 7919, d, epoch]).permutation(self.sizes[d])
    return self._perms[key]

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """`(domain_id [B], example_index [B])` of the batch at `step`."""
    ids = self.domain_ids(int(step))
    before = self.counts_before(int(step))
    example = np.empty(self.batch_size, np.int64)
    for d in np.unique(ids):
      where = np.flatnonzero(ids == d)
      q = before[d] + np.arange(len(where))
      n = self.sizes[d]
      name = self.domains[d]
      if name in self.orders:
        example[where] = self.orders[name][q % n]
      else:
        for e in np.unique(q // n):
          sel = (q // n) == e
          example[where[sel]] = self._epoch_perm(int(d), int(e))[q[sel] % n]
    return ids, example

  def batch(self, step: int, data: Mapping[str, np.ndarray]) -> dict:
    """Gathers the batch at `step` from `data[domain]` arrays: `{'tokens': [B, ...], 'domain': int32 [B]}`."""
    ids, example = self.indices(step)
    first = np.asarray(data[self.domains[0]])
    tokens = np.empty((self.batch_size,) + first.shape[1:], first.dtype)
    for d in np.unique(ids):
      where = ids == d
      tokens[where] = np.asarray(data[self.domains[d]])[example[where]]
    return {"tokens": tokens, "domain": ids.astype(np.int32)}

  def realised(self, start: int, end: int) -> dict[str, float]:
    """Fraction of examples drawn from each domain over steps [start, end)."""
    counts = self.counts_before(end) - self.counts_before(start)
    total = max(int(counts.sum()), 1)
    return {d: float(c) / total for d, c in zip(self.domains, counts)}

  def weights_at(self, step: int) -> dict[str, float]:
    i = bisect.bisect_right(self._starts, int(step)) - 1
    return dict(zip(self.domains, self.stages[i][1]))


def grain_dataset(sampler: MixtureSampler, data: Mapping[str, np.ndarray], num_steps: int,
                  start_step: int = 0):
  """The mixture as a `grain.MapDataset` over steps [start_step, num_steps): element i is step start_step + i.

  Random access by step is what makes resumption exact: a restarted run builds this with the restored
  step and reads on, with no iterator state to checkpoint.
  """
  import grain
  return grain.MapDataset.range(start_step, num_steps).map(lambda s: sampler.batch(int(s), data))


__all__ = ["Stages", "normalize_stages", "weights_at", "constant", "domain_ratio", "three_phase",
           "cyclical", "two_phase", "from_spec", "check_stages", "expand_roles", "difficulty_order", "MixtureSampler",
           "grain_dataset", "uniform"]
