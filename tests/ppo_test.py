"""Tests for grpo_jax.ppo and the critic (models.ValueModel) against float64 NumPy references.

The references are written from docs/maths.md's PPO section, independently of
the JAX code: GAE as a plain loop over each row's real tokens (the masked ones
taken out first), the value loss and its gradient by hand.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import ppo, sharding
from grpo_jax.models import (ValueModel, init_model, init_value_model, tiny, transformer,
                             value_model_from_params)

GAMMA_LAM = [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.3), (0.97, 1.0)]


# -- NumPy references ---------------------------------------------------------------------------
def np_gae(rewards, values, mask, gamma, lam):
  """GAE row by row: keep the real tokens, run the textbook loop, put the results back."""
  n, t = rewards.shape
  adv, ret = np.zeros((n, t)), np.zeros((n, t))
  for i in range(n):
    idx = np.flatnonzero(mask[i])
    r, v = rewards[i, idx], values[i, idx]
    a = np.zeros(len(idx))
    for k in reversed(range(len(idx))):
      v_next = v[k + 1] if k + 1 < len(idx) else 0.0
      a_next = a[k + 1] if k + 1 < len(idx) else 0.0
      a[k] = r[k] + gamma * v_next - v[k] + gamma * lam * a_next
    adv[i, idx] = a
    ret[i, idx] = a + v
  return adv, ret


def np_token_rewards(seq_rewards, mask, kl, kl_coef):
  out = np.zeros(mask.shape)
  for i in range(mask.shape[0]):
    idx = np.flatnonzero(mask[i])
    if kl is not None:
      out[i, idx] -= kl_coef * kl[i, idx]
    if len(idx):
      out[i, idx[-1]] += seq_rewards[i]
  return out


def np_whiten(x, mask, shift_mean=True):
  vals = x[mask > 0]
  mean, var = vals.mean(), vals.var(ddof=1)
  out = (x - mean) / np.sqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return np.where(mask > 0, out, 0.0)


def np_value_loss(v, old, ret, mask, c):
  """(loss, d loss / d v, branch per element): the gradient derived by hand.

  max(a, b) with a = (v - R)^2, b = (clip(v) - R)^2: when b wins, v is outside the clip range
  (inside it b == a), so clip(v) is constant in v and the gradient is 0; otherwise it is
  2 (v - R) from a. Times 0.5 and 1 / (real tokens).
  """
  lo, hi = old - c, old + c
  v_clip = np.clip(v, lo, hi)
  a, b = (v - ret) ** 2, (v_clip - ret) ** 2
  n = mask.sum()
  loss = 0.5 * (np.maximum(a, b) * mask).sum() / n
  grad = np.where(b > a, 0.0, (v - ret)) * mask / n
  branch = np.where((v >= lo) & (v <= hi), "inside",
                    np.where(v > hi, np.where(b > a, "above_clipped", "above_unclipped"),
                             np.where(b > a, "below_clipped", "below_unclipped")))
  return loss, grad, branch


def np_explained_variance(v, ret, mask):
  m = mask > 0
  return 1 - np.var(ret[m] - v[m]) / np.var(ret[m])


def masks(rng, n, t):
  """Rows: full, stopped early (EOS inside), a single token, empty, with holes, random lengths."""
  m = np.zeros((n, t), np.int32)
  m[0] = 1
  m[1, :3] = 1
  m[2, :1] = 1
  # m[3] empty
  m[4] = 1
  m[4, [2, 5]] = 0  # masked tokens inside the row
  for i in range(5, n):
    m[i, :rng.integers(1, t + 1)] = 1
  return m


# -- GAE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_gae_matches_numpy_float64(gamma, lam):
  rng = np.random.default_rng(0)
  n, t = 8, 9
  mask = masks(rng, n, t)
  rewards, values = rng.normal(size=(n, t)), rng.normal(size=(n, t))
  want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
  with jax.enable_x64(True):
    adv, ret = jax.jit(ppo.gae)(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-12, atol=1e-12)
  adv32, ret32 = ppo.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                         mask, gamma=gamma, lam=lam)
  assert adv32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(adv32), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret32), want_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lam1_is_discounted_return_minus_value(gamma):
  rng = np.random.default_rng(1)
  n, t = 4, 7
  lengths = [7, 4, 1, 6]
  mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int32)
  rewards, values = rng.normal(size=(n, t)), rng.normal(size=(n, t))
  with jax.enable_x64(True):
    adv, ret = map(np.asarray, ppo.gae(rewards, values, mask, gamma=gamma, lam=1.0))
  for i, length in enumerate(lengths):
    for s in range(length):
      g = sum(gamma ** (k - s) * rewards[i, k] for k in range(s, length))
      assert ret[i, s] == pytest.approx(g, abs=1e-12)
      assert adv[i, s] == pytest.approx(g - values[i, s], abs=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_gae_lam0_is_td_error(gamma):
  rng = np.random.default_rng(2)
  n, t = 4, 6
  lengths = [6, 3, 1, 5]
  mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int32)
  rewards, values = rng.normal(size=(n, t)), rng.normal(size=(n, t))
  with jax.enable_x64(True):
    adv, _ = map(np.asarray, ppo.gae(rewards, values, mask, gamma=gamma, lam=0.0))
  for i, length in enumerate(lengths):
    for s in range(length):
      v_next = values[i, s + 1] if s + 1 < length else 0.0  # terminal after the stop token
      assert adv[i, s] == pytest.approx(rewards[i, s] + gamma * v_next - values[i, s], abs=1e-12)
    assert np.all(adv[i, length:] == 0)


def test_gae_eos_inside_is_terminal_and_padding_never_leaks():
  """A row stopped at token 2 of 6: the values and rewards after it (here inf / nan / large) do
  not reach it; its advantages and returns are 0 there."""
  mask = np.array([[1, 1, 1, 0, 0, 0]], np.int32)
  rewards = np.array([[0.1, -0.2, 1.0, np.nan, 5.0, np.inf]], np.float32)
  values = np.array([[0.3, 0.5, 0.7, 100.0, np.inf, np.nan]], np.float32)
  adv, ret = map(np.asarray, ppo.gae(rewards, values, mask, gamma=1.0, lam=0.9))
  want_adv, want_ret = np_gae(np.nan_to_num(rewards), np.nan_to_num(values), mask, 1.0, 0.9)
  assert np.all(np.isfinite(adv)) and np.all(np.isfinite(ret))
  np.testing.assert_allclose(adv, want_adv, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, atol=1e-6)
  assert adv[0, 2] == pytest.approx(1.0 - 0.7)  # last token: r - V, nothing after it
  assert np.all(adv[0, 3:] == 0) and np.all(ret[0, 3:] == 0)


def test_gae_masked_token_inside_a_row_is_as_if_absent():
  rng = np.random.default_rng(3)
  rewards, values = rng.normal(size=(1, 6)), rng.normal(size=(1, 6))
  mask = np.array([[1, 1, 0, 1, 0, 1]], np.int32)
  keep = np.flatnonzero(mask[0])
  with jax.enable_x64(True):
    adv, ret = map(np.asarray, ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8))
    adv_c, ret_c = map(np.asarray, ppo.gae(rewards[:, keep], values[:, keep],
                                           np.ones((1, len(keep)), np.int32), gamma=0.9, lam=0.8))
  np.testing.assert_allclose(adv[:, keep], adv_c, atol=1e-12)
  np.testing.assert_allclose(ret[:, keep], ret_c, atol=1e-12)
  assert adv[0, 2] == 0 and adv[0, 4] == 0


def test_gae_has_no_gradient():
  rewards, values = jnp.ones((2, 3)), jnp.full((2, 3), 0.5)
  mask = jnp.ones((2, 3), jnp.int32)
  g = jax.grad(lambda v: ppo.gae(rewards, v, mask)[0].sum())(values)
  assert np.all(np.asarray(g) == 0)


# -- per-token rewards --------------------------------------------------------------------------
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_token_rewards_matches_numpy(kl_coef):
  rng = np.random.default_rng(4)
  n, t = 8, 7
  mask = masks(rng, n, t)
  seq = rng.normal(size=n)
  kl = rng.normal(size=(n, t))
  kl_padded = np.where(mask > 0, kl, np.nan)  # padding's kl is never read
  with jax.enable_x64(True):
    got = np.asarray(ppo.token_rewards(seq, mask, kl=kl_padded, kl_coef=kl_coef))
    no_kl = np.asarray(ppo.token_rewards(seq, mask))
  np.testing.assert_allclose(got, np_token_rewards(seq, mask, kl, kl_coef), atol=1e-12)
  np.testing.assert_allclose(no_kl, np_token_rewards(seq, mask, None, 0.0), atol=1e-12)
  # The reward sits on the last real token: the stop token of row 1, the last of the holey row 4.
  assert no_kl[1, 2] == seq[1] and np.all(no_kl[1, 3:] == 0) and np.all(no_kl[1, :2] == 0)
  assert no_kl[4, t - 1] == seq[4]
  assert np.all(no_kl[3] == 0)  # an empty row gets nothing
  assert no_kl.sum() == pytest.approx(seq[mask.sum(1) > 0].sum())


def test_last_token_mask():
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
  want = np.array([[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], bool)
  np.testing.assert_array_equal(np.asarray(ppo.last_token_mask(mask)), want)


# -- whitening, explained variance --------------------------------------------------------------
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
  rng = np.random.default_rng(5)
  mask = masks(rng, 8, 7)
  x = rng.normal(loc=3.0, scale=2.0, size=mask.shape)
  x_padded = np.where(mask > 0, x, np.inf)
  with jax.enable_x64(True):
    got = np.asarray(ppo.whiten(x_padded, mask, shift_mean=shift_mean))
  np.testing.assert_allclose(got, np_whiten(x, mask, shift_mean), atol=1e-10)
  real = got[mask > 0]
  if shift_mean:  # mean 0 and unbiased std 1 over the real tokens
    assert real.mean() == pytest.approx(0.0, abs=1e-10)
    assert real.std(ddof=1) == pytest.approx(1.0, abs=1e-6)
  assert np.all(got[mask == 0] == 0)


def test_whiten_single_token_is_finite():
  got = np.asarray(ppo.whiten(jnp.array([[2.0, 7.0]]), jnp.array([[1, 0]])))
  assert np.all(np.isfinite(got)) and got[0, 0] == 0.0


def test_explained_variance():
  rng = np.random.default_rng(6)
  mask = masks(rng, 8, 7)
  ret = rng.normal(size=mask.shape)
  v = ret + 0.3 * rng.normal(size=mask.shape)
  with jax.enable_x64(True):
    ev = float(ppo.explained_variance(v, ret, mask))
    perfect = float(ppo.explained_variance(ret, ret, mask))
    mean_only = float(ppo.explained_variance(np.full(mask.shape, ret[mask > 0].mean()), ret, mask))
    flat = float(ppo.explained_variance(v, np.ones(mask.shape), mask))
  assert ev == pytest.approx(np_explained_variance(v, ret, mask), abs=1e-12)
  assert 0.5 < ev < 1
  assert perfect == pytest.approx(1.0) and mean_only == pytest.approx(0.0, abs=1e-12)
  assert flat == 0.0  # returns that do not vary: undefined, reported as 0


# -- value loss ---------------------------------------------------------------------------------
def value_loss_case():
  """Values placed so that every branch of the clipped loss is hit (c = 0.2)."""
  old = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5, -1.0, 2.0]])
  v = np.array([[0.1, 0.5, 0.5, -0.5, -0.5, 1.08], [0.9, 0.4, 0.0, 0.6, 3.0, -7.0]])
  ret = np.array([[0.3, 1.0, -1.0, -1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 0.2, 9.0, 1.0]])
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
  return v, old, ret, mask


@pytest.mark.parametrize("cliprange_value", [0.2, 0.05])
def test_value_loss_values_and_gradients_float64(cliprange_value):
  v, old, ret, mask = value_loss_case()
  want_loss, want_grad, branch = np_value_loss(v, old, ret, mask, cliprange_value)
  if cliprange_value == 0.2:
    assert set(branch[mask > 0]) == {"inside", "above_clipped", "above_unclipped",
                                     "below_clipped", "below_unclipped"}
  with jax.enable_x64(True):
    def fn(v_):
      return ppo.value_loss(v_, old, ret, mask, cliprange_value=cliprange_value)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(jnp.asarray(v))
    assert loss.dtype == jnp.float64
    assert float(loss) == pytest.approx(want_loss, abs=1e-14)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-14)
    # A central difference agrees too (no value sits on a branch boundary).
    eps = 1e-6
    fd = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
      d = np.zeros_like(v)
      d[idx] = eps
      fd[idx] = (float(fn(v + d)[0]) - float(fn(v - d)[0])) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-8)
  m = mask > 0
  lo, hi = old - cliprange_value, old + cliprange_value
  clipped_wins = (np.clip(v, lo, hi) - ret) ** 2 > (v - ret) ** 2
  assert float(metrics["value/loss"]) == pytest.approx(want_loss)
  assert float(metrics["value/clip_fraction"]) == pytest.approx(clipped_wins[m].mean())
  assert float(metrics["value/mean"]) == pytest.approx(v[m].mean())
  assert float(metrics["value/returns_mean"]) == pytest.approx(ret[m].mean())
  assert float(metrics["value/explained_variance"]) == pytest.approx(
      np_explained_variance(v, ret, mask))


def test_value_loss_inside_the_clip_range_is_plain_mse():
  rng = np.random.default_rng(7)
  old = rng.normal(size=(3, 5))
  v = old + rng.uniform(-0.1, 0.1, size=old.shape)
  ret = rng.normal(size=old.shape)
  mask = np.ones(old.shape, np.int32)
  loss, metrics = ppo.value_loss(v, old, ret, mask, cliprange_value=0.2)
  assert float(loss) == pytest.approx(0.5 * np.mean((v - ret) ** 2), rel=1e-5)
  assert float(metrics["value/clip_fraction"]) == 0.0
  # The old values and the returns are constants: no gradient reaches them.
  g_old, g_ret = jax.grad(lambda o, r: ppo.value_loss(v, o, r, mask)[0], argnums=(0, 1))(
      jnp.asarray(old), jnp.asarray(ret))
  assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_ret) == 0)


# -- the critic ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy():
  return init_model(tiny.config(tiny.vocab_size()), seed=0)


def params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def test_value_model_from_policy_copies_the_trunk_and_zeroes_the_head(policy):
  critic = ValueModel.from_policy(policy)
  p, c = params(policy), params(critic)
  assert set(c) == {"trunk", "value_head", "value_bias"}
  assert set(c["trunk"]) == set(p)
  for name, x in p.items():
    np.testing.assert_array_equal(np.asarray(c["trunk"][name]), np.asarray(x))
    assert c["trunk"][name] is not x  # its own buffer: donating the policy's leaves it intact
  assert c["value_head"].shape == (policy.cfg.hidden_size, 1) and c["value_bias"].shape == (1,)
  tokens = jax.random.randint(jax.random.key(0), (3, 5), 0, policy.cfg.vocab_size)
  values = critic(tokens)
  assert values.shape == (3, 5) and values.dtype == jnp.float32
  assert np.all(np.asarray(values) == 0.0)


def test_value_model_of_an_untied_policy_has_no_lm_head():
  cfg = dataclasses.replace(tiny.config(tiny.vocab_size()), tie_word_embeddings=False)
  pol = init_model(cfg, seed=1)
  assert "lm_head" in params(pol)
  critic = ValueModel.from_policy(pol)
  assert "lm_head" not in params(critic)["trunk"]
  for name, x in params(critic)["trunk"].items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(params(pol)[name]))
  assert "lm_head" not in params(init_value_model(cfg))["trunk"]


def test_value_model_gradients_reach_head_and_trunk(policy):
  critic = ValueModel.from_policy(policy)
  graphdef, state = nnx.split(critic)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, policy.cfg.vocab_size)
  target = jax.random.normal(jax.random.key(2), (2, 6))

  def loss(state):
    return jnp.mean((nnx.merge(graphdef, state)(tokens) - target) ** 2)

  grad = jax.jit(jax.grad(loss))
  g = nnx.to_pure_dict(grad(state))
  # Zero head: the head and bias get a gradient, the trunk none yet (dV/dh = head = 0).
  assert np.abs(np.asarray(g["value_head"])).sum() > 0 and np.asarray(g["value_bias"])[0] != 0
  assert all(np.all(np.asarray(x) == 0) for x in g["trunk"].values())
  head = jax.random.normal(jax.random.key(3), (policy.cfg.hidden_size, 1))
  critic = ValueModel.from_policy(policy, head=head, bias=jnp.array([0.5]))
  g = nnx.to_pure_dict(grad(nnx.split(critic)[1]))
  for name, x in g["trunk"].items():
    assert np.abs(np.asarray(x)).sum() > 0, name


def test_value_model_params_are_sharded_like_the_policy(policy):
  mesh = sharding.make_mesh()
  critic = ValueModel.from_policy(policy)
  pol_sh = sharding.param_shardings(mesh, params(policy))
  crit_sh = sharding.param_shardings(mesh, params(critic))
  for name, sh in pol_sh.items():
    assert crit_sh["trunk"][name].spec == sh.spec, name
  assert crit_sh["value_head"].spec == jax.sharding.PartitionSpec()
  assert crit_sh["value_bias"].spec == jax.sharding.PartitionSpec()
  # Through nnx.State as a run holds it (paths end in `.value`): the same specs.
  _, state = nnx.split(critic)
  state_sh = nnx.to_pure_dict(sharding.param_shardings(mesh, state))
  assert state_sh["trunk"]["q_proj"].spec == pol_sh["q_proj"].spec
  # A policy placed on a mesh gives a critic on that mesh, head included.
  graphdef, pol_state = nnx.split(policy)
  placed = nnx.merge(graphdef, jax.device_put(pol_state,
                                              sharding.param_shardings(mesh, pol_state)))
  placed_critic = params(ValueModel.from_policy(placed))
  for name, sh in crit_sh["trunk"].items():
    assert placed_critic["trunk"][name].sharding == sh, name
  assert placed_critic["value_head"].sharding == crit_sh["value_head"]
  assert placed_critic["value_bias"].sharding == crit_sh["value_bias"]


def test_completion_values_equals_a_full_forward(policy):
  """Shared-prefix values vs one plain forward over [left-padded prompt; completion]."""
  head = jax.random.normal(jax.random.key(4), (policy.cfg.hidden_size, 1))
  critic = ValueModel.from_policy(policy, head=head, bias=jnp.array([0.25]))
  vocab, g = policy.cfg.vocab_size, 2
  prompts = jax.random.randint(jax.random.key(5), (2, 5), 0, vocab)
  prompt_mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)  # left-padded
  completions = jax.random.randint(jax.random.key(6), (4, 6), 0, vocab)
  completion_mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                               [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], jnp.int32)
  values_fn = jax.jit(ppo.completion_values, static_argnames=("num_generations",))
  got = values_fn(critic, prompts, prompt_mask, completions, completion_mask, num_generations=g)
  assert got.shape == (4, 6)
  full = jnp.concatenate([jnp.repeat(prompts, g, axis=0), completions], axis=1)
  full_mask = jnp.concatenate([jnp.repeat(prompt_mask, g, axis=0), completion_mask], axis=1)
  graphdef, state = nnx.split(critic)
  forward = jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, attention_mask_BxL=m))
  want = forward(state, full, full_mask)[:, 5 - 1:-1]  # value t before token t
  m = np.asarray(completion_mask) > 0
  np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(got)).max() > 1e-3  # not trivially zero
  # T = 1 takes the prompt-only path.
  one = values_fn(critic, prompts, prompt_mask, completions[:, :1], completion_mask[:, :1],
                  num_generations=g)
  np.testing.assert_allclose(np.asarray(one), np.asarray(got)[:, :1], atol=2e-5)


def test_value_model_is_the_transformer_trunk():
  """No second copy of the architecture: the trunk is a `Transformer`."""
  critic = init_value_model(tiny.config(tiny.vocab_size()))
  assert isinstance(critic.trunk, transformer.Transformer)
  assert np.all(np.asarray(critic(jnp.zeros((1, 3), jnp.int32))) == 0.0)


def test_value_model_from_params_round_trip(policy):
  head = jax.random.normal(jax.random.key(7), (policy.cfg.hidden_size, 1))
  critic = ValueModel.from_policy(policy, head=head, bias=jnp.array([-1.0]))
  saved = jax.tree.map(np.asarray, params(critic))
  restored = value_model_from_params(policy.cfg, saved)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params(restored)),
                          jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(path))
  tokens = jnp.arange(6, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(critic(tokens)))
  missing = {k: v for k, v in saved.items() if k != "value_bias"}
  with pytest.raises(ValueError, match="missing.*value_bias"):
    value_model_from_params(policy.cfg, missing)
  bad = dict(saved, value_head=np.zeros((3, 1), np.float32))
  with pytest.raises(ValueError, match="value_head"):
    value_model_from_params(policy.cfg, bad)


def test_value_loss_gradient_through_completion_values_with_remat(policy):
  """The critic's update path: value_loss(completion_values(...)), same gradients with remat."""
  head = jax.random.normal(jax.random.key(8), (policy.cfg.hidden_size, 1))
  graphdef, state = nnx.split(ValueModel.from_policy(policy, head=head))
  prompts = jax.random.randint(jax.random.key(9), (1, 4), 0, policy.cfg.vocab_size)
  prompt_mask = jnp.array([[0, 1, 1, 1]], jnp.int32)
  completions = jax.random.randint(jax.random.key(10), (2, 5), 0, policy.cfg.vocab_size)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
  old = jnp.zeros((2, 5))
  returns = jnp.ones((2, 5))

  @functools.partial(jax.jit, static_argnames="remat")
  def grad(state, remat):
    def loss(state):
      v = ppo.completion_values(nnx.merge(graphdef, state), prompts, prompt_mask, completions,
                                mask, num_generations=2, remat=remat)
      return ppo.value_loss(v, old, returns, mask, cliprange_value=10.0)[0]
    return jax.grad(loss)(state)

  plain, full = nnx.to_pure_dict(grad(state, "none")), nnx.to_pure_dict(grad(state, "full"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(full)):
    # float32 sums in another order: error relative to the parameter's largest entry (~50).
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6 * np.abs(b).max(),
                               err_msg=str(path))
  assert all(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(plain))
