"""PPO's pieces for language models: per-token rewards, GAE, whitening, the value loss.

    rewards = token_rewards(seq_rewards, mask, kl=logps - ref_logps, kl_coef=0.05)   # [N, T]
    values = completion_values(critic, prompts, prompt_mask, completions, mask,
                               num_generations=G)                                  # [N, T]
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)                 # [N, T]
    adv = whiten(adv, mask)                                                        # optional
    v_loss, v_metrics = value_loss(new_values, values, returns, mask, cliprange_value=0.2)

The policy side is GRPO's clipped objective with per-token advantages
[N, T] in place of one per completion; the critic is `models.ValueModel`.
docs/maths.md (section "PPO with a learned critic") has the formulas. Names
follow TRL's PPO trainer where it has one (gamma, lam, cliprange_value,
vf_coef, kl_coef, whiten).

Every function here is pure and jittable. Masks are [N, T] with 1 on the
completion's tokens, up to and including its stop token, and 0 on the padding
after it (grpo.Batch.completion_mask); `gae` also accepts 0s inside a
sequence and skips those tokens (see its docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.models import transformer

Array = jax.Array
# config.rl.advantage_estimator's value that trains with a critic and GAE (train.py, critic.py).
ESTIMATOR = "gae"

def _float(x) -> Array:
  """x in at least fp32: bf16 and ints go up to fp32, fp64 (under jax x64) stays fp64."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# Added to the variance before the inverse square root in `whiten` (TRL's and verl's value).
WHITEN_EPS = 1e-8


def last_token_mask(mask_NxT: Array) -> Array:
  """[N, T] bool: True at each row's last position where mask is 1 (nowhere in an empty row)."""
  m = mask_NxT.astype(jnp.int32)
  after = jnp.cumsum(m[:, ::-1], axis=1)[:, ::-1] - m  # real tokens strictly after t
  return (m > 0) & (after == 0)


def token_rewards(sequence_rewards_N: Array, mask_NxT: Array, *, kl: Array | None = None,
                  kl_coef: float = 0.0) -> Array:
  """Per-token rewards [N, T] of the InstructGPT form (fp32; fp64 for fp64 inputs).

  r[i, t] = R_i on row i's last real token (the last mask == 1 position, its
  stop token if it stopped), minus kl_coef * kl[i, t] on every real token;
  0 on padding. A row with no real token gets nothing (its reward is lost).

  Args:
    sequence_rewards_N: [N] one scalar reward per completion.
    mask_NxT: [N, T] 1 on real completion tokens.
    kl: [N, T] per-token KL estimate to the reference (e.g. log pi - log pi_ref,
      TRL's default), or None for no penalty.
    kl_coef: weight of the per-token KL penalty (TRL's `kl_coef`).
  """
  m = mask_NxT.astype(bool)
  rewards = jnp.where(last_token_mask(mask_NxT), _float(sequence_rewards_N)[:, None], 0.0)
  if kl is not None:  # padding's kl (even inf or nan) never counts
    rewards = rewards - kl_coef * jnp.where(m, _float(kl), 0.0)
  return rewards


def gae(rewards_NxT: Array, values_NxT: Array, mask_NxT: Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al., 2016): (advantages, returns), [N, T].

  Backwards over the real tokens of each row, with V = 0 after the last one
  (the episode ends there):
      delta_t = r_t + gamma * V_next - V_t
      A_t     = delta_t + gamma * lam * A_next
      R_t     = A_t + V_t                       (the critic's regression target)
  where V_next and A_next are those of the next real token. A token with
  mask 0 is skipped: it has no reward, value or advantage of its own and
  passes the ones after it through unchanged, so padding after the stop token
  means "terminal" and a masked token inside a row is as if absent (verl's
  treatment of observation tokens). Advantages and returns are 0 where
  mask is 0. lam = 1 gives the discounted return minus V_t; lam = 0 the
  one-step TD error delta_t.

  Args:
    rewards_NxT: [N, T] per-token rewards (`token_rewards`).
    values_NxT: [N, T] the critic's values V_t, at sampling time (no gradient flows).
    mask_NxT: [N, T] 1 on real completion tokens.
    gamma: discount per token (TRL's `gamma`, 1.0 by default there and here).
    lam: GAE's bias/variance trade-off (TRL's `lam`, 0.95).
  Returns:
    (advantages [N, T], returns [N, T]), fp32 (fp64 for fp64 inputs), under stop_gradient.
  """
  m = mask_NxT.astype(bool)
  # Whatever padding holds (even inf or nan) never reaches a real token.
  dtype = jnp.result_type(_float(rewards_NxT), _float(values_NxT))
  r = jnp.where(m, jax.lax.stop_gradient(rewards_NxT).astype(dtype), 0.0)
  v = jnp.where(m, jax.lax.stop_gradient(values_NxT).astype(dtype), 0.0)

  def step(carry, xs):
    next_value, next_adv = carry
    r_t, v_t, m_t = xs
    adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
    # A masked token keeps the carry: the next real token's value and advantage.
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
    return carry, jnp.where(m_t, adv, 0.0)

  zeros = jnp.zeros(r.shape[:1], dtype)
  _, adv_TxN = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
  advantages = adv_TxN.T
  return advantages, jnp.where(m, advantages + v, 0.0)


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean of x over the positions where mask is 1 (0 when there are none); a scalar.

  Positions where mask is 0 never count, whatever they hold (even inf or nan).
  """
  x, m = _float(x), mask.astype(bool)
  return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1).astype(x.dtype)


def masked_var(x: Array, mask: Array, *, unbiased: bool = True) -> Array:
  """Variance of x over the positions where mask is 1; a scalar.

  unbiased: times n / (n - 1) (Bessel), as TRL's and verl's whitening do; with n <= 1
  real positions no correction (TRL raises there; a jitted function cannot).
  """
  x, m = _float(x), mask.astype(bool)
  var = masked_mean(jnp.square(x - masked_mean(x, m)), m)
  if unbiased:
    n = jnp.sum(m).astype(x.dtype)
    var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1)
  return var


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = WHITEN_EPS) -> Array:
  """(x - mean) / sqrt(var + eps) over the real positions, 0 where mask is 0.

  mean and the unbiased variance are over all real positions of the batch
  (TRL's and verl's `masked_whiten`). shift_mean=False adds the mean back:
  only the scale changes (TRL whitens rewards that way).

  Args:
    x: [N, T] (any shape matching mask).
    mask: 1 on real positions.
  """
  m = mask.astype(bool)
  x = jnp.where(m, _float(x), 0.0)
  mean = masked_mean(x, m)
  out = (x - mean) * jax.lax.rsqrt(masked_var(x, m) + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m, out, 0.0)


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var[R - V] / Var[R] over the real positions (biased variances); a scalar.

  1: the critic predicts the returns exactly; 0: no better than their mean;
  negative: worse. 0 when the returns do not vary (undefined there).
  """
  var_r = masked_var(returns, mask, unbiased=False)
  var_err = masked_var(returns - values, mask, unbiased=False)
  return jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def value_loss(values_NxT: Array, old_values_NxT: Array, returns_NxT: Array, mask_NxT: Array, *,
               cliprange_value: float = 0.2) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped value loss, a token mean over the batch: (loss, metrics).

      V_clip = clip(V, V_old - c, V_old + c)
      loss   = 0.5 * mean over real tokens of max((V - R)^2, (V_clip - R)^2)

  The max keeps the pessimistic of the two: a value that moved more than c
  from the one the rollout was scored with gets no gradient when that move
  brought it closer to R (TRL's `vf_loss`). The caller weights it by
  `vf_coef` against the policy loss.

  Args:
    values_NxT: [N, T] the critic's current values (differentiated).
    old_values_NxT: [N, T] the values at sampling time (those GAE used).
    returns_NxT: [N, T] GAE's returns, the regression target.
    mask_NxT: [N, T] 1 on real completion tokens.
    cliprange_value: c, TRL's `cliprange_value`.
  Returns:
    loss: scalar, fp32 (fp64 for fp64 values).
    metrics: scalars `value/loss`, `value/clip_fraction` (share of real tokens
      whose clipped term is the larger), `value/mean` (of V), `value/returns_mean`,
      `value/explained_variance` (of V against R).
  """
  v = _float(values_NxT)
  old = _float(jax.lax.stop_gradient(old_values_NxT)).astype(v.dtype)
  ret = _float(jax.lax.stop_gradient(returns_NxT)).astype(v.dtype)
  m = mask_NxT.astype(bool)
  v_clip = jnp.clip(v, old - cliprange_value, old + cliprange_value)
  unclipped, clipped = jnp.square(v - ret), jnp.square(v_clip - ret)
  loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), m)
  v_sg = jax.lax.stop_gradient(v)
  metrics = {
      "value/loss": jax.lax.stop_gradient(loss),
      "value/clip_fraction": masked_mean((clipped > unclipped).astype(v.dtype), m),
      "value/mean": masked_mean(v_sg, m),
      "value/returns_mean": masked_mean(ret, m),
      "value/explained_variance": explained_variance(v_sg, ret, m),
  }
  return loss, metrics


def completion_values(value_model, prompts_BxP: Array, prompt_mask_BxP: Array,
                      completions_NxT: Array, completion_mask_NxT: Array, *,
                      num_generations: int, remat: str = "none") -> Array:
  """The critic's value of each completion token's state, [N, T] fp32.

  Value t is read where completion token t's log-prob is (grpo.completion_logps):
  token 0's at the prompt's last position, token t > 0's at completion token
  t - 1; it estimates the return from the state before token t is emitted
  (TRL's values[:, context_length - 1 : -1]). As there, the prompt is run
  once (B rows) and its G completions attend to it as a shared prefix.

  Args:
    value_model: a `models.ValueModel` (anything with `prefill`,
      `hidden_states` and `values` of the same contracts).
    prompts_BxP: [B, P] int32, left-padded; prompt_mask_BxP [B, P].
    completions_NxT: [N, T] int32, N = B * num_generations rows, prompt-major;
      completion_mask_NxT [N, T].
    remat: what the backward keeps of each layer (`transformer.REMAT`).
  """
  hidden = transformer.completion_hidden_states(
      value_model, prompts_BxP, prompt_mask_BxP, completions_NxT, completion_mask_NxT,
      num_generations=num_generations, remat=remat)
  return value_model.values(hidden)
