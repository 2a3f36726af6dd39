"""The GRPO update: log-probs of completions, the loss, and one jitted, sharded step.

    loss_cfg = loss_config_from(config.rl)        # or loss_config(G, beta=0.0, loss_type="dapo")
    step_fn = make_update_step(graphdef, optimizer, loss_cfg, ...)
    params, opt_state, metrics = step_fn(params, opt_state, ref_params, batch)

The loss itself is `losses.grpo_loss` (docs/maths.md); its keyword arguments
come from config.rl under the same names, so a new loss option is a new
keyword there and a config key, nothing in between.

Work saved against a plain implementation (docs/design.md):
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
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from grpo_jax import lora, losses, optim
from grpo_jax.models import transformer


@struct.dataclass
class Batch:
  """One rollout, B prompts x G completions (N = B * G rows, prompt-major)."""
  prompts: jax.Array  # [B, P] int32, left-padded
  prompt_mask: jax.Array  # [B, P] int32
  completions: jax.Array  # [N, T] int32
  completion_mask: jax.Array  # [N, T] int32, up to and including the stop token
  old_logps: jax.Array  # [N, T] float32, the sampler's log-probs (pi_old when num_iterations > 1)
  advantages: jax.Array  # [N] float32, or [N, T] per token (PPO: GAE, critic.py)


# The per-token arrays the step itself passes (not settings, so not in a LossConfig).
_ARRAY_KEYWORDS = ("entropy", "sampler_logps")
LOSS_KEYWORDS = tuple(name for name, p in inspect.signature(losses.grpo_loss).parameters.items()
                      if p.kind == p.KEYWORD_ONLY and name not in _ARRAY_KEYWORDS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the loss, hashable so the step can close over them.

  `options` are (keyword, value) pairs for `losses.grpo_loss`; build it with `loss_config`
  or `loss_config_from`.
  """
  num_generations: int
  temperature: float = 1.0
  use_old_logps: bool = False  # True when num_iterations > 1: the sampler's log-probs are pi_old
  chunk_size: int = 64
  options: tuple[tuple[str, Any], ...] = ()
  remat: str = "none"  # what the policy's backward keeps of each layer (config.model.remat)

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.options)

  @property
  def beta(self) -> float:
    return self.kwargs.get("beta", inspect.signature(losses.grpo_loss).parameters["beta"].default)

  @property
  def token_mean(self) -> bool:
    """The loss is a token mean over the whole batch, across micro-batches (dapo, cispo).

    Not bnpo: TRL's bnpo is a token mean over each micro-batch, and so is ours.
    """
    return self.kwargs.get("loss_type", "grpo") in losses.GLOBAL_TOKEN_MEAN_LOSS_TYPES

  @property
  def needs_entropy(self) -> bool:
    """The loss uses the per-token entropies (an entropy bonus or the top-entropy mask)."""
    kw = self.kwargs
    return kw.get("entropy_coef", 0.0) != 0 or kw.get("top_entropy_quantile", 1.0) < 1


def loss_config(num_generations: int, *, temperature: float = 1.0, use_old_logps: bool = False,
                chunk_size: int = 64, remat: str = "none", **grpo_loss_kwargs) -> LossConfig:
  """A LossConfig from `losses.grpo_loss` keyword arguments (beta=..., loss_type=..., ...)."""
  unknown = sorted(set(grpo_loss_kwargs) - set(LOSS_KEYWORDS))
  if unknown:
    raise TypeError(f"grpo_loss has no keyword {unknown}; it takes {list(LOSS_KEYWORDS)}")
  return LossConfig(num_generations, temperature, use_old_logps, chunk_size,
                    tuple(sorted(grpo_loss_kwargs.items())), remat)


def loss_config_from(rl, remat: str = "none") -> LossConfig:
  """The LossConfig of config.rl: every grpo_loss keyword that config.rl sets, by name; `remat`
  is config.model.remat."""
  return loss_config(rl.num_generations, temperature=rl.temperature,
                     use_old_logps=rl.num_iterations > 1, remat=remat,
                     **{k: rl[k] for k in LOSS_KEYWORDS if k in rl})


def completion_logps(model, prompts_BxP, prompt_mask_BxP, completions_NxT, completion_mask_NxT, *,
                     num_generations: int, temperature: float = 1.0, chunk_size: int = 64,
                     remat: str = "none"):
  """log pi(completion token | prompt, earlier tokens) and entropies, [N, T] each.

  The prompt is run once (B rows); completion rows attend to it as a shared
  prefix. Completion token 0 is predicted by the prompt's last position, token
  t > 0 by completion token t - 1. Logits are divided by `temperature` (as
  when sampling), so the log-probs are the sampling policy's. `remat`: what the
  backward keeps of each layer (`transformer.REMAT`).
  """
  hidden = transformer.completion_hidden_states(
      model, prompts_BxP, prompt_mask_BxP, completions_NxT, completion_mask_NxT,
      num_generations=num_generations, remat=remat)
  inv_t = 1.0 / (temperature if temperature > 0 else 1.0)
  head = lambda h: model.logits(h) * inv_t  # noqa: E731
  return losses.token_logps_and_entropy(hidden, completions_NxT, head, chunk_size=chunk_size)


def reference_model(graphdef, params, ref_params):
  """The KL reference, without gradient: `ref_params`' model, or with LoRA (ref_params None)
  the same base as the policy's with the adapters off: no second copy of the weights."""
  if ref_params is not None:
    return nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
  if not lora.has_adapters(params):
    raise ValueError("beta != 0 needs reference params (or LoRA adapters, whose base is it)")
  return lora.without_adapters(nnx.merge(graphdef, jax.lax.stop_gradient(params)))


def loss_and_metrics(params, ref_params, graphdef, batch: Batch, cfg: LossConfig):
  """GRPO loss of one (micro-)batch and its metrics (all scalars)."""
  lp = functools.partial(completion_logps, num_generations=cfg.num_generations,
                         temperature=cfg.temperature, chunk_size=cfg.chunk_size)
  args = (batch.prompts, batch.prompt_mask, batch.completions, batch.completion_mask)
  logps, entropy = lp(nnx.merge(graphdef, params), *args, remat=cfg.remat)
  ref_logps = None  # the reference has no backward (stop_gradient): nothing to rematerialise
  if cfg.beta != 0:
    ref_logps, _ = lp(reference_model(graphdef, params, ref_params), *args)
    ref_logps = jax.lax.stop_gradient(ref_logps)
  old = batch.old_logps if cfg.use_old_logps else jax.lax.stop_gradient(logps)
  # The sampler's log-probs: with one update per rollout `old` is the trainer's own, and the
  # two differ by the sampler's numerics (logged as mismatch/*, corrected by
  # rollout_correction); with several, old is the sampler's and they agree by construction.
  loss, metrics = losses.grpo_loss(logps, old, ref_logps, batch.advantages,
                                   batch.completion_mask, sampler_logps=batch.old_logps,
                                   entropy=entropy if cfg.needs_entropy else None, **cfg.kwargs)
  mask = batch.completion_mask.astype(jnp.float32)
  metrics = dict(metrics, loss=loss, entropy=losses.masked_mean(entropy, mask))
  return loss, metrics


def _micro_weight(mb: Batch, full: Batch, cfg: LossConfig, parts: int):
  """Weight of a micro-batch's loss in the batch's loss.

  dapo and cispo are a token mean over the whole batch: weight by the share of tokens, and the
  sum is the whole batch's loss. The others get 1/parts: for per-sequence means (grpo, sapo,
  gmpo, dr_grpo; equal-size micro-batches) that is again the whole batch's loss; bnpo becomes
  the mean of the micro-batches' token means, as in TRL (docs/maths.md section 7).
  """
  if cfg.token_mean:
    return jnp.sum(mb.completion_mask) / jnp.maximum(jnp.sum(full.completion_mask), 1)
  return 1.0 / parts


def grads_and_metrics(params, ref_params, graphdef, batch: Batch, cfg: LossConfig,
                      grad_accum_steps: int = 1):
  """Gradients of the batch's loss with respect to the trainable params (`lora.trainable`: the
  adapters with LoRA, else all), accumulated over micro-batches with lax.scan."""
  grad_fn = lora.grad(loss_and_metrics)
  if grad_accum_steps == 1:
    grads, metrics = grad_fn(params, ref_params, graphdef, batch, cfg)
    return grads, metrics
  grads, metrics, weights = optim.accumulate(
      lambda mb: grad_fn(params, ref_params, graphdef, mb, cfg), lora.trainable(params),
      optim.split_micro_batches(batch, grad_accum_steps),
      lambda mb: _micro_weight(mb, batch, cfg, grad_accum_steps))
  # Metrics are token means or per-sequence means: combine like the loss; maxima by a max.
  def combine(name, m):
    if name in losses.MAX_METRICS:
      return jnp.max(m)
    return jnp.sum(m * weights) if cfg.token_mean else jnp.mean(m)

  return grads, {name: combine(name, m) for name, m in metrics.items()}


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
    # No reference params when beta == 0, nor with LoRA (the base with adapters off).
    ref_sh = param_sharding if cfg.beta != 0 and not lora.has_adapters(param_sharding) else None
    extra = (ref_sh, batch_sh)
  return optim.jit_update(grads_fn, optimizer, param_sharding=param_sharding,
                    opt_sharding=opt_sharding, extra_shardings=extra)
