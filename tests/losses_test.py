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
  # At sequence level the clip fractions count sequences (TRL's), each row's value once.
  frac = (lambda x: x[:, 0].mean()) if level == "sequence" else token_mean
  low = (r < 1 - eps) & (a < 0)
  high = (r > 1 + eps_high) & (a > 0)
  metrics = {"kl": token_mean(kl), "clip_ratio/low_mean": frac(low),
             "clip_ratio/high_mean": frac(high), "clip_ratio/region_mean": frac(low | high)}
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
    (dict(loss_type="ppo"),
     r"loss_type.*\['grpo', 'bnpo', 'dapo', 'dr_grpo', 'cispo', 'gmpo', 'sapo'\]"),
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
# CISPO, GMPO, SAPO, delta, bias-corrected KL, entropy terms, rollout correction.
# ----------------------------------------------------------------------------

DELTA, GMPO_EPS, LOG2 = 1.5, 0.4, np.log(2.0)
CLIPPED = ("grpo", "bnpo", "dapo", "dr_grpo")


def np_loss(logps, old, ref, adv, mask, entropy, sampler, *, sg_logps=None, sg_entropy=None,
            loss_type="grpo", epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.0, kl_estimator="k3",
            importance_sampling_level="token", max_completion_length=MAX_LEN,
            use_bias_correction_kl=False, delta=None, entropy_coef=0.0, top_entropy_quantile=1.0,
            rollout_correction=None, rollout_correction_threshold=2.0, sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05, gmpo_epsilon=0.4):
  """docs/maths.md's loss with every option, float64, written apart from the JAX code.

  What the loss holds under stop_gradient (CISPO's weight, the top-entropy mask) is taken at
  sg_logps / sg_entropy (default: logps / entropy), so that finite differences in logps or
  entropy with those fixed give the gradient autodiff should give.
  """
  sg_logps = logps if sg_logps is None else sg_logps
  sg_entropy = entropy if sg_entropy is None else sg_entropy
  m = mask.astype(np.float64)
  n, t = m.shape
  lens = m.sum(1)
  a = np.repeat(adv[:, None], t, 1)

  def ratio(lp):
    lr = (lp - old) * m
    if importance_sampling_level == "sequence":
      lr = np.repeat((lr.sum(1) / np.maximum(lens, 1))[:, None], t, 1)
    return np.exp(lr)

  r = ratio(logps)
  if loss_type in CLIPPED:
    capped = r if delta is None else np.minimum(r, delta)
    pol = -np.minimum(capped * a, np.clip(r, 1 - epsilon, 1 + epsilon_high) * a)
    low, high = (r < 1 - epsilon) & (a < 0), (r > 1 + epsilon_high) & (a > 0)
  elif loss_type == "cispo":
    r_sg = ratio(sg_logps)
    pol = -np.minimum(r_sg, 1 + epsilon_high) * a * logps
    low, high = np.zeros((n, t), bool), r_sg > 1 + epsilon_high
  elif loss_type == "sapo":
    tau = np.where(a > 0, sapo_temperature_pos, sapo_temperature_neg)
    pol = -(4 / tau) / (1 + np.exp(-tau * (r - 1))) * a
    low = high = np.zeros((n, t), bool)
  else:  # gmpo: per sequence, the geometric mean of token ratios clipped on the side A limits
    pol = np.zeros((n, t))
    for i in range(n):
      lr = (logps[i] - old[i])[m[i] > 0]
      if adv[i] > 0:
        lr = np.minimum(lr, gmpo_epsilon)
      elif adv[i] < 0:
        lr = np.maximum(lr, -gmpo_epsilon)
      pol[i] = -adv[i] * (np.exp(lr.mean()) if lr.size else 1.0)
    lr_tok = (logps - old) * m
    low, high = (lr_tok < -gmpo_epsilon) & (a < 0), (lr_tok > gmpo_epsilon) & (a > 0)

  keep = m.copy()
  if top_entropy_quantile < 1:
    threshold = np.quantile(sg_entropy[m > 0], 1 - top_entropy_quantile)
    keep = ((sg_entropy >= threshold) & (m > 0)).astype(np.float64)
  w = np.ones((n, t))
  d = (old - sampler) * m
  if rollout_correction is not None:
    if rollout_correction.startswith("sequence"):
      w = np.repeat(np.exp(d.sum(1))[:, None], t, 1)
    else:
      w = np.exp(d)
    c = rollout_correction_threshold
    w = np.minimum(w, c) if rollout_correction.endswith("truncate") else np.where(w > c, 0.0, w)
  per = pol * keep * w
  dk = ref - logps
  kl = {"k1": -dk, "k2": dk**2 / 2, "k3": np.exp(dk) - dk - 1}[kl_estimator]
  per = per + beta * (r if use_bias_correction_kl else 1.0) * kl

  if loss_type in ("grpo", "sapo", "gmpo"):
    loss = np.mean((per * m).sum(1) / np.maximum(lens, 1))
  elif loss_type in ("bnpo", "dapo", "cispo"):
    loss = (per * m).sum() / max(m.sum(), 1)
  else:
    loss = (per * m).sum() / (n * max_completion_length)
  bonus_tokens = m.sum() if loss_type in ("dapo", "cispo") else keep.sum()
  loss = loss - entropy_coef * (entropy * keep).sum() / max(bonus_tokens, 1)

  token_mean = lambda x: (x * m).sum() / max(m.sum(), 1)
  frac = (lambda x: x[:, 0].mean()) if importance_sampling_level == "sequence" else token_mean
  metrics = {"kl": token_mean(kl), "clip_ratio/low_mean": frac(low),
             "clip_ratio/high_mean": frac(high), "clip_ratio/region_mean": frac(low | high),
             "mismatch/mean_abs_log_ratio": token_mean(np.abs(d)),
             "mismatch/max_abs_log_ratio": np.abs(d[m > 0]).max(),
             "mismatch/kl": token_mean(np.exp(d) - d - 1)}
  if rollout_correction is not None:
    metrics["mismatch/weight_mean"] = token_mean(w)
  return loss, metrics


def make_rich_batch(seed=0, n=4, t=5):
  """Inputs for the options: ratios of both signs far past every bound (delta, GMPO's log
  range, CISPO's cap), rollout log-ratios on both sides of log 2 per token and per sequence,
  entropies; every value >= 2e-3 from every kink. Row lengths 5, 4, 2, 0."""
  lengths = np.array([5, 4, 2, 0])[:n]
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
  on = mask > 0
  adv = np.array([1.3, -0.7, 0.4, -1.1])[:n]
  for s in itertools.count(seed):
    rng = np.random.default_rng(s)
    logps = rng.uniform(-3.0, -0.1, (n, t))
    log_ratio = rng.uniform(-1.0, 1.0, (n, t))
    d = rng.uniform(-0.9, 0.9, (n, t))  # old - sampler
    r = np.exp(log_ratio[on])
    seq = np.exp((log_ratio * mask).sum(1)[:3] / lengths[:3])
    far = (np.abs(np.concatenate([r, seq])[:, None]
                  - [1 - EPS, 1 + EPS, 1 + EPS_HIGH, DELTA]).min() > 2e-3
           and np.abs(np.abs(log_ratio[on]) - GMPO_EPS).min() > 2e-3
           and np.abs(d[on] - LOG2).min() > 2e-3
           and np.abs((d * mask).sum(1) - LOG2).min() > 2e-3)
    a = np.repeat(adv[:, None], t, 1)[on]
    branches = ((a < 0) & (r > DELTA)).any() and ((a > 0) & (r > 1 + EPS_HIGH)).any()
    branches &= ((a > 0) & (log_ratio[on] > GMPO_EPS)).any()
    branches &= ((a < 0) & (log_ratio[on] < -GMPO_EPS)).any()
    seq_d = (d * mask).sum(1)[:3]
    branches &= (d[on] > LOG2).any() and (seq_d > LOG2).any() and (seq_d < LOG2).any()
    if far and branches:
      break
  old = logps - log_ratio
  ref = logps + rng.uniform(-0.5, 0.5, (n, t))
  entropy = rng.uniform(0.05, 4.0, (n, t))
  return logps, old, ref, adv, mask, entropy, old - d


OPTION_CASES = {
    "cispo": dict(loss_type="cispo"),
    "cispo_sequence": dict(loss_type="cispo", importance_sampling_level="sequence", beta=0.1),
    "gmpo": dict(loss_type="gmpo"),
    "gmpo_narrow_kl": dict(loss_type="gmpo", gmpo_epsilon=0.25, beta=0.1, kl_estimator="k2"),
    "sapo": dict(loss_type="sapo"),
    "sapo_sequence": dict(loss_type="sapo", importance_sampling_level="sequence",
                          sapo_temperature_pos=2.0, sapo_temperature_neg=3.0),
    "delta": dict(delta=DELTA),
    "delta_dapo_sequence": dict(loss_type="dapo", delta=1.3, importance_sampling_level="sequence"),
    "bias_corrected_kl": dict(beta=0.1, use_bias_correction_kl=True),
    "bias_corrected_kl_sequence": dict(loss_type="dr_grpo", beta=0.1, use_bias_correction_kl=True,
                                       importance_sampling_level="sequence"),
    "entropy_bonus": dict(entropy_coef=0.03),
    "entropy_bonus_dapo_top": dict(loss_type="dapo", entropy_coef=0.03, top_entropy_quantile=0.55),
    "top_entropy_bnpo": dict(loss_type="bnpo", top_entropy_quantile=0.35),
    "top_entropy_gmpo_bonus": dict(loss_type="gmpo", top_entropy_quantile=0.65, entropy_coef=0.02),
    "token_truncate": dict(rollout_correction="token_truncate"),
    "token_mask_dapo": dict(loss_type="dapo", rollout_correction="token_mask"),
    "sequence_truncate_sapo": dict(loss_type="sapo", rollout_correction="sequence_truncate",
                                   rollout_correction_threshold=1.5),
    "sequence_mask": dict(rollout_correction="sequence_mask", beta=0.1),
    "cispo_everything": dict(loss_type="cispo", beta=0.05, use_bias_correction_kl=True,
                             entropy_coef=0.01, top_entropy_quantile=0.45,
                             rollout_correction="token_truncate"),
    "gmpo_everything": dict(loss_type="gmpo", beta=0.05, use_bias_correction_kl=True,
                            entropy_coef=0.01, top_entropy_quantile=0.75,
                            rollout_correction="sequence_mask"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_match_numpy_values_and_gradients(case):
  kwargs = {**dict(epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.0, max_completion_length=MAX_LEN),
            **OPTION_CASES[case]}
  logps, old, ref, adv, mask, entropy, sampler = make_rich_batch()
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

  def loss_fn(lp, ent):
    return losses.grpo_loss(lp, f32(old), f32(ref), f32(adv), f32(mask), entropy=ent,
                            sampler_logps=f32(sampler), **kwargs)

  (loss, metrics), (g_logps, g_entropy) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                             has_aux=True)(f32(logps), f32(entropy))
  want_loss, want_metrics = np_loss(logps, old, ref, adv, mask, entropy, sampler, **kwargs)
  want_g_logps = np_grad(lambda lp: np_loss(lp, old, ref, adv, mask, entropy, sampler,
                                            sg_logps=logps, **kwargs)[0], logps)
  want_g_entropy = np_grad(lambda e: np_loss(logps, old, ref, adv, mask, e, sampler,
                                             sg_entropy=entropy, **kwargs)[0], entropy)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_logps, want_g_logps, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_entropy, want_g_entropy, rtol=1e-4, atol=1e-6)
  assert np.abs(want_g_logps).max() > 0
  assert sorted(metrics) == sorted(want_metrics)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


def test_rich_batch_hits_every_branch():
  """Guards the parametrised test above: each option must change something on its data."""
  logps, old, ref, adv, mask, entropy, sampler = make_rich_batch()
  base = lambda **kw: np_loss(logps, old, ref, adv, mask, entropy, sampler, **kw)  # noqa: E731
  for kw in ({"delta": DELTA}, {"use_bias_correction_kl": True, "beta": 0.1},
             {"entropy_coef": 0.03}, {"top_entropy_quantile": 0.35},
             *({"rollout_correction": mode} for mode in losses.ROLLOUT_CORRECTIONS[1:])):
    off = {k: v for k, v in kw.items() if k == "beta"}
    assert base(**kw)[0] != base(**off)[0], kw
  _, m = base(loss_type="gmpo")
  assert m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0
  assert m["clip_ratio/region_mean"] < 1
  _, m = base(loss_type="cispo")
  assert 0 < m["clip_ratio/high_mean"] < 1
  # Masked IS drops some tokens / sequences and keeps others.
  for mode in ("token_mask", "sequence_mask"):
    assert 0 < base(rollout_correction=mode)[1]["mismatch/weight_mean"] < 1
  # Truncation caps some weights at the threshold.
  d = (old - sampler)[mask > 0]
  assert (np.exp(d) > 2).any() and (np.exp(d) < 2).any()


def test_new_options_at_their_defaults_change_nothing():
  """Explicit defaults, and sampler_logps without a correction, leave loss and gradient exactly
  as before; the sampler only adds the mismatch metrics."""
  logps, old, ref, adv, mask = make_batch()
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  defaults = dict(use_bias_correction_kl=False, delta=None, entropy=None, entropy_coef=0.0,
                  top_entropy_quantile=1.0, rollout_correction=None,
                  rollout_correction_threshold=2.0)
  for level in LEVELS:
    kw = dict(beta=0.1, importance_sampling_level=level, epsilon_high=EPS_HIGH)
    grad = lambda **extra: jax.value_and_grad(  # noqa: E731
        lambda lp: jax_loss(lp, old, ref, adv, mask, **kw, **extra), has_aux=True)(f32(logps))
    (l0, m0), g0 = grad()
    (l1, m1), g1 = grad(**defaults)
    (l2, m2), g2 = grad(sampler_logps=f32(old - 0.3 * mask), entropy=f32(logps))
    for loss, g in ((l1, g1), (l2, g2)):
      assert float(loss) == float(l0)
      np.testing.assert_array_equal(g, g0)
    assert m1 == m0 and set(m2) - set(m0) == {"mismatch/mean_abs_log_ratio",
                                              "mismatch/max_abs_log_ratio", "mismatch/kl"}
    np.testing.assert_allclose(m2["mismatch/max_abs_log_ratio"], 0.3, rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_bias_corrected_kl_gradient_on_policy(level):
  """On-policy (r = 1) the KL term's gradient is beta * (k3 + dk3/dlogp) per token instead of
  beta * dk3/dlogp (d/dlogp of r * k3 at r = 1), by hand; the values are equal."""
  logps, _, ref, adv, mask = make_batch()
  n = mask.shape[0]
  seq_len = np.maximum(mask.sum(1, keepdims=True), 1)

  def grad(bias):
    return jax.value_and_grad(lambda lp: jax_loss(
        lp, jax.lax.stop_gradient(lp), ref, np.zeros_like(adv), mask, beta=0.1,
        importance_sampling_level=level, use_bias_correction_kl=bias)[0])(
            jnp.asarray(logps, jnp.float32))

  (l_plain, g_plain), (l_bias, g_bias) = grad(False), grad(True)
  d = ref - logps
  k3, dk3 = np.exp(d) - d - 1, 1 - np.exp(d)
  if level == "token":
    extra = k3 * mask
  else:  # d r_seq / d logp_t = 1 / |o_i| on each token of the sequence
    extra = np.repeat((k3 * mask).sum(1, keepdims=True) / seq_len, mask.shape[1], 1) * mask
  np.testing.assert_allclose(g_plain, 0.1 * dk3 * mask / (n * seq_len), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_bias, 0.1 * (dk3 * mask + extra) / (n * seq_len), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(l_bias, l_plain, rtol=1e-6)


def test_delta_caps_only_negative_advantage_tokens_above_it():
  logps, old, ref, adv, mask, _, _ = make_rich_batch()
  grad = lambda **kw: np.asarray(jax.grad(lambda lp: jax_loss(  # noqa: E731
      lp, old, None, adv, mask, beta=0.0, epsilon_high=EPS_HIGH, **kw)[0])(
          jnp.asarray(logps, jnp.float32)))
  g, g_delta = grad(), grad(delta=DELTA)
  r = np.exp(logps - old)
  capped = (r > DELTA) & (adv[:, None] < 0) & (mask > 0)
  assert capped.any()
  assert np.all(g_delta[capped] == 0) and np.all(g[capped] != 0)
  np.testing.assert_array_equal(g_delta[~capped], g[~capped])


def test_cispo_and_sapo_on_policy_give_the_plain_policy_gradient():
  """At r = 1 CISPO's weight is 1 and SAPO's gate has slope 1: both are REINFORCE with the
  group advantage, normalised like dapo (CISPO) or grpo (SAPO)."""
  logps, _, _, adv, mask = make_batch()
  n = mask.shape[0]
  for loss_type, normaliser in (("cispo", mask.sum()),
                                ("sapo", n * np.maximum(mask.sum(1, keepdims=True), 1))):
    g = jax.grad(lambda lp: jax_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask,
                                     loss_type=loss_type, beta=0.0)[0])(
                                         jnp.asarray(logps, jnp.float32))
    np.testing.assert_allclose(g, -adv[:, None] * mask / normaliser, rtol=1e-5, atol=1e-8)


def test_cispo_weight_is_a_capped_constant():
  """The gradient of CISPO's token term is -min(r, 1 + eps_high) * A / tokens: the weight
  multiplies the log-prob's gradient and has none of its own (capped tokens still learn)."""
  logps, old, _, adv, mask, _, _ = make_rich_batch()
  g = jax.grad(lambda lp: jax_loss(lp, old, None, adv, mask, loss_type="cispo", beta=0.0,
                                   epsilon_high=EPS_HIGH)[0])(jnp.asarray(logps, jnp.float32))
  w = np.minimum(np.exp(logps - old), 1 + EPS_HIGH)
  np.testing.assert_allclose(g, -w * adv[:, None] * mask / mask.sum(), rtol=1e-5, atol=1e-8)
  assert (np.exp(logps - old)[mask > 0] > 1 + EPS_HIGH).any()


@pytest.mark.parametrize("quantile", [0.0, 0.25, 0.55, 0.93, 1.0])
def test_top_entropy_mask_keeps_the_masked_quantile(quantile):
  _, _, _, _, mask, entropy, _ = make_rich_batch()
  entropy = np.where(mask > 0, entropy, 99.0)  # padding must not count
  got = np.asarray(losses.top_entropy_mask(entropy, mask, quantile))
  threshold = np.quantile(entropy[mask > 0], 1 - quantile)
  np.testing.assert_array_equal(got, (entropy >= threshold) & (mask > 0))
  kept = got.sum()
  assert kept >= 1 and kept == max(1, np.sum(entropy[mask > 0] >= threshold))
  if quantile == 0.0:
    assert kept == 1 and entropy[got > 0] == entropy[mask > 0].max()
  np.testing.assert_array_equal(losses.top_entropy_mask(entropy, 0 * mask, quantile), 0 * mask)


@pytest.mark.parametrize("mode", losses.ROLLOUT_CORRECTIONS[1:])
def test_rollout_correction_weights_match_their_definition(mode):
  _, old, _, _, mask, _, sampler = make_rich_batch()
  got = np.asarray(losses.rollout_correction_weights(old, sampler, mask, mode, 2.0))
  d = (old - sampler) * mask
  w = np.exp(d.sum(1, keepdims=True)) if mode.startswith("sequence") else np.exp(d)
  want = np.minimum(w, 2.0) if mode.endswith("truncate") else np.where(w > 2.0, 0.0, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Long sequences: the product of many ratios overflows fp32, the log-space weight does not.
  long_d = np.full((2, 400), 0.5)
  far = np.asarray(losses.rollout_correction_weights(long_d, 0 * long_d, np.ones((2, 400)),
                                                     mode, 2.0))
  if mode.startswith("sequence"):
    assert np.all(far == (2.0 if mode.endswith("truncate") else 0.0))
  else:  # each token's ratio, e^0.5, is under the threshold
    np.testing.assert_allclose(far, np.exp(0.5), rtol=1e-6)


def test_sequence_level_clip_metrics_count_sequences():
  """GSPO: one ratio per sequence, so the clip fractions are fractions of the N sequences
  (TRL's), not of tokens; the token-weighted value would differ on this batch."""
  logps, old, _, adv, mask = make_batch()
  _, m = jax_loss(logps, old, None, adv, mask, beta=0.0, epsilon_high=EPS_HIGH,
                  importance_sampling_level="sequence")
  seq = np.exp(((logps - old) * mask).sum(1) / np.maximum(mask.sum(1), 1))
  low, high = (seq < 1 - EPS) & (adv < 0), (seq > 1 + EPS_HIGH) & (adv > 0)
  assert low.any() and high.any()
  np.testing.assert_allclose(m["clip_ratio/low_mean"], low.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["clip_ratio/high_mean"], high.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["clip_ratio/region_mean"], (low | high).mean(), rtol=1e-6)
  token_weighted = (high * mask.sum(1)).sum() / mask.sum()
  assert abs(token_weighted - high.mean()) > 0.05


@pytest.mark.parametrize("loss_type", ("cispo", "gmpo", "sapo"))
def test_new_loss_types_ignore_padding_and_jit(loss_type):
  logps, old, ref, adv, mask, entropy, sampler = make_rich_batch()
  garbage = lambda x, v: np.where(mask > 0, x, v)  # noqa: E731
  kw = dict(loss_type=loss_type, beta=0.1, entropy_coef=0.01, top_entropy_quantile=0.5,
            rollout_correction="token_mask")

  def loss_fn(lp, o, r, e, s):
    return jax_loss(lp, o, r, adv, mask, entropy=jnp.asarray(e, jnp.float32),
                    sampler_logps=jnp.asarray(s, jnp.float32), **kw)

  dirty = (garbage(logps, -1e30), garbage(old, 50.0), garbage(ref, 1e4), garbage(entropy, np.nan),
           garbage(sampler, -1e4))
  (loss, _), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(dirty[0], jnp.float32),
                                                              *dirty[1:])
  clean, _ = loss_fn(logps, old, ref, entropy, sampler)
  jitted, _ = jax.jit(loss_fn)(logps, old, ref, entropy, sampler)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, clean, rtol=1e-6)
  np.testing.assert_allclose(jitted, clean, rtol=1e-6)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="gmpo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="sapo", delta=4.0), "delta=4.0.*grpo"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile=1.5 must be in \[0, 1\]"),
    (dict(entropy_coef=0.1), "needs entropy"),
    (dict(top_entropy_quantile=0.2), "needs entropy"),
    (dict(rollout_correction="token_mask"), "needs sampler_logps"),
    (dict(rollout_correction="token"), r"rollout_correction.*\[None, 'token_truncate'"),
])
def test_bad_new_options_raise_clear_errors(kwargs, match):
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


# -- per-token advantages [N, T] (PPO's GAE) ------------------------------------------
@pytest.mark.parametrize("loss_type,level", [
    *((t, lv) for t in losses.LOSS_TYPES for lv in LEVELS if t != "gmpo"), ("gmpo", "token")])
def test_sequence_advantages_equal_their_per_token_broadcast(loss_type, level):
  """A [N] advantage and its [N, T] broadcast give the same loss and gradients, every loss
  type, with a KL term and an entropy bonus on."""
  logps, old, ref, adv, mask = make_batch()
  adv_NxT = np.broadcast_to(adv[:, None], logps.shape)
  entropy = np.random.default_rng(3).uniform(0.1, 2.0, logps.shape)
  kw = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=EPS_HIGH,
            beta=0.04, max_completion_length=MAX_LEN, entropy_coef=0.01,
            entropy=jnp.asarray(entropy, jnp.float32))

  def loss_and_grad(a):
    f = lambda lp: jax_loss(lp, old, ref, a, mask, **kw)[0]  # noqa: E731
    return jax.value_and_grad(f)(jnp.asarray(logps, jnp.float32))

  (loss_n, grad_n), (loss_nt, grad_nt) = loss_and_grad(adv), loss_and_grad(adv_NxT)
  assert float(loss_n) != 0.0
  np.testing.assert_allclose(loss_nt, loss_n, rtol=1e-6)
  np.testing.assert_allclose(grad_nt, grad_n, rtol=1e-6, atol=1e-9)
  if level == "token":  # token fractions: the same either way
    m_n, m_nt = (jax_loss(logps, old, ref, a, mask, **kw)[1] for a in (adv, adv_NxT))
    for name in m_n:
      np.testing.assert_allclose(m_nt[name], m_n[name], rtol=1e-6, err_msg=name)


def test_per_token_advantages_weight_each_token_by_its_own():
  """Per-token advantages are not averaged per row: on policy (ratio 1) the gradient of the
  grpo loss at token t is -A[n, t] / |row n| / N, each token by its own advantage."""
  logps, _, _, _, mask = make_batch()
  adv = np.random.default_rng(1).normal(size=logps.shape)
  f = lambda lp: jax_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask, beta=0.0)[0]  # noqa
  grad = jax.grad(f)(jnp.asarray(logps, jnp.float32))
  n = logps.shape[0]
  expected = -adv * mask / np.maximum(mask.sum(1, keepdims=True), 1) / n
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
