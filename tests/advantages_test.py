"""Tests for grpo_jax.advantages against float64 NumPy references (ddof=1): GRPO, RLOO,
REINFORCE++ (with and without baseline), GDPO; their config keys and their use in a train step."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import advantages, config as config_lib, sampling, train

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
    (np.zeros(4), 2, {"estimator": "ppo"}, r"\['grpo', 'rloo', 'reinforce_pp', "),
    (np.zeros(4), 2, {"estimator": "rloo", "scale": "none"}, "applies to estimator='grpo' only"),
    (np.zeros(4), 2, {"estimator": "reinforce_pp", "scale": "batch"}, "has its own scaling"),
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


# -- the other estimators: RLOO, REINFORCE++, REINFORCE++-baseline -------------------------
def _flat(vals) -> bool:
  return len(vals) < 2 or np.all(vals == vals[0])


def np_estimator(rewards, g, estimator, eps=1e-4):
  """docs/maths.md section 3.1, written out in float64, one completion at a time."""
  r = np.asarray(rewards, np.float64).reshape(-1, g)
  out = np.zeros_like(r)
  if estimator == "reinforce_pp":
    vals = r[~np.isnan(r)]
    if not _flat(vals):
      ok = ~np.isnan(r)
      out[ok] = (r[ok] - vals.mean()) / (vals.std(ddof=1) + eps)
    return out.ravel()
  centred = np.full_like(r, np.nan)
  for b, group in enumerate(r):
    ok = np.flatnonzero(~np.isnan(group))
    flat = _flat(group[ok])
    for i in ok:
      others = [group[j] for j in ok if j != i]
      if estimator == "rloo":
        out[b, i] = 0.0 if flat else group[i] - np.mean(others)
      else:  # reinforce_pp_baseline, before the batch std
        centred[b, i] = 0.0 if flat else group[i] - group[ok].mean()
  if estimator == "reinforce_pp_baseline":
    vals = centred[~np.isnan(centred)]
    if len(vals) >= 2 and np.any(vals != 0):
      out = np.where(np.isnan(centred), 0.0, centred / (vals.std(ddof=1) + eps))
  return out.ravel()


OTHERS = ["rloo", "reinforce_pp", "reinforce_pp_baseline"]


@pytest.mark.parametrize("estimator", OTHERS)
@pytest.mark.parametrize("rewards,g", [
    (REWARDS, 4),  # missing rewards, equal groups, a lone reward
    (np.random.default_rng(1).normal(size=24), 8),
    (np.random.default_rng(2).normal(size=10), 2),  # G = 2
    (np.array([1.0, 0.0, NAN, 2.0, 0.5, 0.5]), 2),  # G = 2: a group of one, an equal pair
])
def test_other_estimators_match_numpy(estimator, rewards, g):
  got = np.asarray(advantages.group_advantages(rewards, g, estimator=estimator))
  assert got.dtype == np.float32 and not np.isnan(got).any()
  np.testing.assert_allclose(got, np_estimator(rewards, g, estimator), rtol=1e-5, atol=1e-6)


def test_rloo_is_g_over_g_minus_1_times_the_centred_reward():
  rewards = np.random.default_rng(3).normal(size=(5, 6))
  got = np.asarray(advantages.group_advantages(rewards.ravel(), 6, estimator="rloo"))
  centred = rewards - rewards.mean(1, keepdims=True)
  np.testing.assert_allclose(got, (6 / 5 * centred).ravel(), rtol=1e-5, atol=1e-6)
  dr_grpo = np.asarray(advantages.group_advantages(rewards.ravel(), 6, scale="none"))
  np.testing.assert_allclose(got, 6 / 5 * dr_grpo, rtol=1e-5, atol=1e-6)
  # With a missing reward the factor is n / (n - 1) with n the group's scored rewards.
  got = np.asarray(advantages.group_advantages(np.array([3.0, NAN, -1.0, 2.0]), 4,
                                               estimator="rloo"))
  np.testing.assert_allclose(got, [3.0 - 0.5, 0.0, -1.0 - 2.5, 2.0 - 1.0], rtol=1e-6)


def test_rloo_with_two_generations_is_the_reward_difference():
  got = advantages.group_advantages(np.array([1.0, 0.25, 0.0, 0.0]), 2, estimator="rloo")
  np.testing.assert_allclose(got, [0.75, -0.75, 0.0, 0.0], rtol=1e-6)


def test_reinforce_pp_whitens_the_batch_and_ignores_groups():
  rewards = np.random.default_rng(4).normal(3.0, 2.0, size=32)
  rewards[[5, 17]] = NAN
  got = np.asarray(advantages.group_advantages(rewards, 4, estimator="reinforce_pp", eps=0.0))
  scored = ~np.isnan(rewards)
  assert np.all(got[~scored] == 0.0)
  np.testing.assert_allclose(got[scored].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(got[scored].std(ddof=1), 1.0, rtol=1e-5)
  # Affine changes of the rewards do not move it; regrouping (same order) neither.
  moved = advantages.group_advantages(10.0 * rewards - 7.0, 4, estimator="reinforce_pp", eps=0.0)
  np.testing.assert_allclose(moved, got, rtol=1e-4, atol=1e-5)
  regrouped = advantages.group_advantages(rewards, 8, estimator="reinforce_pp", eps=0.0)
  np.testing.assert_allclose(regrouped, got, rtol=1e-6)


def test_reinforce_pp_baseline_is_group_centred_with_unit_batch_std():
  rewards = np.random.default_rng(5).normal(size=(6, 4))
  rewards[1] = 0.3  # a group that agrees: exactly 0, but counted in the batch std
  got = np.asarray(advantages.group_advantages(rewards.ravel(), 4,
                                               estimator="reinforce_pp_baseline", eps=0.0))
  assert np.all(got[4:8] == 0.0)
  np.testing.assert_allclose(got.reshape(6, 4).sum(1), 0.0, atol=1e-5)
  np.testing.assert_allclose(got.std(ddof=1), 1.0, rtol=1e-5)
  # Not GRPO's batch scaling, which divides by the std of the raw rewards.
  batch = np.asarray(advantages.group_advantages(rewards.ravel(), 4, scale="batch", eps=0.0))
  assert not np.allclose(got, batch, rtol=1e-3)
  np.testing.assert_allclose(got / np.linalg.norm(got), batch / np.linalg.norm(batch), rtol=1e-4,
                             atol=1e-6)  # the same direction, another scale


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_group_baselines_give_exact_zero_to_groups_that_agree(estimator):
  rewards = np.array([0.9, 0.9, 0.9, 0.0, 1.0, 0.0, 1.0, 0.0, 0.9], np.float32)
  got = np.asarray(advantages.group_advantages(rewards, 3, estimator=estimator))
  assert np.all(got[:3] == 0.0) and np.all(got[3:] != 0.0)


def test_reinforce_pp_moves_a_group_that_agrees_but_not_a_batch_that_agrees():
  got = np.asarray(advantages.group_advantages(np.array([1.0, 1.0, 0.0, 1.0]), 2,
                                               estimator="reinforce_pp"))
  assert got[0] == got[1] > 0 and got[2] < 0
  flat = np.full(6, 0.9, np.float32)
  for estimator in advantages.ESTIMATORS:
    assert np.all(np.asarray(advantages.group_advantages(flat, 3, estimator=estimator)) == 0.0)
  missing = np.array([NAN, NAN, NAN, 2.0])  # one scored reward in the whole batch
  assert np.all(np.asarray(advantages.group_advantages(missing, 2, estimator="reinforce_pp")) == 0)


@pytest.mark.parametrize("estimator", advantages.ESTIMATORS)
def test_estimators_jit_match_eager(estimator):
  fn = jax.jit(functools.partial(advantages.group_advantages, estimator=estimator),
               static_argnums=1)
  np.testing.assert_allclose(fn(REWARDS, 4), advantages.group_advantages(
      REWARDS, 4, estimator=estimator), rtol=1e-6)


def test_default_estimator_is_grpo():
  rewards = np.random.default_rng(6).normal(size=16)
  for scale in advantages.SCALES:
    np.testing.assert_array_equal(
        advantages.group_advantages(rewards, 4, scale=scale),
        advantages.group_advantages(rewards, 4, estimator="grpo", scale=scale))


# -- GDPO: multi_reward_advantages ---------------------------------------------------------
def np_gdpo(rewards_nk, weights, g, scale="group", eps=1e-4):
  """docs/maths.md section 3.2 in float64: each reward in its group, weighted sum, batch."""
  r = np.asarray(rewards_nk, np.float64)
  n, k = r.shape
  normed = np.zeros_like(r)
  for col in range(k):
    column = r[:, col]
    batch_std = np.nanstd(column, ddof=1)
    for start in range(0, n, g):
      group = column[start:start + g]
      ok = ~np.isnan(group)
      if _flat(group[ok]):
        continue
      std = {"group": group[ok].std(ddof=1), "batch": batch_std, "none": None}[scale]
      centred = group[ok] - group[ok].mean()
      normed[start + np.flatnonzero(ok), col] = centred if std is None else centred / (std + eps)
  scored = ~np.all(np.isnan(r), axis=1)
  s = np.where(scored, normed @ np.asarray(weights, np.float64), np.nan)
  out = np.zeros(n)
  vals = s[scored]
  if not _flat(vals):
    out[scored] = (vals - vals.mean()) / (vals.std(ddof=1) + eps)
  for start in range(0, n, g):
    group = s[start:start + g]
    if _flat(group[~np.isnan(group)]):
      out[start:start + g] = 0.0
  return out


MULTI = np.array([
    [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0],     # both rewards rank
    [1.0, 0.2], [1.0, 0.9], [1.0, 0.4], [1.0, 0.4],     # the first agrees
    [NAN, 1.0], [0.0, NAN], [NAN, NAN], [1.0, 0.0],     # missing values, an unscored row
    [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5],     # nothing ranks
])


@pytest.mark.parametrize("scale", advantages.SCALES)
@pytest.mark.parametrize("rewards,weights,g", [
    (MULTI, [1.0, 0.5], 4),
    (MULTI, [2.0, -1.0], 2),  # G = 2
    (np.random.default_rng(7).normal(size=(24, 3)) * [1.0, 10.0, 0.1], [1.0, 1.0, 2.0], 6),
])
def test_gdpo_matches_numpy(scale, rewards, weights, g):
  got = np.asarray(advantages.multi_reward_advantages(rewards, weights, g, scale=scale))
  assert got.dtype == np.float32 and got.shape == (len(rewards),) and not np.isnan(got).any()
  np.testing.assert_allclose(got, np_gdpo(rewards, weights, g, scale), rtol=1e-5, atol=1e-5)


def test_gdpo_missing_and_flat_rows_are_exactly_zero():
  got = np.asarray(advantages.multi_reward_advantages(MULTI, [1.0, 0.5], 4))
  assert got[10] == 0.0  # every function returned None
  assert np.all(got[12:16] == 0.0)  # nothing ranks this group
  assert np.all(got[8:10] != 0.0)  # one reward present: it counts


def test_gdpo_is_blind_to_each_rewards_scale_unlike_the_weighted_sum():
  rewards = np.random.default_rng(8).integers(0, 3, size=(32, 2)).astype(np.float64)
  stretched = rewards * [1.0, 100.0]
  gdpo = advantages.multi_reward_advantages
  np.testing.assert_allclose(gdpo(stretched, [1.0, 1.0], 4, eps=1e-9),
                             gdpo(rewards, [1.0, 1.0], 4, eps=1e-9), rtol=1e-4, atol=1e-5)
  summed = lambda r: advantages.group_advantages(r.sum(1), 4)  # noqa: E731
  assert not np.allclose(summed(stretched), summed(rewards), atol=1e-2)


def test_gdpo_has_zero_mean_unit_std_over_the_scored_batch():
  rewards = np.random.default_rng(9).normal(size=(40, 3))
  rewards[[3, 7], :] = NAN
  rewards[11, 1] = NAN
  got = np.asarray(advantages.multi_reward_advantages(rewards, [1.0, 2.0, 0.5], 8, eps=0.0))
  scored = np.arange(40)[~np.isin(np.arange(40), [3, 7])]
  assert got[3] == got[7] == 0.0
  np.testing.assert_allclose(got[scored].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(got[scored].std(ddof=1), 1.0, rtol=1e-5)


def test_gdpo_with_one_reward_is_grpo_whitened_over_the_batch():
  rewards = np.random.default_rng(10).normal(size=24)
  grpo = np.asarray(advantages.group_advantages(rewards, 4), np.float64)
  whitened = (grpo - grpo.mean()) / (grpo.std(ddof=1) + 1e-4)
  got = advantages.multi_reward_advantages(rewards[:, None], [3.0], 4)
  np.testing.assert_allclose(got, whitened, rtol=1e-4, atol=1e-5)


def test_gdpo_jit_matches_eager():
  fn = jax.jit(advantages.multi_reward_advantages, static_argnums=2)
  np.testing.assert_allclose(fn(MULTI, np.array([1.0, 0.5]), 4),
                             advantages.multi_reward_advantages(MULTI, [1.0, 0.5], 4), rtol=1e-6)


@pytest.mark.parametrize("rewards,weights,g,kwargs,match", [
    (np.zeros(8), [1.0], 4, {}, r"shape \[N, K\]"),
    (np.zeros((6, 2)), [1.0, 1.0], 4, {}, "divisible by num_generations=4"),
    (np.zeros((8, 2)), [1.0], 4, {}, r"weights shape \[K\]"),
    (np.zeros((8, 2)), [1.0, 1.0], 1, {}, "num_generations must be an int >= 2"),
    (np.zeros((8, 2)), [1.0, 1.0], 4, {"scale": "max"}, "scale='max' is not supported"),
])
def test_gdpo_bad_arguments_raise(rewards, weights, g, kwargs, match):
  with pytest.raises(ValueError, match=match):
    advantages.multi_reward_advantages(rewards, weights, g, **kwargs)


# -- config and the training step ----------------------------------------------------------
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny_arithmetic.py")


def tiny_config(**rl):
  cfg = config_lib.from_file(TINY)
  for key, value in rl.items():
    cfg.rl[key] = value
  return cfg


def test_config_defaults_are_todays_advantages():
  rl = config_lib.defaults().rl
  assert (rl.advantage_estimator, rl.multi_objective_aggregation, rl.scale_rewards) == (
      "grpo", "sum_then_normalize", "group")


@pytest.mark.parametrize("rl, message", [
    ({"advantage_estimator": "reinforce++"},
     r"config.rl.advantage_estimator='reinforce\+\+'; expected one of \['grpo', 'rloo', "),
    ({"advantage_estimator": "rloo", "scale_rewards": "none"},
     "config.rl.scale_rewards='none' applies to advantage_estimator='grpo' only"),
    ({"multi_objective_aggregation": "gdpo"},
     r"expected one of \['sum_then_normalize', 'normalize_then_sum'\]"),
    ({"multi_objective_aggregation": "normalize_then_sum", "advantage_estimator": "rloo"},
     "needs advantage_estimator='grpo', not 'rloo'"),
])
def test_config_rejects_bad_advantage_settings(rl, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(tiny_config(**rl), data=False)


@pytest.mark.parametrize("rl", [
    {"advantage_estimator": e} for e in advantages.ESTIMATORS] + [
    {"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "none"}])
def test_config_accepts_every_estimator(rl):
  config_lib.validate(tiny_config(**rl), data=False)


class _Stop(Exception):
  pass


def length_reward(completions, **_):
  """Spread in every group, even from the tiny random model: the completion's length."""
  return [float(len(c)) for c in completions]


def fake_sample(graphdef, params, prompts_BxP, prompt_mask_BxP, key, *, num_generations,
                max_new_tokens, pad_id, **_):
  """The sampler's output without its compile (~20 s on 2 cores): random character tokens of
  random lengths, the same for the same key."""
  n = prompts_BxP.shape[0] * num_generations
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  lengths = rng.integers(1, max_new_tokens + 1, size=n)
  mask = np.arange(max_new_tokens)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(40, 100, size=mask.shape), pad_id)
  return sampling.Completions(tokens=jnp.asarray(tokens, jnp.int32),
                              mask=jnp.asarray(mask, jnp.int32),
                              logps=jnp.zeros(mask.shape, jnp.float32),
                              lengths=jnp.asarray(lengths, jnp.int32),
                              truncated=jnp.asarray(lengths == max_new_tokens))


def test_train_step_uses_the_configured_advantages(tmp_path, monkeypatch):
  """One step of the tiny config per setting, stopped before the update: the advantages the
  update would get are the estimator's of that step's rewards (the same completions each time;
  the sampler is faked, the rest of the step is train.py's)."""
  seen = {}
  real_score = train.score

  def spy_score(*args, **kwargs):
    out = real_score(*args, **kwargs)
    seen["scores"], seen["reward"] = out[1]["scores"], out[2]
    return out

  def stop(rl, out, lengths, adv_local, *args):
    seen["adv"] = np.asarray(adv_local)
    raise _Stop

  monkeypatch.setattr(train, "score", spy_score)
  monkeypatch.setattr(train, "update_batch", stop)
  monkeypatch.setattr(train.sampling, "sample_jit", fake_sample)
  got = {}
  for name, rl in [("grpo", {}), ("rloo", {"advantage_estimator": "rloo"}),
                   ("gdpo", {"multi_objective_aggregation": "normalize_then_sum"})]:
    cfg = tiny_config(**rl)
    cfg.rewards = [(length_reward, 1.0), ("tag_count", 0.5)]
    cfg.train.steps, cfg.eval.num_problems = 1, 0
    with pytest.raises(_Stop):
      train.train_and_evaluate(cfg, str(tmp_path / name))
    got[name] = dict(seen)
  g = 8
  for name in got:  # the same completions: the same rewards
    np.testing.assert_array_equal(got[name]["scores"], got["grpo"]["scores"])
  reward = got["grpo"]["reward"]
  assert np.std(reward) > 0
  np.testing.assert_allclose(got["grpo"]["adv"], np_group_advantages(reward, g, "group"),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["rloo"]["adv"], np_estimator(reward, g, "rloo"), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(got["gdpo"]["adv"], np_gdpo(got["grpo"]["scores"], [1.0, 0.5], g),
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(got["rloo"]["adv"], got["grpo"]["adv"], atol=1e-3)
