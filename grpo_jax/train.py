"""The GRPO training loop: `train_and_evaluate(config, workdir)`.

Each step: B prompts from the task -> G completions each (sampling.py) ->
rewards (host, rewards/) -> [with config.rl.dynamic_sampling, groups whose
rewards all agree give way to informative ones of further rollouts
(dynamic_sampling.py)] -> group advantages (advantages.py), or with
config.rl.advantage_estimator="gae" (PPO) the critic's values and per-token GAE
advantages (critic.py) -> `num_iterations` jitted, sharded updates (grpo.py;
PPO: and as many critic updates) -> metrics.jsonl / TensorBoard / plots
(runner.Log), and a checkpoint every `checkpoint_every` steps, at the end, and
on SIGTERM/SIGINT (runner.Preemption).

Exact resume: the randomness of step s is fold_in(key(seed), s) and its
prompts are the B examples of the task at the data position (s * B, or with
config.rl.dynamic_sampling every example sampled before; dynamic_sampling.py),
which checkpoints keep, so a run restored from the checkpoint of step s
continues exactly as an uninterrupted one.

Multi-host (distributed.py): each process takes the prompts of the batch rows
its devices hold and samples them; the sampled tokens come back to the process
that holds them, which decodes and scores its own completions. Only the small
per-completion numbers (rewards, lengths) are all-gathered, so advantages and
metrics are those of the whole batch. Only process 0 writes files.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import (advantages, config as config_lib, critic, distributed, dynamic_sampling,
                      grpo, lora, metrics_io, rewards, run_dir, runner, sampling, sharding)
from grpo_jax.data import batching, format_prompt, get_task, templates

log = logging.getLogger("grpo_jax")


def tokenize_prompts(texts, tokenizer, max_length):
  """(left-padded prompt ids, mask, cut) at a bucketed length that is the same on every
  process; prompts longer than `max_length` keep their end, and `cut` says whether any was."""
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  longest = distributed.global_max(max(len(i) for i in ids))
  if longest > max_length:
    ids = [i[-max_length:] for i in ids]
  tokens, mask = batching.left_pad(ids, tokenizer.pad_token_id,
                                   min(batching.bucket_length(longest), max_length))
  return tokens, mask, longest > max_length


def reward_functions(cfg, run: runner.Run, params_fn):
  """(reward functions, weights) of config.rewards; the judge (config.judge) is built here,
  since it may be the policy itself (`params_fn()` gives its current params)."""
  reward_fns, weights = rewards.get_reward_fns(list(cfg.rewards), cfg.get("reward_kwargs"),
                                               tokenizer=run.tokenizer)
  if any(name == "judge" for name, _ in reward_fns):  # the one RUNTIME_REWARDS entry
    from grpo_jax import judge

    g = cfg.rl.num_generations
    judge_fn = (judge.judge_reward_from_params(run.graphdef, params_fn, run.tokenizer, g,
                                               template=cfg.judge.template, batch_sh=run.batch_sh)
                if cfg.judge.model == "policy" else
                judge.make_judge_reward(cfg.judge.model, num_generations=g,
                                        template=cfg.judge.template))
    reward_fns = [(name, judge_fn if fn is None else fn) for name, fn in reward_fns]
  return reward_fns, weights


def score(cfg, tokenizer, reward_fns, weights, examples, prompt_texts, out, rows: slice):
  """Rewards on the host that holds the text: this process's completions (`out`: its rows of
  the sampler's "tokens", "lengths" and "truncated", numpy) decoded and scored, then only
  numbers all-gathered, so the whole batch's rewards give its advantages and metrics.

  Returns (this process's completion texts, the whole batch's {"lengths", "truncated",
  "scores": each reward function's unweighted rewards [N, K], NaN = None}, the weighted
  reward [N], the reward metrics).
  """
  g = cfg.rl.num_generations
  texts, lengths = decode(tokenizer, out, tuple(cfg.rl.stop_strings)), out["lengths"]
  columns = {k: [ex[k] for ex in examples for _ in range(g)] for k in examples[0] if k != "prompt"}
  scores = rewards.score_rewards(reward_fns, [t for t in prompt_texts for _ in range(g)], texts,
                                 completion_lengths=lengths.tolist(), **columns)
  whole = distributed.gather_rows({"scores": scores.rewards_NxF, "lengths": lengths,
                                   "truncated": out["truncated"], "errors": scores.errors_F[None]},
                                  rows)
  return (texts, whole, *weigh(whole, scores.names, weights))


def decode(tokenizer, out, stop_strings=()) -> list[str]:
  """The texts of completions (`out`: "tokens" [n, T] and "lengths" [n], numpy), each cut
  before the first of `stop_strings` (config.rl.stop_strings)."""
  return [templates.decode_completion(tokenizer, out["tokens"][i, :n], stop_strings)
          for i, n in enumerate(out["lengths"])]


def weigh(whole, names, weights):
  """(the combined reward [N], the reward metrics) of `score`'s gathered `whole` batch."""
  return rewards.weigh_scores(rewards.Scores(names, whole["scores"], whole["errors"].sum(0)),
                              weights)


@functools.partial(jax.jit, static_argnames=("length", "mask_truncated", "sharding"))
def _trimmed(out: sampling.Completions, *, length: int, mask_truncated: bool, sharding):
  """(completions, their mask, sampling log-probs) cut to `length` tokens, on the device, laid
  out by `sharding`; the mask zeroed for truncated rows when `mask_truncated`."""
  mask = out.mask[:, :length]
  if mask_truncated:
    mask = mask * (~out.truncated)[:, None]
  place = lambda x: jax.lax.with_sharding_constraint(x, sharding)  # noqa: E731
  return place(out.tokens[:, :length]), place(mask), place(out.logps[:, :length])


def update_batch(rl, out, lengths, adv_local, prompts, prompt_mask, batch_sh) -> grpo.Batch:
  """The update's batch from the sampler's output `out` (global arrays, still on the devices):
  completions trimmed to the bucket of the whole batch's longest one (no padding beyond it).
  Only the advantages (this process's rows, numpy) come from the host."""
  t_eff = min(batching.bucket_length(int(lengths.max()), batching.COMPLETION_BUCKETS),
              rl.max_completion_length)
  completions, completion_mask, old_logps = _trimmed(
      out, length=t_eff, mask_truncated=bool(rl.mask_truncated_completions), sharding=batch_sh)
  return grpo.Batch(prompts=prompts, prompt_mask=prompt_mask, completions=completions,
                    completion_mask=completion_mask, old_logps=old_logps,
                    advantages=distributed.to_global(adv_local, batch_sh))


@functools.partial(jax.jit, static_argnames=("num_generations", "scale", "estimator",
                                             "aggregation"))
def _advantages_and_metrics(reward_N, scores_NxK, weights_K, *, num_generations: int, scale: str,
                            estimator: str = "grpo", aggregation: str = "sum_then_normalize"):
  """Advantages [N] and the reward metrics of the whole batch's rewards: one program.

  reward_N is the weighted sum of the reward functions' columns scores_NxK (NaN = None) with
  weights_K: "sum_then_normalize" gives it to `estimator`; "normalize_then_sum" (GDPO) uses the
  columns. The metrics are always of reward_N.
  """
  if aggregation == "normalize_then_sum":
    adv = advantages.multi_reward_advantages(scores_NxK, weights_K, num_generations, scale=scale)
  else:
    adv = advantages.group_advantages(reward_N, num_generations, estimator=estimator, scale=scale)
  return adv, advantages.reward_metrics(reward_N, num_generations)


@functools.partial(jax.jit, static_argnames=("num_generations",))
def _reward_metrics(reward_N, *, num_generations: int):
  """The reward metrics of the whole batch's rewards [N] (PPO's steps; GRPO's come with their
  advantages)."""
  return advantages.reward_metrics(reward_N, num_generations)


class _PendingRecord:
  """A step's metric record whose update metrics are still being computed on the device.

  The loop dispatches the update and goes on to the next step; the record is completed and
  written (`flush`) once the next rollout has been dispatched, or before a checkpoint, so
  that writing metrics never holds the devices up, and a checkpoint never lands before the
  metrics of its step.
  """

  def __init__(self, log_: runner.Log):
    self.log = log_
    self.step = None  # the pending step, None when nothing is pending
    self.finished = None  # when the last update finished (perf_counter)

  def set(self, step, rec, device_metrics, samples, t_start, t_dispatch):
    """Step `step` began at `t_start` and dispatched its update at `t_dispatch`. Until it is
    flushed, `rec` may still be added to (an evaluation)."""
    for leaf in jax.tree.leaves(device_metrics):
      leaf.copy_to_host_async()  # starts the transfer; `wait` and `flush` wait for it
    self.step, self.rec, self.samples = step, rec, samples
    self.device_metrics, self.t_start, self.t_dispatch = device_metrics, t_start, t_dispatch
    self.t_done = None

  def start(self, t: float) -> float:
    """When a step that began at `t` really started: not before the last update finished
    (its rollout needs those params), so that overlapping steps' times do not add up twice."""
    return t if self.finished is None else max(t, self.finished)

  def wait(self) -> None:
    """Blocks until the pending update has run, and notes when (time/update_s ends there)."""
    if self.step is not None and self.t_done is None:
      jax.block_until_ready(self.device_metrics)
      self.t_done = time.perf_counter()

  def flush(self) -> None:
    """Writes the pending record, if any (blocks until its update has run). time/update_s:
    from the update's dispatch until it had run; time/step_s: from the step's start (`start`)
    until its record is complete (an evaluation included)."""
    if self.step is None:
      return
    self.wait()
    metrics = jax.device_get(self.device_metrics)
    t_start = self.start(self.t_start)
    self.finished = self.t_done
    rec = dict(self.rec, **{k: float(v) for k, v in metrics.items()})
    rec["time/update_s"] = self.t_done - self.t_dispatch
    rec["time/step_s"] = time.perf_counter() - t_start
    if self.log.write(self.step, rec):  # a group of completions per logged step
      self.log.write_samples(self.step, self.samples)
    self.step = None


def train_and_evaluate(cfg, workdir: str, *, allow_config_change: bool = False
                       ) -> runner.Records:
  """Runs (or resumes) the GRPO (or PPO) experiment of `cfg` in `workdir`; returns its records
  (`.signum`: the signal that stopped it early, if one did).

  A workdir with checkpoints resumes only with the same config, but for
  run_dir.RESUMABLE_KEYS, unless `allow_config_change` (ConfigError otherwise). The step is
  written out stage by stage (prompts, sampling, rewards, advantages, update, metrics,
  checkpoint) so that it reads top to bottom; each stage is a call.
  """
  # ---------------------------------------------------------------- set-up --
  config_lib.validate(cfg)
  rl, train = cfg.rl, cfg.train
  b, g = train.prompts_per_step, rl.num_generations
  task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  resume = run_dir.check(cfg, workdir, steps=train.steps, allow_config_change=allow_config_change)
  if resume.complete:  # nothing is loaded
    return runner.Records(metrics_io.read_metrics(workdir))
  run, params = runner.setup(cfg, workdir, steps=train.steps,
                             optimizer_steps=train.steps * rl.num_iterations,
                             history=resume.history)
  tokenizer, batch_sh = run.tokenizer, run.batch_sh
  # The reference is the initial policy; a copy, since the policy's buffers are donated. With
  # LoRA it is the frozen base itself, adapters off (grpo.loss_and_metrics): no copy.
  ref_params = (jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=run.param_sh)(params)
                if rl.beta != 0 and not lora.has_adapters(params) else None)
  # PPO: the critic, a ValueModel whose trunk is a copy of the policy's (critic.py).
  ppo_critic, critic_init = None, None
  if critic.enabled(rl):
    ppo_critic, critic_params = critic.make_critic(cfg, run, params)
    critic_init = ppo_critic.init_state(critic_params)
    del critic_params
  # position: the examples consumed
  state, start, position = runner.restore_or_init(run, params, critic=critic_init)
  del params, critic_init
  reward_fns, weights = reward_functions(cfg, run, lambda: state.params)
  reward_names = [name for name, _ in reward_fns]
  loss_cfg = critic.policy_loss_config(cfg)  # with rl.kl_in_reward, no KL term in the loss
  update = grpo.make_update_step(run.graphdef, run.optimizer, loss_cfg,
                                 grad_accum_steps=train.grad_accum_steps,
                                 param_sharding=run.param_sh, opt_sharding=run.opt_sh,
                                 batch_sharding=batch_sh)
  loss_ref = ref_params if loss_cfg.beta != 0 else None  # the reference the loss reads
  if ppo_critic is not None:
    ppo_advantages = critic.make_advantages_fn(cfg, ppo_critic, run.graphdef,
                                               param_sh=run.param_sh, batch_sh=batch_sh,
                                               mesh=run.mesh)
    critic_update = critic.make_update_step(cfg, ppo_critic, batch_sh=batch_sh)
  stop_strings = tuple(rl.stop_strings)
  stop_ids, pad_id = templates.stop_ids(tokenizer, stop_strings), tokenizer.pad_token_id
  prompt_rows = distributed.local_rows(batch_sh, b)  # this process's share of each batch
  shards = sharding.batch_shards(run.mesh)  # blocks of rows (sample_in_parts)
  rows = slice(prompt_rows.start * g, prompt_rows.stop * g)
  base_key = jax.random.key(train.seed)
  eval_fn = runner.task_evaluator(run, task)
  metrics_log = runner.Log(run, start)
  runner.evaluate_first(run, metrics_log, eval_fn, state.params, start)
  warned_cut, warned_cap, buckets_seen = False, False, set()

  def prompts_at(positions):
    """This process's rows of the prompts of the task's examples `positions` [B]: (examples,
    prompt texts, token ids [B, P] and mask as global arrays)."""
    nonlocal warned_cut
    examples = [task.train_batch(int(i), 1)[0] for i in positions[prompt_rows]]
    texts = [format_prompt(ex, cfg.task.template, tokenizer) for ex in examples]
    tokens, mask, cut = tokenize_prompts(texts, tokenizer, rl.max_prompt_length)
    if cut and not warned_cut:
      log.warning("a prompt has more than rl.max_prompt_length=%d tokens; keeping its last %d "
                  "(this warning is shown once)", rl.max_prompt_length, rl.max_prompt_length)
      warned_cut = True
    return (examples, texts, *distributed.to_global((tokens, mask), batch_sh))

  def rollout(prompts, prompt_mask, key):
    """The sampler's completions of the prompts (global arrays, on the devices). It decodes
    from its own copy of the weights (compute dtype, whole on each device but for the tensor
    split; with LoRA the adapters merged in), dropped as soon as it is done."""
    with jax.set_mesh(run.mesh):
      return sampling.sample_jit(
          run.rollout_graphdef, run.rollout_params(state.params), prompts, prompt_mask, key,
          num_generations=g, max_new_tokens=rl.max_completion_length, stop_ids=stop_ids,
          pad_id=pad_id, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
          parts=rl.rollout_parts, shards=shards)

  def to_host(out):
    """Only what the rewards read comes to the host; log-probs and masks stay on the devices."""
    return distributed.to_local(dict(tokens=out.tokens, lengths=out.lengths,
                                     truncated=out.truncated), batch_sh)

  def extra_rollout(step_key, first_position):
    """dynamic_sampling.fill's `sample`: rollout r samples the B prompts after rollout r - 1's,
    with its own key, and scores them."""
    def sample(r):
      positions = first_position + r * b + np.arange(b)
      examples, texts, prompts, prompt_mask = prompts_at(positions)
      out = rollout(prompts, prompt_mask, jax.random.fold_in(step_key, r))
      _, whole, reward, _ = score(cfg, tokenizer, reward_fns, weights, examples, texts,
                                  to_host(out), rows)
      return dynamic_sampling.Rollout(out, whole, reward, positions)
    return sample

  # ------------------------------------------------------------------ loop --
  # The update of step s runs on the devices while the host prepares step s + 1, and its
  # metrics are written while step s + 1's rollout runs (_PendingRecord).
  pending = _PendingRecord(metrics_log)
  with runner.Preemption() as preemption:
    for step in range(start, train.steps):
      t_step = time.perf_counter()
      if step == start:
        log.info("step %d compiles the sampler and the update (once per shape bucket)", step + 1)
      # The B examples at the data position; this process's prompts: the rows its devices hold.
      step_key, positions = jax.random.fold_in(base_key, step), position + np.arange(b)
      examples, prompt_texts, prompts, prompt_mask = prompts_at(positions)
      out = rollout(prompts, prompt_mask, step_key)
      pending.flush()  # the previous step's metrics, written while this rollout runs
      host = to_host(out)
      t_sample = time.perf_counter() - pending.start(t_step)

      texts, whole, reward, reward_info = score(cfg, tokenizer, reward_fns, weights, examples,
                                                prompt_texts, host, rows)
      position += b
      sampling_rec = {}
      if rl.dynamic_sampling:  # groups whose rewards all agree make way for informative ones
        t_fill = time.perf_counter()
        kept, sampling_rec = dynamic_sampling.fill(
            dynamic_sampling.Rollout(out, whole, reward, positions),
            extra_rollout(step_key, positions[0]), num_generations=g,
            max_rounds=rl.max_dynamic_sampling_rounds, sharding=batch_sh)
        position += int(sampling_rec["dynamic_sampling/extra_rollouts"]) * b
        if (kept.positions != positions).any():  # the batch's prompts and completions changed
          _, prompt_texts, prompts, prompt_mask = prompts_at(kept.positions)
          out, whole, reward = kept.out, kept.whole, kept.reward
          reward_info = weigh(whole, reward_names, weights)[1]
          texts = decode(tokenizer, to_host(out), stop_strings)
        del kept  # its completions are `out` (or none any longer)
        if sampling_rec["dynamic_sampling/cap_hit"] and not warned_cap:
          log.warning(
              "dynamic sampling: step %d has %d informative groups of %d after %d more rollouts "
              "(rl.max_dynamic_sampling_rounds); it trains on the rest, whose rewards all agree, "
              "with advantage 0 (this warning is shown once; dynamic_sampling/cap_hit counts "
              "such steps)", step + 1, sampling_rec["dynamic_sampling/groups_kept"], b,
              rl.max_dynamic_sampling_rounds)
          warned_cap = True
        sampling_rec["time/dynamic_sampling_s"] = time.perf_counter() - t_fill
      if ppo_critic is None:  # group baselines: one advantage per completion
        adv, reward_stats = jax.device_get(_advantages_and_metrics(
            reward, whole["scores"], np.asarray(weights, np.float32), num_generations=g,
            scale=rl.scale_rewards, estimator=rl.advantage_estimator,
            aggregation=rl.multi_objective_aggregation))
        batch = update_batch(rl, out, whole["lengths"], np.asarray(adv)[rows], prompts,
                             prompt_mask, batch_sh)
      else:  # PPO: per-token advantages from the critic's values and GAE, on the devices
        reward_stats = jax.device_get(_reward_metrics(reward, num_generations=g))
        batch = update_batch(rl, out, whole["lengths"], np.zeros(len(reward[rows]), np.float32),
                             prompts, prompt_mask, batch_sh)
        batch, old_values, returns, ppo_metrics = ppo_advantages(
            state.critic.params, ref_params if rl.kl_in_reward else None, batch,
            distributed.to_global(np.asarray(reward, np.float32)[rows], batch_sh))
      del out
      t_eff = batch.completions.shape[1]
      if t_eff not in buckets_seen and step > start:
        log.info("step %d compiles the update for a new completion bucket (%d tokens)",
                 step + 1, t_eff)
      buckets_seen.add(t_eff)
      t_update = time.perf_counter()
      params, opt_state = state.params, state.opt_state
      for _ in range(rl.num_iterations):
        params, opt_state, update_metrics = update(params, opt_state, loss_ref, batch)
      if ppo_critic is not None:  # every epoch reuses the rollout's values and returns
        c_params, c_opt = state.critic.params, state.critic.opt_state
        for _ in range(rl.num_iterations):
          c_params, c_opt, value_metrics = critic_update(c_params, c_opt, batch, old_values,
                                                         returns)
        update_metrics = dict(update_metrics, **value_metrics, **ppo_metrics)
        del old_values, returns
      state = runner.TrainState(params, opt_state, None if ppo_critic is None else
                                state.critic.replace(params=c_params, opt_state=c_opt))

      # ------------------------------------------------------------ metrics --
      done = step + 1
      rec = {k: float(v) for k, v in reward_stats.items()}
      rec.update(reward_info)
      rec.update(sampling_rec)
      rec.update({
          "completions/mean_length": float(whole["lengths"].mean()),
          "completions/clipped_ratio": float(whole["truncated"].mean()),
          "learning_rate": float(run.lr_schedule(step * rl.num_iterations)),
          "time/sample_s": t_sample,  # time/update_s and time/step_s: when the update is done
      })
      samples = {"prompt": prompt_texts[0], "completions": [
          {"text": t, "reward": float(r)} for t, r in zip(texts[:g], reward[rows][:g])]}
      pending.set(done, rec, update_metrics, samples, t_step, t_update)
      if runner.eval_due(run, eval_fn, done):  # it samples from the updated params: waits
        pending.wait()
        rec.update(runner.evaluate_if_due(run, eval_fn, done, state.params))
      if runner.checkpoint_or_stop(run, done, state, preemption, data_position=position,
                                   before_save=pending.flush):
        break
  pending.flush()
  return runner.finish(run, metrics_log, preemption)
