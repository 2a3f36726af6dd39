"""PPO's critic in training (config.rl.advantage_estimator="gae"): its state, the rollout's
values and GAE advantages, and the critic's update.

    critic, critic_params = make_critic(cfg, run, params)  # ValueModel of the policy, AdamW
    state, start, position = runner.restore_or_init(run, params,
                                                    critic=critic.init_state(critic_params))
    advantages_fn = make_advantages_fn(cfg, critic, run.graphdef, param_sh=run.param_sh,
                                       batch_sh=run.batch_sh, mesh=run.mesh)
    update = make_update_step(cfg, critic, batch_sh=run.batch_sh)
    # each step, after the rollout (batch.advantages unused) and its rewards [N]:
    batch, old_values, returns, metrics = advantages_fn(state.critic.params, ref_params,
                                                        batch, rewards_N)
    for _ in range(num_iterations):                      # the same old values and returns
      policy update on batch (per-token advantages [N, T])
      critic_params, critic_opt, value_metrics = update(critic_params, critic_opt, batch,
                                                        old_values, returns)

The critic is a `models.ValueModel` whose trunk is a copy of the policy's params at the start
(its head at zero: every value starts at 0), sharded by the policy's rules
(`sharding.param_shardings`), with its own AdamW of config.opt's settings (learning rate
config.rl.critic_learning_rate when set). It lives in `runner.TrainState.critic` and is
checkpointed with the run (`checkpointing.run_state`). docs/maths.md section 12 has the
formulas.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from grpo_jax import flop_count, grpo, losses, optim, ppo, sharding
from grpo_jax.models import ValueModel


@struct.dataclass
class CriticState:
  """The critic's part of the train state (donated to its update like the policy's)."""
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Critic:
  """The fixed parts of the critic: model definition, optimizer, shardings."""
  graphdef: Any
  optimizer: Any
  param_sh: Any
  opt_sh: Any

  def init_state(self, params) -> tuple[CriticState, CriticState]:
    """(the critic state of `params` with a fresh optimizer state, its shardings):
    `runner.restore_or_init`'s `critic`."""
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_sh)(params)
    return CriticState(params, opt_state), CriticState(self.param_sh, self.opt_sh)


def enabled(rl) -> bool:
  """Whether config.rl trains with a critic (PPO)."""
  return rl.advantage_estimator == ppo.ESTIMATOR


def critic_source(cfg, graphdef, params, mesh):
  """The model whose trunk the critic starts from: the policy (graphdef, params) when
  config.rl.critic_init is "", else that model, loaded and placed on `mesh` as the policy's
  params are. Raises ValueError when its params' shapes differ from the policy's (the critic
  reads the policy's tokens, so it needs the same architecture and vocabulary)."""
  if not cfg.rl.critic_init:
    return nnx.merge(graphdef, params)
  from grpo_jax import models

  model, _ = models.load(cfg.rl.critic_init, dtype=cfg.model.dtype,
                         attention_block=cfg.model.attention_block)
  source_graphdef, source = nnx.split(model)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)  # noqa: E731
  if shapes(nnx.to_pure_dict(source)) != shapes(nnx.to_pure_dict(params)):
    raise ValueError(f"config.rl.critic_init={cfg.rl.critic_init!r}: its params differ in shape "
                     f"or dtype from the policy's ({cfg.model.name!r}); the critic needs the "
                     "policy's architecture and vocabulary")
  source = jax.device_put(source, sharding.param_shardings(mesh, source))
  return nnx.merge(source_graphdef, source)


def make_critic(cfg, run, params) -> tuple[Critic, Any]:
  """(the critic of a run, its first params): `ValueModel.from_policy` of `critic_source`
  (the policy's `params` unless config.rl.critic_init names a model; on `run.mesh`; new
  buffers, zero head), with `critic_for`'s optimizer and shardings."""
  graphdef, critic_params = nnx.split(ValueModel.from_policy(
      critic_source(cfg, run.graphdef, params, run.mesh)))
  the_critic = critic_for(cfg, graphdef, critic_params, run.mesh)
  return the_critic, jax.device_put(critic_params, the_critic.param_sh)


def abstract_critic(graphdef, params) -> tuple[Any, Any]:
  """(graphdef, params as ShapeDtypeStructs) of the critic `make_critic` builds for a policy
  of `graphdef` and (abstract) `params`: shapes only, no memory (ahead-of-time compilation)."""
  return nnx.split(nnx.eval_shape(lambda p: ValueModel.from_policy(nnx.merge(graphdef, p)),
                                  params))


def critic_for(cfg, graphdef, params, mesh) -> Critic:
  """The critic of `graphdef` and its (concrete or abstract) `params`: sharded by the policy's
  rules over `mesh` (None: unsharded), with its own AdamW of config.opt's settings on the
  policy's schedule (train.steps x num_iterations updates; learning rate
  rl.critic_learning_rate when set)."""
  opt, rl = cfg.opt, cfg.rl
  lr = opt.learning_rate if rl.critic_learning_rate is None else rl.critic_learning_rate
  optimizer, _ = optim.make_optimizer(
      lr, total_steps=cfg.train.steps * rl.num_iterations, warmup_steps=opt.warmup_steps,
      schedule=opt.schedule, weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm)
  if mesh is None:
    return Critic(graphdef, optimizer, None, None)
  param_sh = sharding.param_shardings(mesh, params)
  opt_sh = sharding.param_shardings(mesh, jax.eval_shape(optimizer.init, params))
  return Critic(graphdef, optimizer, param_sh, opt_sh)


def policy_loss_config(cfg) -> grpo.LossConfig:
  """The policy loss's settings (`grpo.loss_config_from`); with rl.kl_in_reward PPO's KL is in
  the per-token rewards (beta its coefficient), so the loss's beta is 0."""
  loss_cfg = grpo.loss_config_from(cfg.rl, cfg.model.remat)
  if cfg.rl.kl_in_reward:
    loss_cfg = dataclasses.replace(loss_cfg, options=tuple(
        (k, 0.0 if k == "beta" else v) for k, v in loss_cfg.options))
  return loss_cfg


def _batch_shardings(batch_sh):
  return jax.tree.map(lambda _: batch_sh, grpo.Batch(*([0] * 6)))


def make_advantages_fn(cfg, critic: Critic, policy_graphdef, *, param_sh=None, batch_sh=None,
                       mesh=None):
  """The jitted rollout pass: (critic params, ref params or None, batch, rewards [N]) ->
  (batch with per-token advantages [N, T], old values [N, T], returns [N, T], metrics).

  `policy_graphdef`: the reference's model (with kl_in_reward); `param_sh` its params'
  shardings, `batch_sh` the batch's, on `mesh` (all None: unsharded, for one device).

  Values come from the critic (no gradient), a micro-batch at a time (train.grad_accum_steps
  parts, as the update runs); with config.rl.kl_in_reward the reference's log-probs too, and
  the per-token reward is r_t = R [last token] - beta * KL_t, KL_t = rl.kl_estimator of the
  sampler's log-probs against the reference's. A missing reward (NaN) counts as 0. Then GAE
  (rl.gamma, rl.lam), whitened over the batch's tokens with rl.whiten_advantages.
  """
  rl = cfg.rl
  g, parts = rl.num_generations, cfg.train.grad_accum_steps
  kl_coef = float(rl.beta) if rl.kl_in_reward else 0.0

  def forwards(critic_params, ref_params, batch: grpo.Batch):
    """Values [N, T] and (with kl_in_reward) the reference's log-probs [N, T] of one part."""
    args = (batch.prompts, batch.prompt_mask, batch.completions, batch.completion_mask)
    values = ppo.completion_values(nnx.merge(critic.graphdef, critic_params), *args,
                                   num_generations=g)
    if not kl_coef:
      return values, jnp.zeros_like(values)
    ref_logps, _ = grpo.completion_logps(nnx.merge(policy_graphdef, ref_params), *args,
                                         num_generations=g, temperature=rl.temperature)
    return values, ref_logps

  def fn(critic_params, ref_params, batch: grpo.Batch, rewards_N):
    if parts == 1:
      values, ref_logps = forwards(critic_params, ref_params, batch)
    else:
      # A scan (unrolled when FLOPs are counted: flop_count), a micro-batch at a time.
      _, (values, ref_logps) = jax.lax.scan(
          lambda _, mb: (None, forwards(critic_params, ref_params, mb)), None,
          optim.split_micro_batches(batch, parts), unroll=flop_count.SCAN_UNROLL.get())
      values, ref_logps = (x.reshape(-1, x.shape[-1]) for x in (values, ref_logps))
    mask = batch.completion_mask
    kl = losses.kl_divergence(batch.old_logps, ref_logps, rl.kl_estimator) if kl_coef else None
    rewards_N = jnp.nan_to_num(rewards_N.astype(jnp.float32), nan=0.0)
    token_rewards = ppo.token_rewards(rewards_N, mask, kl=kl, kl_coef=kl_coef)
    adv, returns = ppo.gae(token_rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
    metrics = {"value/advantages_mean": ppo.masked_mean(adv, mask)}
    if kl_coef:
      metrics["kl"] = ppo.masked_mean(kl, mask)
    if rl.whiten_advantages:
      adv = ppo.whiten(adv, mask)
    return batch.replace(advantages=adv), values, returns, metrics

  if batch_sh is None:
    return jax.jit(fn)
  batch_tree = _batch_shardings(batch_sh)
  ref_sh = param_sh if kl_coef else None
  jitted = jax.jit(fn, in_shardings=(critic.param_sh, ref_sh, batch_tree, batch_sh),
                   out_shardings=(batch_tree, batch_sh, batch_sh, None))
  return sharding.on_mesh(jitted, mesh)


def make_update_step(cfg, critic: Critic, *, batch_sh=None):
  """The critic's update: (params, opt_state, batch, old values [N, T], returns [N, T])
  -> (params, opt_state, metrics), params and opt_state donated; `update_step_jit`'s step
  with its gradient norm named value/grad_norm.
  """
  step = update_step_jit(cfg, critic, batch_sh=batch_sh)

  def update(params, opt_state, batch, old_values, returns):
    params, opt_state, metrics = step(params, opt_state, batch, old_values, returns)
    metrics["value/grad_norm"] = metrics.pop("grad_norm")
    return params, opt_state, metrics

  return update


def update_step_jit(cfg, critic: Critic, *, batch_sh=None):
  """The critic's jitted update step (what `make_update_step` calls and the ahead-of-time
  tool compiles), its batch arrays placed by `batch_sh` (None: unsharded).

  Loss: rl.vf_coef x `ppo.value_loss` (clipped at rl.cliprange_value), a token mean over the
  batch; with micro-batches (train.grad_accum_steps) each part's gradient and metrics weigh by
  its share of the tokens (value/explained_variance is then that weighted mean of the
  parts'). Metrics: value/loss (unweighted by vf_coef), value/clip_fraction, value/mean,
  value/returns_mean, value/explained_variance, grad_norm.
  """
  rl, parts = cfg.rl, cfg.train.grad_accum_steps

  def loss_fn(params, mb):
    batch, old_values, returns = mb
    values = ppo.completion_values(
        nnx.merge(critic.graphdef, params), batch.prompts, batch.prompt_mask, batch.completions,
        batch.completion_mask, num_generations=rl.num_generations, remat=cfg.model.remat)
    loss, metrics = ppo.value_loss(values, old_values, returns, batch.completion_mask,
                                   cliprange_value=rl.cliprange_value)
    return rl.vf_coef * loss, metrics

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def grads_fn(params, batch, old_values, returns):
    whole = (batch, old_values, returns)
    if parts == 1:
      return grad_fn(params, whole)
    total = jnp.maximum(jnp.sum(batch.completion_mask), 1)
    grads, metrics, weights = optim.accumulate(
        lambda mb: grad_fn(params, mb), params, optim.split_micro_batches(whole, parts),
        lambda mb: jnp.sum(mb[0].completion_mask) / total)
    return grads, {k: jnp.sum(m * weights) for k, m in metrics.items()}

  extra = None if batch_sh is None else (_batch_shardings(batch_sh), batch_sh, batch_sh)
  return optim.jit_update(grads_fn, critic.optimizer, param_sharding=critic.param_sh,
                          opt_sharding=critic.opt_sh, extra_shardings=extra)

