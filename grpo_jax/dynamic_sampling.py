"""DAPO's dynamic sampling: a step trains on groups whose rewards differ (docs/maths.md, 3.3).

A group whose G rewards all agree (all right, all wrong, or fewer than two scored) gives each
of its answers advantage 0: it adds nothing to the policy gradient. With
config.rl.dynamic_sampling the loop samples the next B prompts of the data stream again, at most
rl.max_dynamic_sampling_rounds more times in a step, and each time puts the new rollout's
informative groups in the places of the batch's uninformative ones, in data order:

    first = Rollout(out, whole, reward, positions)         # the step's rollout, as without it
    batch, metrics = fill(first, sample, num_generations=G, max_rounds=R, sharding=batch_sh)
    # sample(r) samples and scores the B prompts after those of rollout r - 1

The batch keeps its shape [B, G]: every rollout runs the same jitted sampler on B prompts, and
the update sees B groups. Groups still uninformative when the cap is reached stay where they
were, with advantage 0 (the batch is then what it would have been with fewer of them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import distributed, sampling


@dataclasses.dataclass(frozen=True)
class Rollout:
  """B groups of G completions (N = B * G rows, prompt-major) and what the step reads of them."""
  out: sampling.Completions  # on the devices: global arrays of N rows
  # train.score's host arrays of the whole batch: per-row entries [N, ...] ("scores" [N, F],
  # "lengths", "truncated"), and "errors" [., F] (failure counts, summed when read).
  whole: dict
  reward: np.ndarray  # [N] float32, the combined reward; NaN = missing
  positions: np.ndarray  # [B] int, the data position (task example index) of each group


def informative(reward_N, num_generations: int) -> np.ndarray:
  """[B] bool: groups whose rewards rank their answers, i.e. not all equal and at least two
  scored (NaN = missing). The complement of advantages._zero_std_groups, the groups
  `group_advantages` gives advantage 0 and `reward_metrics` counts in frac_reward_zero_std."""
  r_BxG = np.asarray(reward_N, np.float32).reshape(-1, num_generations)
  valid = ~np.isnan(r_BxG)
  hi = np.where(valid, r_BxG, -np.inf).max(axis=1)
  lo = np.where(valid, r_BxG, np.inf).min(axis=1)
  return (valid.sum(axis=1) >= 2) & (hi > lo)


@functools.partial(jax.jit, static_argnames=("sharding",))
def _take_rows(kept, new, rows_N, from_new_N, *, sharding):
  """Row i of the result: row rows_N[i] of `new` where from_new_N[i], else of `kept` (pytrees of
  arrays with N leading rows), laid out by `sharding`."""
  def take(a, b):
    pick = from_new_N.reshape(-1, *[1] * (a.ndim - 1))
    return jax.lax.with_sharding_constraint(jnp.where(pick, b[rows_N], a[rows_N]), sharding)
  return jax.tree.map(take, kept, new)


def refill(kept: Rollout, new: Rollout, *, num_generations: int, sharding) -> Rollout:
  """`kept` with its uninformative groups, in order, replaced by `new`'s informative groups, in
  order, as many as there are of both; `new`'s other groups are dropped. The completions move
  on the devices (`sharding`: the batch's); the host arrays on the host."""
  g, b = num_generations, len(kept.positions)
  empty = np.flatnonzero(~informative(kept.reward, g))
  fresh = np.flatnonzero(informative(new.reward, g))
  n = min(len(empty), len(fresh))
  source, from_new = np.arange(b), np.zeros(b, bool)  # slot i takes group source[i]
  source[empty[:n]], from_new[empty[:n]] = fresh[:n], True
  rows_N = (source[:, None] * g + np.arange(g)).reshape(-1)
  from_new_N = np.repeat(from_new, g)

  def take(a, b):  # host arrays, [N, ...]
    return np.where(from_new_N.reshape(-1, *[1] * (a.ndim - 1)), b[rows_N], a[rows_N])

  whole = {k: take(v, new.whole[k]) for k, v in kept.whole.items() if k != "errors"}
  whole["errors"] = np.concatenate([kept.whole["errors"], new.whole["errors"]])
  local = distributed.local_rows(sharding, len(rows_N))  # this process's rows of the index
  out = _take_rows(kept.out, new.out,
                   *distributed.to_global((rows_N[local].astype(np.int32), from_new_N[local]),
                                          sharding), sharding=sharding)
  positions = np.where(from_new, new.positions[source], kept.positions)
  return Rollout(out, whole, take(kept.reward, new.reward), positions)


def fill(first: Rollout, sample: Callable[[int], Rollout], *, num_generations: int,
         max_rounds: int, sharding) -> tuple[Rollout, dict]:
  """The step's batch: `first` with its uninformative groups replaced by informative ones of
  up to `max_rounds` more rollouts, `sample(r)` for r = 1, 2, ..., until none is left.

  Returns (the batch, its dynamic_sampling/* metrics): groups_sampled (B per rollout: the data
  position advances by it), groups_informative (among them), groups_kept (informative groups
  in the batch, <= B), extra_rollouts (r) and cap_hit (1 when the batch still has
  uninformative groups: the cap was reached).
  """
  g, b = num_generations, len(first.positions)
  batch, seen, rounds = first, int(informative(first.reward, g).sum()), 0
  while rounds < max_rounds and not informative(batch.reward, g).all():
    rounds += 1
    new = sample(rounds)
    seen += int(informative(new.reward, g).sum())
    batch = refill(batch, new, num_generations=g, sharding=sharding)
  kept = int(informative(batch.reward, g).sum())
  return batch, {"dynamic_sampling/groups_sampled": float(b * (1 + rounds)),
                 "dynamic_sampling/groups_informative": float(seen),
                 "dynamic_sampling/groups_kept": float(kept),
                 "dynamic_sampling/extra_rollouts": float(rounds),
                 "dynamic_sampling/cap_hit": float(kept < b)}
