"""Token log-probs and the GRPO family of policy losses (GRPO, DAPO, Dr. GRPO, GSPO).

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

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


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
):
  """Clipped surrogate policy loss of GRPO and its variants (minimised; -J).

  One function on purpose, longer than most here: every variant is a branch of the same
  formula, and a reader checks the whole objective against docs/maths.md in one place.

  Per token, with r = pi_theta / pi_old and A the sequence's advantage:
      l = -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL
  then aggregated over the masked tokens by `loss_type` (docs/maths.md):
      grpo:        mean_n( sum_t(l m) / max(sum_t m, 1) )
      bnpo, dapo:  sum(l m) / max(sum(m), 1)
      dr_grpo:     sum(l m) / (N * max_completion_length)

  Where this differs from the papers (docs/maths.md says which we follow):
    - bnpo and dapo are the same token mean over the tokens passed in. (TRL's
      dapo normalises by the token count of the whole global batch across
      gradient-accumulation steps; a caller that accumulates must weight the
      micro-batches by their token counts to match.)
    - dr_grpo only removes the length normalisation here; Dr. GRPO's other
      change (no std scaling) is `group_advantages(..., scale="none")`.
    - sequence level (GSPO) uses exp(mean_t log_ratio) per sequence and keeps
      `loss_type`'s aggregation; the GSPO paper's much smaller clip range
      (about 3e-4 / 4e-4) is the caller's choice of epsilon / epsilon_high.
    - DAPO and Dr. GRPO drop the KL term; here that is beta=0, not the default.
    - a sequence with no completion tokens counts in grpo's mean over N with a
      loss of 0 (the paper has no such sequences).

  Args:
    logps: [N, T] log-probs of the sampled tokens under the current params
      (the only input differentiated).
    old_logps: [N, T] the same under the sampling params. With one update per
      rollout pass jax.lax.stop_gradient(logps): the ratio is 1 and only its
      gradient matters.
    ref_logps: [N, T] the same under the reference params, or None when beta == 0.
    advantages: [N] one advantage per sequence.
    mask: [N, T] 1 on completion tokens (up to and including EOS), else 0.
    loss_type: "grpo", "bnpo", "dapo" or "dr_grpo".
    epsilon: lower clip range (and upper one when epsilon_high is None).
    epsilon_high: upper clip range (DAPO's clip-higher, e.g. 0.28).
    beta: KL coefficient. A Python 0 skips the KL term entirely.
    kl_estimator: "k1", "k2" or "k3" (see `kl_divergence`).
    importance_sampling_level: "token" (GRPO) or "sequence" (GSPO).
    max_completion_length: the constant of dr_grpo's normaliser.

  Returns:
    (loss scalar fp32, metrics) where metrics are masked token means:
    `kl` (computed whenever ref_logps is given, even if beta == 0; else 0),
    `clip_ratio/low_mean` (r < 1 - epsilon and A < 0), `clip_ratio/high_mean`
    (r > 1 + epsilon_high and A > 0) and `clip_ratio/region_mean` (either).
  """
  _check_option("loss_type", loss_type, LOSS_TYPES)
  _check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
  _check_option("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
  # A traced beta cannot be compared with 0, so it always adds the KL term.
  use_kl = not (isinstance(beta, numbers.Real) and beta == 0)
  if use_kl and ref_logps is None:
    raise ValueError(f"ref_logps is None but beta={beta}; pass ref_logps or set beta=0.")
  if loss_type == "dr_grpo" and max_completion_length is None:
    raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser).")
  if epsilon_high is None:
    epsilon_high = epsilon

  logps, old_logps, mask = (jnp.asarray(x, jnp.float32) for x in (logps, old_logps, mask))
  adv_Nx1 = jnp.asarray(advantages, jnp.float32)[:, None]
  is_token = mask > 0
  # Padding may hold anything (even -inf); zero it before exp so that masked
  # tokens can produce neither inf/NaN in the loss nor any gradient.
  log_ratio = jnp.where(is_token, logps - old_logps, 0.0)
  if importance_sampling_level == "sequence":
    seq_len_Nx1 = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    log_ratio = jnp.sum(log_ratio, axis=-1, keepdims=True) / seq_len_Nx1
  ratio = jnp.exp(log_ratio)  # [N, T] or [N, 1]
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
  per_token = -jnp.minimum(ratio * adv_Nx1, clipped * adv_Nx1)
  per_token = jnp.broadcast_to(per_token, mask.shape)

  kl_mean = jnp.zeros((), jnp.float32)
  if ref_logps is not None:
    ref_logps = jnp.where(is_token, jnp.asarray(ref_logps, jnp.float32), logps)
    kl = kl_divergence(logps, ref_logps, kl_estimator)
    kl_mean = masked_mean(kl, mask)
    if use_kl:
      per_token = per_token + beta * kl

  if loss_type == "grpo":
    seq_len_N = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    loss = jnp.mean(jnp.sum(per_token * mask, axis=-1) / seq_len_N)
  elif loss_type in ("bnpo", "dapo"):
    loss = masked_mean(per_token, mask)
  else:  # dr_grpo
    loss = jnp.sum(per_token * mask) / (mask.shape[0] * max_completion_length)

  is_low = (ratio < 1.0 - epsilon) & (adv_Nx1 < 0)
  is_high = (ratio > 1.0 + epsilon_high) & (adv_Nx1 > 0)
  clip_low = jnp.broadcast_to(is_low, mask.shape).astype(jnp.float32)
  clip_high = jnp.broadcast_to(is_high, mask.shape).astype(jnp.float32)
  metrics = {
      "kl": kl_mean,
      "clip_ratio/low_mean": masked_mean(clip_low, mask),
      "clip_ratio/high_mean": masked_mean(clip_high, mask),
      "clip_ratio/region_mean": masked_mean(jnp.maximum(clip_low, clip_high), mask),
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
