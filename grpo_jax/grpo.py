"""The GRPO update: log-probs of completions, the loss, and one jitted, sharded step.

    step_fn = make_update_step(graphdef, optimizer, loss_cfg, ...)
    params, opt_state, metrics = step_fn(params, opt_state, ref_params, batch)

Work saved against a plain implementation (PERFORMANCE.md):
- the prompt is run once per group, not G times: its G completions attend to
  its keys/values as a shared prefix (the same mechanism the sampler uses);
- logits exist only at completion positions, a chunk at a time
  (`losses.token_logps_and_entropy`), never [N, P + T, V];
- the caller trims completions to the bucket of the longest one;
- the reference forward is skipped when beta == 0, and the "old" forward
  always (old log-probs come from the sampler, or are the current ones
  under stop_gradient when there is one update per rollout).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from grpo_jax import losses


@struct.dataclass
class Batch:
  """One rollout, B prompts x G completions (N = B * G rows, prompt-major)."""
  prompts: jax.Array  # [B, P] int32, left-padded
  prompt_mask: jax.Array  # [B, P] int32
  completions: jax.Array  # [N, T] int32
  completion_mask: jax.Array  # [N, T] int32, up to and including the stop token
  old_logps: jax.Array  # [N, T] float32, sampling log-probs (used when num_iterations > 1)
  advantages: jax.Array  # [N] float32


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the loss (config.rl), hashable so the step can close over them."""
  num_generations: int
  beta: float = 0.04
  epsilon: float = 0.2
  epsilon_high: float | None = None
  loss_type: str = "grpo"
  kl_estimator: str = "k3"
  importance_sampling_level: str = "token"
  max_completion_length: int | None = None
  temperature: float = 1.0
  use_old_logps: bool = False  # True when num_iterations > 1
  chunk_size: int = 64


def completion_logps(model, prompts_BxP, prompt_mask_BxP, completions_NxT, completion_mask_NxT, *,
                     num_generations: int, temperature: float = 1.0, chunk_size: int = 64):
  """log pi(completion token | prompt, earlier tokens) and entropies, [N, T] each.

  The prompt is run once (B rows); completion rows attend to it as a shared
  prefix. Completion token 0 is predicted by the prompt's last position, token
  t > 0 by completion token t - 1. Logits are divided by `temperature` (as
  when sampling), so the log-probs are the sampling policy's.
  """
  n, t = completions_NxT.shape
  h_prompt, prefix = model.prefill(prompts_BxP, prompt_mask_BxP)
  cache = model.init_cache(n, t - 1, prefix=prefix) if t > 1 else None
  first = jnp.repeat(h_prompt[:, -1:], num_generations, axis=0)  # [N, 1, D]
  if t > 1:
    h_rest, _ = model.hidden_states(completions_NxT[:, :-1],
                                    attention_mask_BxL=completion_mask_NxT[:, :-1], cache=cache)
    hidden = jnp.concatenate([first, h_rest], axis=1)
  else:
    hidden = first
  inv_t = 1.0 / (temperature if temperature > 0 else 1.0)
  head = lambda h: model.logits(h) * inv_t  # noqa: E731
  return losses.token_logps_and_entropy(hidden, completions_NxT, head, chunk_size=chunk_size)


def loss_and_metrics(params, ref_params, graphdef, batch: Batch, cfg: LossConfig):
  """GRPO loss of one (micro-)batch and its metrics (all scalars)."""
  lp = functools.partial(completion_logps, num_generations=cfg.num_generations,
                         temperature=cfg.temperature, chunk_size=cfg.chunk_size)
  args = (batch.prompts, batch.prompt_mask, batch.completions, batch.completion_mask)
  logps, entropy = lp(nnx.merge(graphdef, params), *args)
  ref_logps = None
  if cfg.beta != 0:
    ref_logps, _ = lp(nnx.merge(graphdef, jax.lax.stop_gradient(ref_params)), *args)
    ref_logps = jax.lax.stop_gradient(ref_logps)
  old = batch.old_logps if cfg.use_old_logps else jax.lax.stop_gradient(logps)
  loss, metrics = losses.grpo_loss(
      logps, old, ref_logps, batch.advantages, batch.completion_mask,
      loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
      beta=cfg.beta, kl_estimator=cfg.kl_estimator,
      importance_sampling_level=cfg.importance_sampling_level,
      max_completion_length=cfg.max_completion_length)
  mask = batch.completion_mask.astype(jnp.float32)
  metrics = dict(metrics, loss=loss, entropy=losses.masked_mean(entropy, mask))
  return loss, metrics


def split_micro_batches(batch, parts: int):
  """Arrays [B, ...] -> [parts, B / parts, ...]. For GRPO's prompt-major rows ([B] prompts,
  [N = B * G] completions) each micro-batch holds whole groups."""
  return jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), batch)


def _micro_weight(mb: Batch, full: Batch, cfg: LossConfig, parts: int):
  """Weight of a micro-batch's loss so the sum equals the whole batch's loss.

  grpo and dr_grpo normalise per sequence (equal-size micro-batches: 1/parts);
  bnpo/dapo are a token mean over the batch: weight by the share of tokens.
  """
  if cfg.loss_type in ("bnpo", "dapo"):
    return jnp.sum(mb.completion_mask) / jnp.maximum(jnp.sum(full.completion_mask), 1)
  return 1.0 / parts


def accumulate(grad_fn, params, micro_batches, weight_fn):
  """Σ_i w_i · grad_fn(micro-batch i) over the leading axis of `micro_batches` (lax.scan:
  one micro-batch's activations live at a time), w_i = weight_fn(micro-batch i).

  Returns (gradients, metrics [parts, ...], weights [parts]). GRPO and SFT both use it.
  """
  def body(acc, mb):
    grads, metrics = grad_fn(mb)
    w = weight_fn(mb)
    return jax.tree.map(lambda a, g: a + w * g, acc, grads), (metrics, w)

  grads, (metrics, weights) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                                           micro_batches)
  return grads, metrics, weights


def grads_and_metrics(params, ref_params, graphdef, batch: Batch, cfg: LossConfig,
                      grad_accum_steps: int = 1):
  """Gradients of the batch's loss, accumulated over micro-batches with lax.scan."""
  grad_fn = jax.grad(loss_and_metrics, has_aux=True)
  if grad_accum_steps == 1:
    grads, metrics = grad_fn(params, ref_params, graphdef, batch, cfg)
    return grads, metrics
  grads, metrics, weights = accumulate(
      lambda mb: grad_fn(params, ref_params, graphdef, mb, cfg), params,
      split_micro_batches(batch, grad_accum_steps),
      lambda mb: _micro_weight(mb, batch, cfg, grad_accum_steps))
  # Metrics are token means or per-sequence means: combine like the loss.
  metrics = jax.tree.map(lambda m: jnp.sum(m * weights) if cfg.loss_type in ("bnpo", "dapo")
                         else jnp.mean(m), metrics)
  return grads, metrics


def make_optimizer(learning_rate: float, *, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "constant", weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.99):
  """AdamW with linear warmup then constant or cosine decay, after global-norm clipping.

  Returns (optimizer, schedule_fn) so the loop can log the learning rate.
  """
  if schedule == "constant":
    decay = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"opt.schedule={schedule!r} is not supported; expected 'constant' or 'cosine'")
  lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                            [warmup_steps]) if warmup_steps else decay
  chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  chain.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*chain), lr


def make_update_step(graphdef, optimizer, cfg: LossConfig, *, grad_accum_steps: int = 1,
                     param_sharding=None, opt_sharding=None, batch_sharding=None):
  """The jitted update: (params, opt_state, ref_params, batch) -> (params, opt_state, metrics).

  params and opt_state are donated (updated in place); with shardings given,
  inputs and outputs keep them (the batch is split over the mesh's batch axes).
  """

  def grads_fn(params, ref_params, batch):
    return grads_and_metrics(params, ref_params, graphdef, batch, cfg, grad_accum_steps)

  extra = None
  if param_sharding is not None:
    batch_sh = jax.tree.map(lambda _: batch_sharding, Batch(*([0] * 6)))
    ref_sh = param_sharding if cfg.beta != 0 else None  # no reference params when beta == 0
    extra = (ref_sh, batch_sh)
  return jit_update(grads_fn, optimizer, param_sharding=param_sharding,
                    opt_sharding=opt_sharding, extra_shardings=extra)


def jit_update(grads_fn, optimizer, *, param_sharding=None, opt_sharding=None,
               extra_shardings=None):
  """(params, opt_state, *args) -> (params, opt_state, metrics) under jit, from
  `grads_fn(params, *args) -> (grads, metrics)`: one optimizer step, `grad_norm`
  added to the metrics, params and opt_state donated. With `param_sharding`, the
  params and optimizer state keep their shardings and `extra_shardings` (one per
  arg) place the other inputs. Shared by the GRPO and SFT updates.
  """

  def step(params, opt_state, *args):
    grads, metrics = grads_fn(params, *args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, grad_norm=optax.tree.norm(grads))

  kw: dict[str, Any] = dict(donate_argnums=(0, 1))
  if param_sharding is not None:
    kw.update(in_shardings=(param_sharding, opt_sharding, *extra_shardings),
              out_shardings=(param_sharding, opt_sharding, None))
  return jax.jit(step, **kw)
