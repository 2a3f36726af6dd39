"""Group-relative advantages: each answer's reward against its own group's (docs/maths.md).

Layout is prompt-major: rewards[i * G + j] is answer j to prompt i, so a
reshape to [B, G] gives one row per group. NaN in rewards means "no reward"
(every reward function returned None for that completion): it is left out of
its group's statistics and gets advantage 0.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

SCALES = ("group", "batch", "none")


def _groups(rewards_N, num_generations: int):
  """Reshapes to [B, G] after checking the layout; fp32."""
  if not isinstance(num_generations, numbers.Integral) or num_generations < 2:
    raise ValueError(f"num_generations must be an int >= 2 (a group needs a baseline); got {num_generations!r}.")
  rewards_N = jnp.asarray(rewards_N, jnp.float32)
  n = rewards_N.shape[0] if rewards_N.ndim == 1 else -1
  if n < 0 or n % num_generations:
    raise ValueError(
        f"rewards must have shape [N] with N divisible by num_generations={num_generations}; "
        f"got shape {tuple(rewards_N.shape)}.")
  return rewards_N.reshape(n // num_generations, int(num_generations))


def _nan_stats(r_BxG, axis):
  """(valid, count, centred, unbiased std) over `axis`, NaN-aware.

  Missing rewards are 0 in `centred`; std is 0 where fewer than two rewards.
  """
  valid = ~jnp.isnan(r_BxG)
  count = jnp.sum(valid, axis=axis, keepdims=True)
  mean = jnp.sum(jnp.where(valid, r_BxG, 0.0), axis=axis, keepdims=True) / jnp.maximum(count, 1)
  centred = jnp.where(valid, r_BxG - mean, 0.0)
  var = jnp.sum(centred * centred, axis=axis, keepdims=True) / jnp.maximum(count - 1, 1)
  return valid, count, centred, jnp.sqrt(var)


def _zero_std_groups(r_BxG, valid, count):
  """[B, 1] True where a group's rewards cannot rank its answers (all equal, or < 2)."""
  hi = jnp.max(jnp.where(valid, r_BxG, -jnp.inf), axis=1, keepdims=True)
  lo = jnp.min(jnp.where(valid, r_BxG, jnp.inf), axis=1, keepdims=True)
  return (count < 2) | (hi == lo)


def group_advantages(rewards, num_generations: int, *, scale: str = "group", eps: float = 1e-4):
  """A = (r - group mean) / (std + eps), one advantage per completion.

  Args:
    rewards: [N] float, prompt-major (N = B * G); NaN = missing reward.
    num_generations: G >= 2, answers per prompt (static).
    scale: "group" (std of the group, ddof=1), "batch" (std of the whole batch,
      ddof=1) or "none" (only subtract the group mean; Dr. GRPO).
    eps: added to the std.

  Returns:
    [N] fp32. Exactly 0 for missing rewards and for every member of a group
    whose (non-missing) rewards are all equal: rounding can leave the mean of
    equal rewards a hair off them, which 1 / eps would blow up.
  """
  if scale not in SCALES:
    raise ValueError(f"scale={scale!r} is not supported; expected one of {list(SCALES)}.")
  r_BxG = _groups(rewards, num_generations)
  valid, count, centred_BxG, std_Bx1 = _nan_stats(r_BxG, axis=1)
  if scale == "group":
    adv_BxG = centred_BxG / (std_Bx1 + eps)
  elif scale == "batch":
    *_, batch_std = _nan_stats(r_BxG.reshape(-1), axis=0)
    adv_BxG = centred_BxG / (batch_std + eps)
  else:
    adv_BxG = centred_BxG
  no_signal = _zero_std_groups(r_BxG, valid, count) | ~valid
  return jnp.where(no_signal, 0.0, adv_BxG).reshape(-1)


def reward_metrics(rewards, num_generations: int) -> dict:
  """Reward statistics for logging, NaN-aware; jittable.

  Args:
    rewards: [N] float, prompt-major; NaN = missing.
    num_generations: G.

  Returns:
    dict of fp32 scalars: `reward` (mean of the non-missing rewards, NaN if
    none), `reward_std` (mean over groups with >= 2 rewards of their std,
    NaN if none), `frac_reward_zero_std` (fraction of groups that give no
    learning signal: all rewards equal, or fewer than two) and
    `frac_reward_missing`.
  """
  r_BxG = _groups(rewards, num_generations)
  valid, count, _, std_Bx1 = _nan_stats(r_BxG, axis=1)
  total = jnp.sum(valid)
  has_std = count >= 2
  return {
      "reward": jnp.sum(jnp.where(valid, r_BxG, 0.0)) / jnp.where(total > 0, total, jnp.nan),
      "reward_std": jnp.sum(jnp.where(has_std, std_Bx1, 0.0)) / jnp.where(
          jnp.any(has_std), jnp.sum(has_std), jnp.nan),
      "frac_reward_zero_std": jnp.mean(_zero_std_groups(r_BxG, valid, count).astype(jnp.float32)),
      "frac_reward_missing": 1.0 - total / valid.size,
  }
