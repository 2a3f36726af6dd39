"""Tests for grpo_jax.losses against a float64 NumPy transcription of docs/maths.md."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import losses

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
LEVELS = ("token", "sequence")
EPS, EPS_HIGH, MAX_LEN = 0.2, 0.28, 8


def np_grpo_loss(logps, old, ref, adv, mask, loss_type, eps, eps_high, beta, kl_estimator, level, max_len):
  """docs/maths.md's loss, float64, written independently of the JAX code."""
  m = mask.astype(np.float64)
  log_ratio = logps - old
  if level == "sequence":
    seq = (log_ratio * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)
    log_ratio = np.broadcast_to(seq, logps.shape)
  r = np.exp(log_ratio)
  a = adv[:, None]
  loss_tok = -np.minimum(r * a, np.clip(r, 1 - eps, 1 + eps_high) * a)
  d = ref - logps
  kl = {"k1": -d, "k2": d**2 / 2, "k3": np.exp(d) - d - 1}[kl_estimator]
  loss_tok = loss_tok + beta * kl
  if loss_type == "grpo":
    loss = np.mean((loss_tok * m).sum(1) / np.maximum(m.sum(1), 1))
  elif loss_type in ("bnpo", "dapo"):
    loss = (loss_tok * m).sum() / max(m.sum(), 1)
  else:
    loss = (loss_tok * m).sum() / (m.shape[0] * max_len)
  token_mean = lambda x: (x * m).sum() / max(m.sum(), 1)
  low = (r < 1 - eps) & (a < 0)
  high = (r > 1 + eps_high) & (a > 0)
  metrics = {"kl": token_mean(kl), "clip_ratio/low_mean": token_mean(low),
             "clip_ratio/high_mean": token_mean(high), "clip_ratio/region_mean": token_mean(low | high)}
  return loss, metrics


def np_grad(f, x, h=1e-6):
  """Central finite differences of a float64 scalar function."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def make_batch(seed=0, n=4, t=5):
  """Random inputs whose token and sequence ratios straddle both clip bounds
  but stay >= 2e-3 from every kink (so finite differences are exact there).
  Row lengths 5, 3, 1, 0; advantages of both signs."""
  for s in itertools.count(seed):
    rng = np.random.default_rng(s)
    logps = rng.uniform(-3.0, -0.1, (n, t))
    # Row offsets push whole sequences past the bounds too (GSPO's ratio).
    log_ratio = rng.uniform(-0.6, 0.6, (n, t)) + np.array([[0.4], [-0.4], [0.0], [0.0]])[:n]
    mask = (np.arange(t)[None, :] < np.array([5, 3, 1, 0])[:n, None]).astype(np.float64)
    seq = (log_ratio * mask).sum(1) / np.maximum(mask.sum(1), 1)
    ratios = np.concatenate([np.exp(log_ratio).ravel(), np.exp(seq)])
    kinks = np.array([1 - EPS, 1 + EPS, 1 + EPS_HIGH])
    seq_clipped = np.exp(seq[0]) > 1 + EPS_HIGH and np.exp(seq[1]) < 1 - EPS
    # Rows 0 and 2 have A > 0: some token must sit between the two upper bounds.
    r = np.exp(log_ratio[[0, 2]]) * mask[[0, 2]]
    between_upper = ((r > 1 + EPS) & (r < 1 + EPS_HIGH)).any()
    if np.abs(ratios[:, None] - kinks).min() > 2e-3 and seq_clipped and between_upper:
      break
  adv = np.array([1.3, -0.7, 0.4, -1.1])[:n]
  ref = logps + rng.uniform(-0.5, 0.5, (n, t))
  return logps, logps - log_ratio, ref, adv, mask


def jax_loss(logps, old, ref, adv, mask, **kwargs):
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return losses.grpo_loss(f32(logps), f32(old), f32(ref), f32(adv), f32(mask), **kwargs)


@pytest.mark.parametrize("loss_type,kl_estimator,level",
                         list(itertools.product(LOSS_TYPES, KL_ESTIMATORS, LEVELS)))
def test_grpo_loss_matches_numpy_values_and_gradients(loss_type, kl_estimator, level):
  logps, old, ref, adv, mask = make_batch()
  kwargs = dict(loss_type=loss_type, epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.1,
                kl_estimator=kl_estimator, importance_sampling_level=level, max_completion_length=MAX_LEN)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: jax_loss(lp, old, ref, adv, mask, **kwargs), has_aux=True)(jnp.asarray(logps, jnp.float32))

  np_kwargs = (loss_type, EPS, EPS_HIGH, 0.1, kl_estimator, level, MAX_LEN)
  want_loss, want_metrics = np_grpo_loss(logps, old, ref, adv, mask, *np_kwargs)
  want_grad = np_grad(lambda lp: np_grpo_loss(lp, old, ref, adv, mask, *np_kwargs)[0], logps)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


def test_batch_clips_on_both_sides():
  """Guards the parametrised test: its data must exercise every clip branch."""
  logps, old, ref, adv, mask = make_batch()
  for level in LEVELS:
    _, metrics = np_grpo_loss(logps, old, ref, adv, mask, "grpo", EPS, EPS_HIGH, 0.0, "k3", level, MAX_LEN)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert metrics["clip_ratio/region_mean"] < 1


def test_epsilon_high_only_moves_the_upper_bound():
  logps, old, ref, adv, mask = make_batch()
  grad_fn = jax.grad(lambda lp, **kw: jax_loss(lp, old, None, adv, mask, beta=0.0, **kw)[0])
  lp = jnp.asarray(logps, jnp.float32)
  g_sym, g_high = grad_fn(lp, epsilon=EPS), grad_fn(lp, epsilon=EPS, epsilon_high=EPS_HIGH)
  r = np.exp(logps - old)
  between = (r > 1 + EPS) & (r < 1 + EPS_HIGH) & (adv[:, None] > 0) & (mask > 0)
  assert between.any()
  # Tokens between the two upper bounds are clipped (no gradient) only with the symmetric range.
  assert np.all(np.asarray(g_sym)[between] == 0) and np.all(np.asarray(g_high)[between] != 0)
  np.testing.assert_array_equal(np.asarray(g_sym)[~between], np.asarray(g_high)[~between])
  _, m_sym = jax_loss(logps, old, None, adv, mask, beta=0.0, epsilon=EPS)
  _, m_high = jax_loss(logps, old, None, adv, mask, beta=0.0, epsilon=EPS, epsilon_high=EPS_HIGH)
  assert m_sym["clip_ratio/low_mean"] == m_high["clip_ratio/low_mean"]
  assert m_sym["clip_ratio/high_mean"] > m_high["clip_ratio/high_mean"]


@pytest.mark.parametrize("level", LEVELS)
def test_masked_tokens_get_zero_gradient_whatever_they_hold(level):
  logps, old, ref, adv, mask = make_batch()
  # Padding garbage that would overflow exp() if it were not masked out.
  garbage = lambda x, v: np.where(mask > 0, x, v)
  dirty = (garbage(logps, 50.0), garbage(old, -50.0), garbage(ref, 1e4))
  for loss_type in LOSS_TYPES:
    kwargs = dict(loss_type=loss_type, beta=0.1, importance_sampling_level=level, max_completion_length=MAX_LEN)
    (loss, _), grad = jax.value_and_grad(
        lambda lp: jax_loss(lp, dirty[1], dirty[2], adv, mask, **kwargs), has_aux=True)(
            jnp.asarray(dirty[0], jnp.float32))
    clean_loss, _ = jax_loss(logps, old, ref, adv, mask, **kwargs)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)
    assert np.all(np.asarray(grad)[mask > 0] != 0.0)


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, LEVELS)))
def test_ratio_one_gives_the_plain_policy_gradient(loss_type, level):
  logps, _, _, adv, mask = make_batch()
  n = mask.shape[0]
  normaliser = {"grpo": n * np.maximum(mask.sum(1, keepdims=True), 1),
                "bnpo": mask.sum(), "dapo": mask.sum(), "dr_grpo": n * MAX_LEN}[loss_type]

  def loss_fn(lp):
    return jax_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask, loss_type=loss_type, beta=0.0,
                    importance_sampling_level=level, max_completion_length=MAX_LEN)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logps, jnp.float32))
  np.testing.assert_allclose(grad, -adv[:, None] * mask / normaliser, rtol=1e-6, atol=1e-8)
  assert metrics["clip_ratio/region_mean"] == 0.0 and metrics["kl"] == 0.0
  np.testing.assert_allclose(loss, -(adv[:, None] * mask / normaliser).sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_jit_matches_eager(loss_type):
  logps, old, ref, adv, mask = make_batch()
  kwargs = dict(loss_type=loss_type, epsilon_high=EPS_HIGH, kl_estimator="k2",
                importance_sampling_level="sequence", max_completion_length=MAX_LEN)
  eager = jax_loss(logps, old, ref, adv, mask, **kwargs)
  jitted = jax.jit(functools.partial(jax_loss, **kwargs))(logps, old, ref, adv, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), eager, jitted)


def test_traced_beta_equals_static_beta():
  logps, old, ref, adv, mask = make_batch()
  static = jax_loss(logps, old, ref, adv, mask, beta=0.3)[0]
  traced = jax.jit(lambda b: jax_loss(logps, old, ref, adv, mask, beta=b)[0])(0.3)
  np.testing.assert_allclose(static, traced, rtol=1e-6)


def test_beta_zero_ignores_ref_in_the_loss_but_still_reports_kl():
  logps, old, ref, adv, mask = make_batch()
  loss_without, m_without = jax_loss(logps, old, None, adv, mask, beta=0.0)
  loss_with, m_with = jax_loss(logps, old, ref, adv, mask, beta=0.0)
  assert loss_without == loss_with
  assert m_without["kl"] == 0.0
  _, want = np_grpo_loss(logps, old, ref, adv, mask, "grpo", EPS, EPS, 0.0, "k3", "token", MAX_LEN)
  np.testing.assert_allclose(m_with["kl"], want["kl"], rtol=1e-5)
  assert m_with["kl"] > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ppo"), r"loss_type.*\['grpo', 'bnpo', 'dapo', 'dr_grpo'\]"),
    (dict(kl_estimator="k4"), r"kl_estimator.*\['k1', 'k2', 'k3'\]"),
    (dict(importance_sampling_level="batch"), r"importance_sampling_level.*\['token', 'sequence'\]"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(beta=0.04), "ref_logps is None"),
])
def test_bad_options_raise_clear_errors(kwargs, match):
  logps, old, _, adv, mask = make_batch()
  with pytest.raises(ValueError, match=match):
    jax_loss(logps, old, None, adv, mask, **{"beta": 0.0, **kwargs})


# ----------------------------------------------------------------------------
# Token log-probs, entropy, SFT.
# ----------------------------------------------------------------------------


def np_log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_token_logps_and_entropy_match_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  logp_all = np_log_softmax(logits)
  want_logps = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
  want_entropy = -(np.exp(logp_all) * logp_all).sum(-1)
  np.testing.assert_allclose(losses.token_logps(logits, targets), want_logps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.token_entropy(logits), want_entropy, rtol=1e-5, atol=1e-5)
  # bf16 logits are upcast: the result is fp32 and close to the fp64 value of the bf16 inputs.
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = losses.token_logps(bf16, targets)
  assert got.dtype == jnp.float32
  want_bf16 = np.take_along_axis(np_log_softmax(np.asarray(bf16, np.float64)), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want_bf16, rtol=1e-5, atol=1e-5)


def _chunk_problem():
  rng = np.random.default_rng(2)
  hidden = jnp.asarray(rng.normal(size=(2, 7, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 13)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 13, (2, 7)))
  weights = jnp.asarray(rng.normal(size=(2, 2, 7)), jnp.float32)  # for a scalar of both outputs
  return hidden, w, targets, weights


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10])
def test_chunked_logps_and_entropy_equal_unchunked_with_gradients(chunk_size):
  hidden, w, targets, weights = _chunk_problem()

  def unchunked(h, w):
    logits = h @ w
    return losses.token_logps(logits, targets), losses.token_entropy(logits)

  def chunked(h, w):
    return losses.token_logps_and_entropy(h, targets, lambda hc: hc @ w, chunk_size=chunk_size)

  def scalar(fn):
    return lambda h, w: sum(jnp.sum(x * c) for x, c in zip(fn(h, w), weights))

  for got, want in zip(jax.jit(chunked)(hidden, w), unchunked(hidden, w)):
    assert got.shape == (2, 7)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  got_grads = jax.jit(jax.grad(scalar(chunked), argnums=(0, 1)))(hidden, w)
  want_grads = jax.grad(scalar(unchunked), argnums=(0, 1))(hidden, w)
  for got, want in zip(got_grads, want_grads):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_backward_never_holds_all_logits():
  # 32 chunks: a few chunk-sized temporaries (and the head's gradient) stay far
  # below the [N, T, V] logits.
  n, t, d, v = 2, 256, 16, 4096
  hidden, w = jnp.ones((n, t, d)), jnp.ones((d, v)) * 0.01
  targets = jnp.zeros((n, t), jnp.int32)
  full_logits_bytes = n * t * v * 4

  def temp_bytes(logps_fn):
    grad_fn = jax.jit(jax.grad(lambda h, w: jnp.sum(logps_fn(h, w)), argnums=(0, 1)))
    return grad_fn.lower(hidden, w).compile().memory_analysis().temp_size_in_bytes

  unchunked = temp_bytes(lambda h, w: losses.token_logps(h @ w, targets))
  chunked = temp_bytes(lambda h, w: losses.token_logps_and_entropy(h, targets, lambda c: c @ w, chunk_size=8)[0])
  assert unchunked >= full_logits_bytes  # the comparison means something
  assert chunked < full_logits_bytes / 2


def test_sft_loss_is_a_masked_token_mean():
  logps = np.array([[-1.0, -2.0, -np.inf], [-0.5, -np.inf, -np.inf]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, metrics = losses.sft_loss(jnp.asarray(logps), jnp.asarray(mask))
  np.testing.assert_allclose(loss, 3.5 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(3.5 / 3), rtol=1e-6)
  assert metrics["num_tokens"] == 3
  grad = jax.grad(lambda lp: losses.sft_loss(lp, mask)[0])(jnp.asarray(logps))
  np.testing.assert_array_equal(grad, -mask / 3)
