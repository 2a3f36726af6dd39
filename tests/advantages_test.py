"""Tests for grpo_jax.advantages against a float64 NumPy reference (ddof=1)."""

import functools

import jax
import numpy as np
import pytest

from grpo_jax import advantages

NAN = np.nan


def np_group_advantages(rewards, g, scale, eps=1e-4):
  """docs/maths.md's advantage, group by group; NaN rewards are missing."""
  r = np.asarray(rewards, np.float64).reshape(-1, g)
  batch_std = np.nanstd(r, ddof=1)
  out = np.zeros_like(r)
  for i, group in enumerate(r):
    ok = ~np.isnan(group)
    vals = group[ok]
    if len(vals) < 2 or np.all(vals == vals[0]):
      continue
    std = {"group": vals.std(ddof=1), "batch": batch_std, "none": None}[scale]
    centred = vals - vals.mean()
    out[i, ok] = centred if std is None else centred / (std + eps)
  return out.ravel()


REWARDS = np.array([
    1.0, 0.0, 0.5, 2.0,     # ordinary group
    0.1, 0.1, 0.1, 0.1,     # all equal
    3.0, NAN, -1.0, 3.0,    # one missing
    NAN, NAN, NAN, NAN,     # all missing
    NAN, 7.0, NAN, NAN,     # a single reward: no baseline
    0.0, 1.0, 1.0, 1.0,
])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_numpy_and_sums_to_zero_per_group(scale):
  got = np.asarray(advantages.group_advantages(REWARDS, 4, scale=scale))
  assert got.dtype == np.float32 and not np.isnan(got).any()
  np.testing.assert_allclose(got, np_group_advantages(REWARDS, 4, scale), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.reshape(-1, 4).sum(1), 0.0, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_random_rewards_match_numpy(scale):
  rewards = np.random.default_rng(0).normal(size=24)
  got = advantages.group_advantages(rewards, 8, scale=scale, eps=0.01)
  np.testing.assert_allclose(got, np_group_advantages(rewards, 8, scale, eps=0.01), rtol=1e-5, atol=1e-6)


def test_uses_unbiased_std():
  # Group [0, 2]: mean 1, ddof=1 std sqrt(2) (ddof=0 would give 1).
  got = advantages.group_advantages(np.array([0.0, 2.0]), 2, eps=0.0)
  np.testing.assert_allclose(got, [-1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-6)


def test_groups_without_signal_are_exactly_zero():
  got = np.asarray(advantages.group_advantages(REWARDS, 4))
  assert np.all(got[4:8] == 0.0)  # all equal
  assert np.all(got[12:20] == 0.0)  # all missing; one reward only
  assert got[9] == 0.0  # the missing reward itself
  # fp32 rounding makes the naive mean of [0.9] * 3 differ from 0.9; the
  # difference would leak through 1 / (0 + eps) without the all-equal guard.
  equal = np.full(3, 0.9, np.float32)
  assert equal[0] - np.float32(equal.sum(dtype=np.float32) / np.float32(3)) != 0
  assert np.all(np.asarray(advantages.group_advantages(equal, 3)) == 0.0)


def test_missing_rewards_do_not_move_the_others():
  with_missing = advantages.group_advantages(np.array([3.0, NAN, -1.0, 3.0]), 4)
  without = advantages.group_advantages(np.array([3.0, -1.0, 3.0]), 3)
  np.testing.assert_allclose(np.asarray(with_missing)[[0, 2, 3]], without, rtol=1e-6)


def test_jit_matches_eager():
  fn = jax.jit(functools.partial(advantages.group_advantages, scale="batch"), static_argnums=1)
  np.testing.assert_allclose(fn(REWARDS, 4), advantages.group_advantages(REWARDS, 4, scale="batch"),
                             rtol=1e-6)


@pytest.mark.parametrize("rewards,g,kwargs,match", [
    (np.zeros(4), 1, {}, "num_generations must be an int >= 2"),
    (np.zeros(6), 4, {}, "divisible by num_generations=4"),
    (np.zeros((2, 4)), 4, {}, r"shape \[N\]"),
    (np.zeros(4), 2, {"scale": "std"}, r"\['group', 'batch', 'none'\]"),
])
def test_bad_arguments_raise(rewards, g, kwargs, match):
  with pytest.raises(ValueError, match=match):
    advantages.group_advantages(rewards, g, **kwargs)


def test_reward_metrics():
  metrics = jax.jit(advantages.reward_metrics, static_argnums=1)(REWARDS, 4)
  groups = REWARDS.reshape(-1, 4)
  stds = [np.nanstd(grp, ddof=1) for grp in groups if (~np.isnan(grp)).sum() >= 2]
  np.testing.assert_allclose(metrics["reward"], np.nanmean(REWARDS), rtol=1e-6)
  np.testing.assert_allclose(metrics["reward_std"], np.mean(stds), rtol=1e-6)
  # No signal: the all-equal, all-missing and single-reward groups.
  np.testing.assert_allclose(metrics["frac_reward_zero_std"], 3 / 6)
  np.testing.assert_allclose(metrics["frac_reward_missing"], 8 / 24)


def test_reward_metrics_without_any_reward_are_nan_not_zero():
  metrics = advantages.reward_metrics(np.full(4, NAN), 2)
  assert np.isnan(metrics["reward"]) and np.isnan(metrics["reward_std"])
  assert metrics["frac_reward_zero_std"] == 1.0 and metrics["frac_reward_missing"] == 1.0
