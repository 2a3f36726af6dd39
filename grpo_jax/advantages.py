"""Advantages from rewards: GRPO's group-relative ones and the other estimators (docs/maths.md).

Layout is prompt-major: rewards[i * G + j] is answer j to prompt i, so a
reshape to [B, G] gives one row per group. NaN in rewards means "no reward"
(every reward function returned None for that completion): it is left out of
every statistic and gets advantage 0.

`group_advantages` turns one scalar reward per completion into advantages
("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline");
`multi_reward_advantages` is GDPO's: each reward function's column normalised
within its group before the weighted sum.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

SCALES = ("group", "batch", "none")
# How a completion's advantage is formed from the rewards (config.rl.advantage_estimator).
ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
# TRL's names (config.rl.multi_objective_aggregation): weighted sum of the reward functions'
# rewards, then the estimator; or each function's rewards normalised first (GDPO).
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _check_generations(num_generations, minimum: int = 2) -> None:
  if not isinstance(num_generations, numbers.Integral) or num_generations < minimum:
    why = " (a group needs a baseline)" if minimum == 2 else ""
    raise ValueError(f"num_generations must be an int >= {minimum}{why}; "
                     f"got {num_generations!r}.")


def _groups(rewards_N, num_generations: int, minimum: int = 2):
  """Reshapes to [B, G] after checking the layout (G >= minimum); fp32."""
  _check_generations(num_generations, minimum)
  rewards_N = jnp.asarray(rewards_N, jnp.float32)
  n = rewards_N.shape[0] if rewards_N.ndim == 1 else -1
  if n < 0 or n % num_generations:
    raise ValueError(
        f"rewards must have shape [N] with N divisible by num_generations={num_generations}; "
        f"got shape {tuple(rewards_N.shape)}.")
  return rewards_N.reshape(n // num_generations, int(num_generations))


def _nan_stats(r, axis):
  """(valid, count, centred, unbiased std) over `axis`, NaN-aware; keepdims.

  Missing rewards are 0 in `centred`; std is 0 where fewer than two rewards.
  """
  valid = ~jnp.isnan(r)
  count = jnp.sum(valid, axis=axis, keepdims=True)
  mean = jnp.sum(jnp.where(valid, r, 0.0), axis=axis, keepdims=True) / jnp.maximum(count, 1)
  centred = jnp.where(valid, r - mean, 0.0)
  var = jnp.sum(centred * centred, axis=axis, keepdims=True) / jnp.maximum(count - 1, 1)
  return valid, count, centred, jnp.sqrt(var)


def _zero_std_groups(r, valid, count, axis=1):
  """True (keepdims over `axis`) where the rewards cannot rank their answers: all equal, or
  fewer than two."""
  hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=axis, keepdims=True)
  lo = jnp.min(jnp.where(valid, r, jnp.inf), axis=axis, keepdims=True)
  return (count < 2) | (hi == lo)


def _batch_whitened(x_N, eps: float):
  """(x - batch mean) / (batch std + eps) over the non-NaN entries of x [N] (ddof=1); exactly 0
  for NaN entries, and everywhere when fewer than two entries or all of them are equal."""
  valid, count, centred, std = _nan_stats(x_N, axis=0)
  flat = _zero_std_groups(x_N, valid, count, axis=0)
  return jnp.where(flat | ~valid, 0.0, centred / (std + eps))


def group_advantages(rewards, num_generations: int, *, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-4):
  """One advantage per completion from its reward, by `estimator`.

  For completion i of group g (n_g of its rewards present):

    "grpo":   A_i = (r_i - mean_g) / (s + eps), s by `scale` (DeepSeekMath; Dr. GRPO for "none").
    "rloo":   A_i = r_i - (mean of the other n_g - 1 rewards of g)
                  = n_g / (n_g - 1) * (r_i - mean_g); no scaling (TRL's RLOOTrainer with its
              default normalize_advantages=False; verl's "rloo").
    "reinforce_pp": A_i = (r_i - mean_batch) / (std_batch + eps); no group baseline
              (REINFORCE++, outcome reward, gamma = 1).
    "reinforce_pp_baseline": c_i = r_i - mean_g, then A_i = c_i / (std_batch(c) + eps)
              (REINFORCE++-baseline; the batch mean of c is 0 already).

  The batch statistics are over completions (each completion counts once), not over tokens as
  in verl / OpenRLHF (where a long completion weighs more), and eps is added to the std (verl:
  1e-8 to the variance). The KL term stays in the loss (config.rl.beta), not in the reward.

  Args:
    rewards: [N] float, prompt-major (N = B * G); NaN = missing reward.
    num_generations: G >= 2, answers per prompt (static).
    estimator: one of ESTIMATORS.
    scale: "grpo" only: "group" (std of the group, ddof=1), "batch" (std of the whole batch,
      ddof=1) or "none" (only subtract the group mean; Dr. GRPO). The other estimators fix
      their own scaling and take only the default, "group".
    eps: added to the std.

  Returns:
    [N] fp32. Exactly 0 for missing rewards. With a group baseline ("grpo", "rloo",
    "reinforce_pp_baseline"), also exactly 0 for every member of a group whose (non-missing)
    rewards are all equal or fewer than two: rounding can leave the mean of equal rewards a
    hair off them, which 1 / eps would blow up. "reinforce_pp" has no group baseline, so such
    a group still gets the batch's signal; it is 0 only when the whole batch agrees.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r} is not supported; expected one of "
                     f"{list(ESTIMATORS)}.")
  if scale not in SCALES:
    raise ValueError(f"scale={scale!r} is not supported; expected one of {list(SCALES)}.")
  if estimator != "grpo" and scale != "group":
    raise ValueError(f"scale={scale!r} applies to estimator='grpo' only; {estimator!r} has its "
                     "own scaling (leave scale at 'group').")
  r_BxG = _groups(rewards, num_generations)
  if estimator == "reinforce_pp":
    return _batch_whitened(r_BxG.reshape(-1), eps)
  valid, count, centred_BxG, std_Bx1 = _nan_stats(r_BxG, axis=1)
  no_signal = _zero_std_groups(r_BxG, valid, count) | ~valid
  if estimator == "rloo":
    # r_i minus the mean of the others: (n r_i - sum) / (n - 1) = n / (n - 1) * (r_i - mean).
    adv_BxG = centred_BxG * (count / jnp.maximum(count - 1, 1))
  elif estimator == "reinforce_pp_baseline":
    c_BxG = jnp.where(no_signal, 0.0, centred_BxG)
    *_, batch_std = _nan_stats(jnp.where(valid, c_BxG, jnp.nan).reshape(-1), axis=0)
    adv_BxG = c_BxG / (batch_std + eps)
  elif scale == "group":
    adv_BxG = centred_BxG / (std_Bx1 + eps)
  elif scale == "batch":
    *_, batch_std = _nan_stats(r_BxG.reshape(-1), axis=0)
    adv_BxG = centred_BxG / (batch_std + eps)
  else:
    adv_BxG = centred_BxG
  return jnp.where(no_signal, 0.0, adv_BxG).reshape(-1)


def multi_reward_advantages(rewards_NxK, weights_K, num_generations: int, *,
                            scale: str = "group", eps: float = 1e-4):
  """GDPO: each reward function's rewards normalised within its group, weighted and summed,
  then normalised over the batch (TRL's multi_objective_aggregation="normalize_then_sum").

  For completion i of group g and reward function k (NaN = k returned None for i):

    n_ik = (r_ik - mean_g(r_k)) / (s_k + eps)      (k's rewards against the group's, as "grpo")
    S_i  = sum over the k with r_ik present of w_k * n_ik
    A_i  = (S_i - mean_batch(S)) / (std_batch(S) + eps)

  Args:
    rewards_NxK: [N, K] float, prompt-major, each reward function's unweighted rewards (its
      column); NaN = missing.
    weights_K: [K] float, the reward functions' weights (config.rewards).
    num_generations: G >= 2 (static).
    scale: s_k, as `group_advantages`' "grpo": "group" (std of k's rewards in the group;
      GDPO and TRL), "batch" (std of k's rewards over the batch) or "none" (no division).
    eps: added to each std.

  Returns:
    [N] fp32. A column whose rewards in a group are all equal (or fewer than two) adds exactly
    0 to that group's sums. A completion with no reward at all (every column NaN) gets 0 and
    is left out of the batch statistics. Every member of a group whose sums S are all equal
    gets exactly 0 too (nothing ranks its answers; TRL gives them -mean_batch(S) / std, a
    rounding residue when no reward is missing). Batch statistics: over completions, ddof=1.
  """
  if scale not in SCALES:
    raise ValueError(f"scale={scale!r} is not supported; expected one of {list(SCALES)}.")
  _check_generations(num_generations)
  r = jnp.asarray(rewards_NxK, jnp.float32)
  w = jnp.asarray(weights_K, jnp.float32)
  if r.ndim != 2 or r.shape[0] % num_generations or w.shape != r.shape[1:]:
    raise ValueError(
        f"rewards must have shape [N, K] with N divisible by num_generations={num_generations} "
        f"and weights shape [K]; got {tuple(r.shape)} and {tuple(w.shape)}.")
  k = r.shape[1]
  r_BxGxK = r.reshape(-1, int(num_generations), k)
  valid, count, centred, std_Bx1xK = _nan_stats(r_BxGxK, axis=1)
  if scale == "group":
    normed = centred / (std_Bx1xK + eps)
  elif scale == "batch":
    *_, batch_std_1xK = _nan_stats(r, axis=0)
    normed = centred / (batch_std_1xK[None] + eps)
  else:
    normed = centred
  normed = jnp.where(_zero_std_groups(r_BxGxK, valid, count) | ~valid, 0.0, normed)
  scored_BxG = jnp.any(valid, axis=2)
  s_BxG = jnp.where(scored_BxG, jnp.sum(normed * w, axis=2), jnp.nan)
  adv_N = _batch_whitened(s_BxG.reshape(-1), eps)
  s_valid, s_count, *_ = _nan_stats(s_BxG, axis=1)
  no_rank_BxG = _zero_std_groups(s_BxG, s_valid, s_count) | ~scored_BxG
  return jnp.where(no_rank_BxG.reshape(-1), 0.0, adv_N)


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
  r_BxG = _groups(rewards, num_generations, minimum=1)  # PPO may sample one per prompt
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
