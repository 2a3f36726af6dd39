"""Token log-probs and the GRPO family of policy losses (GRPO, DAPO, Dr. GRPO, GSPO, CISPO,
GMPO, SAPO), with entropy terms and rollout-mismatch correction.

Shapes: N sequences (prompt-major, see docs/maths.md), T completion positions,
V vocabulary entries, D hidden features. Everything is computed in fp32
whatever the input dtype; string options are static Python values, so every
function here can be jitted with them closed over (or as static args).
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from grpo_jax import flop_count

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "gmpo", "sapo")
# Loss types whose policy term is the hard-clipped surrogate (the only ones `delta` applies to).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# Token means over the whole batch, across gradient-accumulation micro-batches (DAPO,
# MiniMax-M1); bnpo is a token mean over each micro-batch (TRL's), grpo/sapo/gmpo per-sequence.
GLOBAL_TOKEN_MEAN_LOSS_TYPES = ("dapo", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTIONS = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Metrics that are maxima over the batch: gradient accumulation combines them with a max.
MAX_METRICS = ("mismatch/max_abs_log_ratio",)


def _check_option(name: str, value, allowed) -> None:
  """Raises ValueError naming the allowed values when `value` is not one of them."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; expected one of {list(allowed)}.")


def masked_mean(x_NxT, mask_NxT):
  """Mean over the tokens where mask is 1 (0 when there are none)."""
  return jnp.sum(x_NxT * mask_NxT) / jnp.maximum(jnp.sum(mask_NxT), 1.0)


def kl_divergence(logps, ref_logps, estimator: str = "k3"):
  """Per-token estimate of KL(pi_theta || pi_ref) from log-probs of sampled tokens.

  Args:
    logps: [N, T] log pi_theta of the sampled tokens.
    ref_logps: [N, T] log pi_ref of the same tokens.
    estimator: "k3" (exp(d) - d - 1, unbiased and >= 0), "k1" (-d) or
      "k2" (d**2 / 2), with d = ref_logps - logps.

  Returns:
    [N, T] fp32.
  """
  _check_option("kl_estimator", estimator, KL_ESTIMATORS)
  d = jnp.asarray(ref_logps, jnp.float32) - jnp.asarray(logps, jnp.float32)
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d * d
  # expm1 keeps k3 accurate near d = 0, where exp(d) - 1 would cancel.
  return jnp.expm1(d) - d


def top_entropy_mask(entropy, mask, quantile: float):
  """1 on the completion tokens whose entropy is in the top `quantile` of the batch, else 0.

  The threshold is the (1 - quantile) quantile, linearly interpolated, of the entropies of
  the tokens where mask is 1; a token is kept when its entropy is >= the threshold ("Beyond
  the 80/20 rule", arXiv:2506.01939: quantile 0.2 keeps the 20% highest-entropy tokens).
  quantile 0 keeps only the maximum. No gradient flows through the selection.

  Args:
    entropy: [N, T] per-token entropies (anything at padding).
    mask: [N, T] 1 on completion tokens, else 0.
    quantile: fraction to keep, in [0, 1].

  Returns:
    [N, T] fp32 of 0s and 1s (0 everywhere when the mask is empty).
  """
  entropy = jax.lax.stop_gradient(jnp.asarray(entropy, jnp.float32))
  is_token = jnp.asarray(mask) > 0
  # Padding sorts last; only the first `count` sorted values are real tokens.
  sorted_ = jnp.sort(jnp.where(is_token, entropy, jnp.inf).ravel())
  count = jnp.sum(is_token)
  pos = (count - 1).astype(jnp.float32) * (1.0 - quantile)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, jnp.maximum(count - 1, 0))
  hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
  threshold = sorted_[lo] + (pos - lo) * (sorted_[hi] - sorted_[lo])
  return (is_token & (entropy >= threshold)).astype(jnp.float32)


def rollout_correction_weights(old_logps, sampler_logps, mask, mode: str, threshold: float):
  """Importance weights that correct for sampling with numerics other than the trainer's.

  With d = old_logps - sampler_logps on completion tokens (log pi_trainer / pi_sampler of
  the sampled token), the ratio is w = exp(d) per token ("token_*") or exp(sum_t d) per
  sequence ("sequence_*", the product of its token ratios). "*_truncate" caps w at
  `threshold` (truncated importance sampling); "*_mask" sets w to 0 where it exceeds
  `threshold` (masked importance sampling). Computed in log space (no overflow for long
  sequences) and without gradient.

  Returns:
    [N, T] fp32 for token modes, [N, 1] for sequence modes.
  """
  _check_option("rollout_correction", mode, ROLLOUT_CORRECTIONS[1:])
  is_token = jnp.asarray(mask) > 0
  d = jnp.where(is_token, jnp.asarray(old_logps, jnp.float32)
                - jnp.asarray(sampler_logps, jnp.float32), 0.0)
  d = jax.lax.stop_gradient(d)
  if mode.startswith("sequence"):
    d = jnp.sum(d, axis=-1, keepdims=True)
  log_threshold = jnp.log(jnp.asarray(threshold, jnp.float32))
  capped = jnp.exp(jnp.minimum(d, log_threshold))
  if mode.endswith("truncate"):
    return capped
  return jnp.where(d > log_threshold, 0.0, capped)


def grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    kl_estimator: str = "k3",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = False,
    delta: float | None = None,
    entropy=None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    sampler_logps=None,
    rollout_correction: str | None = None,
    rollout_correction_threshold: float = 2.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    gmpo_epsilon: float = 0.4,
):
  """Policy loss of GRPO and its variants (minimised; -J).

  One function on purpose, longer than most here: every variant is a branch of the same
  formula, and a reader checks the whole objective against docs/maths.md (sections 4 to 8)
  in one place.

  Per token, with r = pi_theta / pi_old (per token, or per sequence at
  importance_sampling_level="sequence") and A the sequence's advantage, the policy term p is
      grpo, bnpo, dapo, dr_grpo:  -min(min(r, delta) * A, clip(r, 1 - eps, 1 + eps_high) * A)
                                  (min(r, delta) only when delta is set: INTELLECT-2)
      cispo:  -sg(min(r, 1 + eps_high)) * A * logps                   (MiniMax-M1)
      sapo:   -(4 / tau) * sigmoid(tau * (r - 1)) * A, tau by the sign of A      (SAPO)
      gmpo:   -A * exp(mean_t clip_A(log r_t)) at each token of the sequence     (GMPO)
  where clip_A keeps log r_t within [-gmpo_epsilon, gmpo_epsilon] on the side the sign of A
  limits, and sg is stop_gradient. Then
      l = p * e * w + beta * k * KL
  with e the top-entropy mask (top_entropy_quantile < 1), w the rollout-correction weight
  (`rollout_correction_weights`) and k = r when use_bias_correction_kl else 1, each 1 when
  off. l is aggregated over the masked tokens by `loss_type` (docs/maths.md section 6):
      grpo, sapo, gmpo:  mean_n( sum_t(l m) / max(sum_t m, 1) )
      bnpo, dapo, cispo: sum(l m) / max(sum(m), 1)
      dr_grpo:           sum(l m) / (N * max_completion_length)
  and entropy_coef * H is subtracted, H the mean entropy over the tokens the policy term
  uses (TRL's definition; for dapo and cispo divided by the batch's token count instead).

  Where this differs from the papers or TRL (docs/maths.md says which we follow):
    - bnpo and dapo are the same token mean over the tokens passed in; they differ under
      gradient accumulation, where the caller (grpo.grads_and_metrics) averages bnpo's
      micro-batch means and weights dapo's and cispo's by token counts.
    - dr_grpo only removes the length normalisation here; Dr. GRPO's other
      change (no std scaling) is `group_advantages(..., scale="none")`.
    - sequence level (GSPO) uses exp(mean_t log_ratio) per sequence and keeps
      `loss_type`'s aggregation; the GSPO paper's much smaller clip range
      (about 3e-4 / 4e-4) is the caller's choice of epsilon / epsilon_high.
    - cispo caps the weight at 1 + epsilon_high, as MiniMax-M1 writes it; TRL caps it at
      epsilon_high itself (its 5.0 is our 4.0). No lower bound, as in the paper.
    - gmpo's clip range is its own, gmpo_epsilon in log space (the paper's (e^-0.4, e^0.4));
      epsilon and epsilon_high do not apply to it. Its ratio is per sequence by definition,
      so importance_sampling_level must be "token".
    - DAPO and Dr. GRPO drop the KL term; here that is beta=0, not the default.
    - a sequence with no completion tokens counts in the per-sequence means over N with a
      loss of 0 (the papers have no such sequences).

  Args:
    logps: [N, T] log-probs of the sampled tokens under the current params
      (the only input differentiated, with `entropy`).
    old_logps: [N, T] the same under the params of the rollout, as the trainer computes
      them. With one update per rollout jax.lax.stop_gradient(logps): the ratio is 1 and
      only its gradient matters.
    ref_logps: [N, T] the same under the reference params, or None when beta == 0.
    advantages: [N] one advantage per sequence (GRPO), or [N, T] one per token (PPO's GAE,
      `ppo.gae`); [N] is the same as its broadcast to [N, T]. With per-token advantages the
      sign tests (clip fractions, sapo's temperature, gmpo's clip side) are per token.
    mask: [N, T] 1 on completion tokens (up to and including EOS), else 0.
    loss_type: one of LOSS_TYPES.
    epsilon: lower clip range (and upper one when epsilon_high is None).
    epsilon_high: upper clip range (DAPO's clip-higher, e.g. 0.28); cispo's cap is
      1 + epsilon_high.
    beta: KL coefficient. A Python 0 skips the KL term entirely.
    kl_estimator: "k1", "k2" or "k3" (see `kl_divergence`).
    importance_sampling_level: "token" (GRPO) or "sequence" (GSPO).
    max_completion_length: the constant of dr_grpo's normaliser.
    use_bias_correction_kl: weight each token's KL by the (differentiable) ratio r, which
      makes the KL gradient unbiased off-policy (DeepSeek-V3.2; TRL's option).
    delta: INTELLECT-2's two-sided clip: the unclipped ratio is capped at delta, which
      bounds the loss of negative-advantage tokens (delta > 1 + epsilon_high). Clipped loss
      types only.
    entropy: [N, T] per-token entropies of the current policy; needed when entropy_coef
      != 0 or top_entropy_quantile < 1.
    entropy_coef: weight of the entropy bonus (subtracted from the loss).
    top_entropy_quantile: keep the policy term only on the tokens whose entropy is in the
      top this fraction of the batch's completion tokens (`top_entropy_mask`); 1 = all.
    sampler_logps: [N, T] log-probs of the sampled tokens as the sampler computed them, or
      None. When given, the mismatch metrics are reported.
    rollout_correction: None or a mode of `rollout_correction_weights`; needs sampler_logps.
    rollout_correction_threshold: its cap (truncate) or cut-off (mask) of the weight.
    sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for tokens with
      A > 0 and A <= 0 (TRL's names and defaults, from the paper).
    gmpo_epsilon: GMPO's clip range on the token log-ratio (0.4 in the paper).

  Returns:
    (loss scalar fp32, metrics), all scalars:
    `kl` (masked token mean; computed whenever ref_logps is given, even if beta == 0;
    else 0), `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`
    (fractions of completion tokens, of sequences at importance_sampling_level="sequence"
    with [N] advantages, whose lower / upper / either clip is active: docs/maths.md
    section 8) and, with sampler_logps, `mismatch/mean_abs_log_ratio`,
    `mismatch/max_abs_log_ratio`, `mismatch/kl` (plus `mismatch/weight_mean` with a
    rollout_correction).
  """
  _check_option("loss_type", loss_type, LOSS_TYPES)
  _check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
  _check_option("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
  _check_option("rollout_correction", rollout_correction, ROLLOUT_CORRECTIONS)
  # A traced beta cannot be compared with 0, so it always adds the KL term.
  use_kl = not (isinstance(beta, numbers.Real) and beta == 0)
  use_entropy_bonus = not (isinstance(entropy_coef, numbers.Real) and entropy_coef == 0)
  if use_kl and ref_logps is None:
    raise ValueError(f"ref_logps is None but beta={beta}; pass ref_logps or set beta=0.")
  if loss_type == "dr_grpo" and max_completion_length is None:
    raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser).")
  if loss_type == "gmpo" and importance_sampling_level != "token":
    raise ValueError("loss_type='gmpo' is a geometric mean of token ratios per sequence already; "
                     "use importance_sampling_level='token'.")
  if delta is not None and loss_type not in CLIPPED_LOSS_TYPES:
    raise ValueError(f"delta={delta} caps the clipped surrogate's ratio; it applies to loss_type "
                     f"in {list(CLIPPED_LOSS_TYPES)}, not {loss_type!r}.")
  if not 0.0 <= top_entropy_quantile <= 1.0:
    raise ValueError(f"top_entropy_quantile={top_entropy_quantile} must be in [0, 1] (1: all).")
  if (use_entropy_bonus or top_entropy_quantile < 1.0) and entropy is None:
    raise ValueError("entropy_coef != 0 or top_entropy_quantile < 1 needs entropy (per-token "
                     "entropies, [N, T]).")
  if rollout_correction is not None and sampler_logps is None:
    raise ValueError(f"rollout_correction={rollout_correction!r} needs sampler_logps.")
  if epsilon_high is None:
    epsilon_high = epsilon

  logps, old_logps, mask = (jnp.asarray(x, jnp.float32) for x in (logps, old_logps, mask))
  adv_Nx1 = jnp.asarray(advantages, jnp.float32)  # [N, 1], or [N, T] per-token advantages
  if adv_Nx1.ndim == 1:
    adv_Nx1 = adv_Nx1[:, None]
  is_token = mask > 0
  # Padding may hold anything (even -inf); zero it before exp so that masked
  # tokens can produce neither inf/NaN in the loss nor any gradient.
  log_ratio = jnp.where(is_token, logps - old_logps, 0.0)
  token_log_ratio = log_ratio
  if importance_sampling_level == "sequence":
    seq_len_Nx1 = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    log_ratio = jnp.sum(log_ratio, axis=-1, keepdims=True) / seq_len_Nx1
  ratio = jnp.exp(log_ratio)  # [N, T] or [N, 1]
  if loss_type in CLIPPED_LOSS_TYPES:
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(unclipped * adv_Nx1, clipped * adv_Nx1)
    is_low = (ratio < 1.0 - epsilon) & (adv_Nx1 < 0)
    is_high = (ratio > 1.0 + epsilon_high) & (adv_Nx1 > 0)
  elif loss_type == "cispo":
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + epsilon_high))
    per_token = -weight * adv_Nx1 * jnp.where(is_token, logps, 0.0)
    is_high = ratio > 1.0 + epsilon_high  # the cap acts whatever the sign of A
    is_low = jnp.zeros_like(is_high)
  elif loss_type == "sapo":
    tau = jnp.where(adv_Nx1 > 0, sapo_temperature_pos, sapo_temperature_neg)
    per_token = -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv_Nx1
    is_low = is_high = jnp.zeros(ratio.shape, bool)  # a soft gate: nothing is hard-clipped
  else:  # gmpo
    sign = jnp.sign(adv_Nx1)
    bounded = jnp.clip(token_log_ratio, -gmpo_epsilon, gmpo_epsilon)
    # min(x, clip(x)) for A > 0 (caps growth), max(x, clip(x)) for A < 0; 0 for A == 0.
    kept = sign * jnp.minimum(sign * token_log_ratio, sign * bounded)
    seq_len_Nx1 = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    seq_ratio_Nx1 = jnp.exp(jnp.sum(kept * mask, axis=-1, keepdims=True) / seq_len_Nx1)
    per_token = -seq_ratio_Nx1 * adv_Nx1  # the sequence's term at each of its tokens
    is_low = (token_log_ratio < -gmpo_epsilon) & (adv_Nx1 < 0)
    is_high = (token_log_ratio > gmpo_epsilon) & (adv_Nx1 > 0)
  per_token = jnp.broadcast_to(per_token, mask.shape)

  policy_mask = mask
  if top_entropy_quantile < 1.0:
    entropy_mask = top_entropy_mask(entropy, mask, top_entropy_quantile)
    per_token = per_token * entropy_mask
    policy_mask = mask * entropy_mask

  metrics = {}
  if sampler_logps is not None:
    sampler_logps = jnp.asarray(sampler_logps, jnp.float32)
    d = jax.lax.stop_gradient(jnp.where(is_token, old_logps - sampler_logps, 0.0))
    metrics["mismatch/mean_abs_log_ratio"] = masked_mean(jnp.abs(d), mask)
    metrics["mismatch/max_abs_log_ratio"] = jnp.max(jnp.abs(d) * mask, initial=0.0)
    # k3 of KL(sampler || trainer) from the sampler's tokens: trainer / sampler = exp(d).
    metrics["mismatch/kl"] = masked_mean(jnp.expm1(d) - d, mask)
    if rollout_correction is not None:
      w = rollout_correction_weights(old_logps, sampler_logps, mask, rollout_correction,
                                     rollout_correction_threshold)
      per_token = per_token * w
      metrics["mismatch/weight_mean"] = masked_mean(jnp.broadcast_to(w, mask.shape), mask)

  kl_mean = jnp.zeros((), jnp.float32)
  if ref_logps is not None:
    ref_logps = jnp.where(is_token, jnp.asarray(ref_logps, jnp.float32), logps)
    kl = kl_divergence(logps, ref_logps, kl_estimator)
    kl_mean = masked_mean(kl, mask)
    if use_kl:
      if use_bias_correction_kl:
        per_token = per_token + beta * ratio * kl
      else:
        per_token = per_token + beta * kl

  if loss_type in ("grpo", "sapo", "gmpo"):
    seq_len_N = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    loss = jnp.mean(jnp.sum(per_token * mask, axis=-1) / seq_len_N)
  elif loss_type in ("bnpo", "dapo", "cispo"):
    loss = masked_mean(per_token, mask)
  else:  # dr_grpo
    loss = jnp.sum(per_token * mask) / (mask.shape[0] * max_completion_length)

  if use_entropy_bonus:
    entropy_sum = jnp.sum(jnp.where(is_token, jnp.asarray(entropy, jnp.float32), 0.0)
                          * policy_mask)
    count = mask if loss_type in GLOBAL_TOKEN_MEAN_LOSS_TYPES else policy_mask
    loss = loss - entropy_coef * entropy_sum / jnp.maximum(jnp.sum(count), 1.0)

  def frac(is_clipped):
    """Fraction of sequences ([N, 1], sequence level, as TRL) or of completion tokens."""
    if importance_sampling_level == "sequence" and is_clipped.shape[-1] == 1:
      return jnp.mean(is_clipped.astype(jnp.float32))
    return masked_mean(jnp.broadcast_to(is_clipped, mask.shape).astype(jnp.float32), mask)

  metrics = {
      "kl": kl_mean,
      "clip_ratio/low_mean": frac(is_low),
      "clip_ratio/high_mean": frac(is_high),
      "clip_ratio/region_mean": frac(is_low | is_high),
      **metrics,
  }
  return loss, metrics


def sft_loss(logps, mask):
  """Masked negative log-likelihood, a token mean over the batch (cold start, distillation).

  Args:
    logps: [N, T] log-probs of the target tokens.
    mask: [N, T] 1 on tokens to learn, else 0.

  Returns:
    (loss scalar fp32, metrics with `nll`, `perplexity`, `num_tokens`).
  """
  mask = jnp.asarray(mask, jnp.float32)
  logps = jnp.where(mask > 0, jnp.asarray(logps, jnp.float32), 0.0)
  nll = -masked_mean(logps, mask)
  return nll, {"nll": nll, "perplexity": jnp.exp(nll), "num_tokens": jnp.sum(mask)}


def token_logps(logits, targets):
  """log p(targets) from logits [N, T, V] and int targets [N, T] -> [N, T] fp32."""
  logits = jnp.asarray(logits, jnp.float32)
  # logsumexp + gather instead of log_softmax: no second [N, T, V] array.
  logz_NxT = jax.nn.logsumexp(logits, axis=-1)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz_NxT


def token_entropy(logits):
  """Entropy (nats) of softmax(logits [N, T, V]) per position -> [N, T] fp32."""
  logits = jnp.asarray(logits, jnp.float32)
  logz_NxTx1 = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  probs = jnp.exp(logits - logz_NxTx1)
  return logz_NxTx1[..., 0] - jnp.sum(probs * logits, axis=-1)


def token_logps_and_entropy(
    hidden,
    targets,
    head_fn: Callable[[jax.Array], jax.Array],
    *,
    chunk_size: int = 64,
):
  """Log-probs and entropies from final hidden states, chunk by chunk over T.

  Only one chunk's logits [N, C, V] exist at a time, forward and backward, so
  a 150k vocabulary never materialises [N, T, V]: the backward recomputes a
  chunk's logits and gets the softmax from the saved log-normaliser in one
  elementwise pass (see `_logps_entropy_fn`). Gradients flow to `hidden` and to whatever
  `head_fn` closes over (e.g. the LM head's weights).

  Args:
    hidden: [N, T, D] final (normed) hidden states at the positions that
      predict `targets`.
    targets: [N, T] int token ids.
    head_fn: hidden chunk [N, C, D] -> logits [N, C, V] (any float dtype;
      upcast to fp32 here).
    chunk_size: C, positions per chunk. T is padded up to a multiple of it.

  Returns:
    (logps [N, T] fp32, entropy [N, T] fp32).
  """
  n, t, d = hidden.shape
  c = max(1, min(chunk_size, t))
  k = -(-t // c)
  pad = k * c - t
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hidden_KxNxCxD = hidden.reshape(n, k, c, d).transpose(1, 0, 2, 3)
  targets_KxNxC = targets.reshape(n, k, c).transpose(1, 0, 2)
  # The head's weights become explicit inputs, so the custom VJP can return
  # their gradient.
  head, head_consts = jax.closure_convert(head_fn, hidden_KxNxCxD[0])
  one_chunk = _logps_entropy_fn(head)
  _, (logps_KxNxC, entropy_KxNxC) = jax.lax.scan(
      lambda _, args: (None, one_chunk(*args, *head_consts)), None,
      (hidden_KxNxCxD, targets_KxNxC), unroll=flop_count.SCAN_UNROLL.get())

  def unchunk(x_KxNxC):
    return x_KxNxC.transpose(1, 0, 2).reshape(n, k * c)[:, :t]

  return unchunk(logps_KxNxC), unchunk(entropy_KxNxC)


def _logps_entropy_fn(head):
  """(hidden [N, C, D], targets [N, C], *head_consts) -> (logps, entropy) [N, C] each,
  with a hand-written VJP.

  Forward: logits l = head(hidden), log-normaliser z = logsumexp(l),
  logp = l[target] - z, S = sum(p * l) with p = exp(l - z), entropy = z - S.
  Only hidden, z and S are kept. Backward, with g, h the cotangents of logp and
  entropy: dl = g * (onehot - p) + h * p * (S - l), then the head's own VJP.
  Autodiff through a rematerialised chunk would instead redo the forward's
  reductions over V and then run their transposes: on CPU, ~3 extra passes
  over [N, C, V] per chunk.
  """

  def forward(hidden, targets, *consts):
    logits = head(hidden, *consts).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - logz[..., None])
    expected = jnp.sum(probs * logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (picked - logz, logz - expected), (logz, expected)

  @jax.custom_vjp
  def fn(hidden, targets, *consts):
    return forward(hidden, targets, *consts)[0]

  def fwd(hidden, targets, *consts):
    out, (logz, expected) = forward(hidden, targets, *consts)
    return out, (hidden, targets, consts, logz, expected)

  def bwd(res, cotangents):
    hidden, targets, consts, logz, expected = res
    g_logp, g_entropy = cotangents
    logits, head_vjp = jax.vjp(head, hidden, *consts)
    logits32 = logits.astype(jnp.float32)
    probs = jnp.exp(logits32 - logz[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = (g_logp[..., None] * (onehot - probs)
                + g_entropy[..., None] * probs * (expected[..., None] - logits32))
    d_hidden, *d_consts = head_vjp(d_logits.astype(logits.dtype))
    return (d_hidden, None, *d_consts)

  fn.defvjp(fwd, bwd)
  return fn
