"""The optimizer, gradient accumulation, and the jitted update shared by GRPO and SFT.

    optimizer, lr = make_optimizer(1e-5, total_steps=1000, warmup_steps=10, schedule="cosine")
    update = jit_update(grads_fn, optimizer, param_sharding=..., opt_sharding=...,
                        extra_shardings=(...))
    params, opt_state, metrics = update(params, opt_state, *args)

`grads_fn(params, *args) -> (grads, metrics)` is the algorithm's (grpo.py,
sft.py); with micro-batches it is built on `accumulate`, which sums weighted
micro-batch gradients in a `lax.scan` so one micro-batch's activations live at
a time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from grpo_jax import flop_count, lora, sharding

SCHEDULES = ("constant", "cosine")


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
    raise ValueError(f"opt.schedule={schedule!r} is not supported; expected one of {SCHEDULES}")
  lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                            [warmup_steps]) if warmup_steps else decay
  chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  chain.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*chain), lr


def optimizer_from_config(opt, total_steps: int):
  """`make_optimizer` with the settings of config.opt."""
  return make_optimizer(opt.learning_rate, total_steps=total_steps,
                        warmup_steps=opt.warmup_steps, schedule=opt.schedule,
                        weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm)


def split_micro_batches(batch, parts: int):
  """Arrays [B, ...] -> [parts, B / parts, ...]. For GRPO's prompt-major rows ([B] prompts,
  [N = B * G] completions) each micro-batch holds whole groups."""
  return jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), batch)


def accumulate(grad_fn, params, micro_batches, weight_fn):
  """Σ_i w_i · grad_fn(micro-batch i) over the leading axis of `micro_batches` (lax.scan:
  one micro-batch's activations live at a time), w_i = weight_fn(micro-batch i).

  Returns (gradients, metrics [parts, ...], weights [parts]).
  """
  def body(acc, mb):
    grads, metrics = grad_fn(mb)
    w = weight_fn(mb)
    return jax.tree.map(lambda a, g: a + w * g, acc, grads), (metrics, w)

  grads, (metrics, weights) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                                           micro_batches, unroll=flop_count.SCAN_UNROLL.get())
  return grads, metrics, weights


def jit_update(grads_fn, optimizer, *, param_sharding=None, opt_sharding=None,
               extra_shardings=None):
  """(params, opt_state, *args) -> (params, opt_state, metrics) under jit, from
  `grads_fn(params, *args) -> (grads, metrics)`: one optimizer step, `grad_norm`
  added to the metrics, params and opt_state donated. With LoRA adapters in `params`, grads
  and opt_state are of the adapters alone (`lora.trainable`); the base passes through. With `param_sharding`, the
  params and optimizer state keep their shardings and `extra_shardings` (one per
  arg) place the other inputs, and the step traces under their mesh (`sharding.on_mesh`), so
  the model's activation layouts (`sharding.constrain`) apply.
  """

  def step(params, opt_state, *args):
    grads, metrics = grads_fn(params, *args)  # of the trainable params (`lora.trainable`)
    trainable, frozen = lora.split(params)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    params = lora.join(optax.apply_updates(trainable, updates), frozen)
    return params, opt_state, dict(metrics, grad_norm=optax.tree.norm(grads))

  kw: dict[str, Any] = dict(donate_argnums=(0, 1))
  if param_sharding is None:
    return jax.jit(step, **kw)
  kw.update(in_shardings=(param_sharding, opt_sharding, *extra_shardings),
            out_shardings=(param_sharding, opt_sharding, None))
  return sharding.on_mesh(jax.jit(step, **kw), jax.tree.leaves(param_sharding)[0].mesh)
