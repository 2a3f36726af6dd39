"""The GRPO training loop: `train_and_evaluate(config, workdir)`.

Each step: B prompts from the task -> G completions each (sampling.py) ->
rewards (host, rewards/) -> group advantages -> `num_iterations` jitted,
sharded updates (grpo.py) -> metrics.jsonl / TensorBoard / plots, and a
checkpoint every `checkpoint_every` steps, at the end, and on SIGTERM/SIGINT.

Exact resume: the randomness of step s is fold_in(key(seed), s) and its
prompts are examples [s * B, (s + 1) * B) of the task, so a run restored
from the checkpoint of step s continues exactly as an uninterrupted one.

Multi-host (jax.distributed): each process takes the prompts of the batch
rows its devices hold, tokenises them, and the global arrays are assembled
from these process-local pieces. Sampled tokens come back to the process that
holds them, which decodes and scores its own completions; only the small
per-completion numbers (rewards, lengths) are all-gathered, so advantages and
metrics are those of the whole batch. Only process 0 writes files.

`Run` is the part of a run that supervised fine-tuning (sft.py) shares: mesh,
model, shardings, memory check, optimizer, checkpoints and resume, metrics,
plots and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from grpo_jax import (advantages, checkpointing, config as config_lib, evaluate, grpo, memory,
                      metrics_io, models, rewards, sampling, sharding)
from grpo_jax.data import batching, format_prompt, get_task

log = logging.getLogger("grpo_jax")


def process_rows(sharding_, n: int) -> slice:
  """The rows [start, stop) of an n-row batch that this process's devices hold."""
  spans = [idx[0] for idx in sharding_.addressable_devices_indices_map((n,)).values()]
  return slice(min(s.start or 0 for s in spans), max(n if s.stop is None else s.stop for s in spans))


def to_device(local, sharding_, rows: slice, n: int):
  """A global [n, ...] array placed with `sharding_`, from this process's `rows` of it."""
  local = np.asarray(local)

  def piece(idx):
    start, stop, _ = idx[0].indices(n)
    return local[(slice(start - rows.start, stop - rows.start), *idx[1:])]

  return jax.make_array_from_callback((n, *local.shape[1:]), sharding_, piece)


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
  """This process's `rows` of a global array (leading dim = batch), on the host."""
  if x.is_fully_addressable:
    return np.asarray(x)[rows]
  out = np.empty((rows.stop - rows.start, *x.shape[1:]), x.dtype)
  for shard in x.addressable_shards:
    start, stop, _ = shard.index[0].indices(x.shape[0])
    lo, hi = max(start, rows.start), min(stop, rows.stop)
    if lo < hi:
      out[(slice(lo - rows.start, hi - rows.start), *shard.index[1:])] = (
          np.asarray(shard.data)[lo - start:hi - start])
  return out


def gather_rows(tree, rows: slice):
  """The whole batch from every process's `rows` of it (numpy leaves), in row order.

  Processes that hold the same rows (the batch replicated across them) count once.
  """
  if jax.process_count() == 1:
    return tree
  starts = multihost_utils.process_allgather(np.int64(rows.start))
  order = sorted({int(s): p for p, s in reversed(list(enumerate(starts)))}.items())
  everyone = multihost_utils.process_allgather(tree)  # leaves [processes, rows, ...]
  return jax.tree.map(lambda x: np.concatenate([x[p] for _, p in order]), everyone)


def global_max(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def tokenize_prompts(texts, tokenizer, max_length):
  """Left-padded prompt ids at a bucketed length (the same on every process); prompts longer
  than the limit keep their end."""
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  longest = global_max(max(len(i) for i in ids))
  if longest > max_length:
    if not tokenize_prompts.warned:
      log.warning("a prompt has more than rl.max_prompt_length=%d tokens; keeping its last %d "
                  "(this warning is shown once)", max_length, max_length)
      tokenize_prompts.warned = True
    ids = [i[-max_length:] for i in ids]
  return batching.left_pad(ids, tokenizer.pad_token_id,
                           min(batching.bucket_length(longest), max_length))


tokenize_prompts.warned = False


@dataclasses.dataclass
class Run:
  """What the GRPO loop (`train_and_evaluate`) and the SFT loop (`sft.train_sft`) share.

      run, params = start_run(cfg, workdir)      # mesh, model on it, memory check, config.json
      params, opt_state = run.start_training(params, steps, eval_fn=...)  # optimizer; resumes
      run.evaluate_first(params)                 # step 0 of a fresh run
      with checkpointing.preemption_guard() as guard:
        for step in range(run.start, steps):
          ...                                    # the update of `step`
          if run.eval_due(step + 1): rec.update(run.evaluate(params))
          run.log(step + 1, rec)
          if run.checkpoint(step + 1, params, opt_state, guard, data_position=...): break
      return run.close()                         # the run's metric records

  Params and optimizer state are not kept here: the loops own them (donated each update).
  """
  cfg: Any
  workdir: str
  is_main: bool
  mesh: Any
  tokenizer: Any
  model_cfg: Any
  graphdef: Any
  param_sh: Any
  batch_sh: Any
  # Set by start_training:
  steps: int = 0
  optimizer: Any = None
  lr_schedule: Callable[[int], Any] | None = None
  opt_sh: Any = None
  ckpt: checkpointing.Checkpointer | None = None
  start: int = 0  # the step the run resumes from (0: a fresh run)
  writer: metrics_io.MetricsWriter | None = None
  progress: metrics_io.ProgressLine | None = None
  records: list[dict] = dataclasses.field(default_factory=list)
  eval_fn: Callable[[Any], dict] | None = None  # params -> eval/* metrics; None: no evaluation

  def start_training(self, params, steps: int, *, optimizer_steps: int | None = None,
                     eval_fn: Callable[[Any], dict] | None = None):
    """The optimizer (config.opt) and its state, restored with the params from the workdir's
    latest checkpoint if it has one; the metrics writer and progress line. -> (params, opt_state).

    Args:
      params: the starting params (placed with `param_sh`).
      steps: the run's number of steps (logging, evaluation and checkpoint schedule).
      optimizer_steps: updates over the run, for the learning-rate schedule (default `steps`).
      eval_fn: params -> eval/* metrics, run before the first step and when `eval_due`.
    """
    cfg, train = self.cfg, self.cfg.train
    self.steps, self.eval_fn = steps, eval_fn
    self.optimizer, self.lr_schedule = grpo.make_optimizer(
        cfg.opt.learning_rate, total_steps=optimizer_steps or steps,
        warmup_steps=cfg.opt.warmup_steps, schedule=cfg.opt.schedule,
        weight_decay=cfg.opt.weight_decay, max_grad_norm=cfg.opt.max_grad_norm)
    self.opt_sh = sharding.param_shardings(self.mesh, jax.eval_shape(self.optimizer.init, params))
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_sh)(params)

    self.ckpt = checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                           train.keep_checkpoints)
    self.start = self.ckpt.latest_step() or 0
    if self.start:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              {"params": params, "opt_state": opt_state},
                              {"params": self.param_sh, "opt_state": self.opt_sh})
      state, meta = self.ckpt.restore(abstract_state=abstract)
      params, opt_state = state["params"], state["opt_state"]
      log.info("resumed from step %d (data position %d)", self.start, meta["data_position"])
    if self.is_main:
      self.writer = metrics_io.MetricsWriter(self.workdir, resume_step=self.start)
      self.progress = metrics_io.ProgressLine(steps)
    self.records = metrics_io.read_metrics(self.workdir) if self.start and self.is_main else []
    return params, opt_state

  def task_evaluator(self, task) -> Callable[[Any], dict] | None:
    """params -> the eval/* metrics of `task`'s held-out problems (config.eval); None when
    config.eval.num_problems is 0. The sampling key is the same at every evaluation."""
    cfg = self.cfg
    if not cfg.eval.num_problems:
      return None
    examples = task.eval_examples(cfg.eval.num_problems)
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 2**31 - 1)  # no step reaches it
    stop_ids = sampling.stop_ids(self.tokenizer)
    return lambda params: evaluate.evaluate(
        self.graphdef, params, self.tokenizer, examples, template=cfg.task.template,
        num_samples=cfg.eval.num_samples, temperature=cfg.eval.temperature,
        max_new_tokens=cfg.rl.max_completion_length, key=key, stop_ids=stop_ids,
        prompts_per_batch=cfg.eval.prompts_per_batch,
        correct_fn=rewards.REWARD_FUNCTIONS[cfg.eval.reward])

  def evaluate(self, params) -> dict:
    t = time.perf_counter()
    return dict(self.eval_fn(params), **{"time/eval_s": time.perf_counter() - t})

  def eval_due(self, step: int) -> bool:
    """step = updates done (>= 1; step 0 is evaluated by `evaluate_first`)."""
    every = self.cfg.train.eval_every
    return self.eval_fn is not None and bool(step == self.steps or (every and step % every == 0))

  def evaluate_first(self, params) -> None:
    """A fresh run with an evaluation records one of the starting params as step 0."""
    if self.start == 0 and self.eval_fn is not None:
      self.records.append(_write(self.writer, self.progress, 0, self.evaluate(params)))

  def log(self, step: int, rec: dict) -> bool:
    """Records step `step` when due (every train.log_every steps, with an evaluation, at the
    last step) and rewrites the plots now and then; True if recorded."""
    evaluated = any(k.startswith("eval/") for k in rec)
    due = step % self.cfg.train.log_every == 0 or evaluated or step == self.steps
    if due:
      self.records.append(_write(self.writer, self.progress, step, rec))
    if self.is_main and (step % 5 == 0 or step == self.steps or evaluated):
      metrics_io.write_plots(self.workdir, self.records)
    return due

  def checkpoint(self, step: int, params, opt_state, guard, *, data_position: int) -> bool:
    """Saves step `step` when due (every train.checkpoint_every steps, the last step, a
    signal); True when a signal asks the run to stop now."""
    train = self.cfg.train
    if step % train.checkpoint_every == 0 or step == self.steps or guard.requested:
      self.ckpt.save(step, {"params": params, "opt_state": opt_state},
                     meta={"step": step, "data_position": data_position, "seed": train.seed})
    if guard.requested:
      log.warning("signal %s: checkpointed step %d, stopping", guard.signum, step)
    return guard.requested

  def close(self) -> list[dict]:
    """Waits for the last checkpoint, writes the final plots; returns the metric records."""
    self.ckpt.wait()
    self.ckpt.close()
    if self.is_main:
      metrics_io.write_plots(self.workdir, self.records)
      self.writer.close()
      self.progress.close()
    return self.records


def start_run(cfg, workdir: str, *, memory_cfg=None) -> tuple[Run, Any]:
  """The start of a run: the mesh, the model (params placed on it), the device memory check
  and WORKDIR/config.json (which makes the workdir loadable by `models.load`).

  Args:
    cfg: the validated experiment config.
    workdir: the run directory (created).
    memory_cfg: the config whose shapes the memory estimate reads (default `cfg`).
  Returns:
    (run, params): params are the model's as loaded, sharded by name over the mesh.
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = config_lib.make_mesh(cfg)
  log.info("loading model %s", cfg.model.name)
  model, tokenizer = models.load(cfg.model.name, dtype=cfg.model.dtype)
  config_lib.validate_with_model(cfg, model.cfg)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))

  model_cfg = model.cfg
  graphdef, params = nnx.split(model)
  del model
  param_sh = sharding.param_shardings(mesh, params)
  batch_sh = sharding.batch_sharding(mesh)
  params = jax.device_put(params, param_sh)
  est = memory.estimate(memory_cfg or cfg, model_cfg, mesh,
                        param_bytes=sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
                                        for x, sh in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(param_sh))))
  log.info("memory per device (estimate):\n%s", est.table())
  memory.check(est, memory.device_memory_limit(cfg))
  return Run(cfg, workdir, is_main, mesh, tokenizer, model_cfg, graphdef, param_sh,
             batch_sh), params


def train_and_evaluate(cfg, workdir: str) -> list[dict]:
  """Runs (or resumes) the GRPO experiment of `cfg` in `workdir`; returns its metric records."""
  # ---------------------------------------------------------------- set-up --
  config_lib.validate(cfg)
  rl, train = cfg.rl, cfg.train
  b, g = train.prompts_per_step, rl.num_generations
  task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  run, params = start_run(cfg, workdir)
  graphdef, tokenizer, batch_sh = run.graphdef, run.tokenizer, run.batch_sh
  reward_fns, weights = rewards.get_reward_fns(list(cfg.rewards))
  if any(name == "judge" for name, _ in reward_fns):  # the one RUNTIME_REWARDS entry
    from grpo_jax import judge

    judge_fn = (judge.judge_reward_from_params(graphdef, lambda: params, tokenizer, g,
                                               template=cfg.judge.template)
                if cfg.judge.model == "policy" else
                judge.make_judge_reward(cfg.judge.model, num_generations=g,
                                        template=cfg.judge.template))
    reward_fns = [(name, judge_fn if fn is None else fn) for name, fn in reward_fns]
  # The reference is the initial policy; a copy, since the policy's buffers are donated.
  ref_params = (jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=run.param_sh)(params)
                if rl.beta != 0 else None)
  params, opt_state = run.start_training(params, train.steps,
                                         optimizer_steps=train.steps * rl.num_iterations,
                                         eval_fn=run.task_evaluator(task))

  loss_cfg = grpo.LossConfig(
      num_generations=g, beta=rl.beta, epsilon=rl.epsilon, epsilon_high=rl.epsilon_high,
      loss_type=rl.loss_type, kl_estimator=rl.kl_estimator,
      importance_sampling_level=rl.importance_sampling_level,
      max_completion_length=rl.max_completion_length, temperature=rl.temperature,
      use_old_logps=rl.num_iterations > 1)
  update = grpo.make_update_step(graphdef, run.optimizer, loss_cfg,
                                 grad_accum_steps=train.grad_accum_steps,
                                 param_sharding=run.param_sh, opt_sharding=run.opt_sh,
                                 batch_sharding=batch_sh)
  stop_ids, pad_id = sampling.stop_ids(tokenizer), tokenizer.pad_token_id
  prompt_rows = process_rows(batch_sh, b)  # this process's share of each step's batch
  rows = slice(prompt_rows.start * g, prompt_rows.stop * g)
  base_key = jax.random.key(train.seed)
  run.evaluate_first(params)
  update_programs = None

  # ------------------------------------------------------------------ loop --
  with checkpointing.preemption_guard() as guard:
    for step in range(run.start, train.steps):
      t_step = time.perf_counter()
      # This process's prompts: the batch rows its devices hold.
      examples = task.train_batch(step * b + prompt_rows.start,
                                  prompt_rows.stop - prompt_rows.start)
      prompt_texts = [format_prompt(ex, cfg.task.template, tokenizer) for ex in examples]
      prompts, prompt_mask = tokenize_prompts(prompt_texts, tokenizer, rl.max_prompt_length)
      prompts = to_device(prompts, batch_sh, prompt_rows, b)
      prompt_mask = to_device(prompt_mask, batch_sh, prompt_rows, b)
      out = sampling.sample_jit(
          graphdef, params, prompts, prompt_mask, jax.random.fold_in(base_key, step),
          num_generations=g, max_new_tokens=rl.max_completion_length, stop_ids=stop_ids,
          pad_id=pad_id, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)
      out = jax.tree.map(lambda x: local_rows(x, rows), out)
      t_sample = time.perf_counter() - t_step

      # Rewards on the host that holds the text: strings in, one float per completion out.
      n_local = len(out.lengths)
      texts = [tokenizer.decode(out.tokens[i, :out.lengths[i]], skip_special_tokens=True)
               for i in range(n_local)]
      columns = {k: [ex[k] for ex in examples for _ in range(g)] for k in examples[0]
                 if k != "prompt"}
      scores = rewards.score_rewards(reward_fns, [t for t in prompt_texts for _ in range(g)], texts,
                                     completion_lengths=out.lengths.tolist(), **columns)
      # Only numbers cross hosts: the whole batch's scores give its advantages and metrics.
      whole = gather_rows({"scores": scores.rewards_NxF, "lengths": out.lengths,
                           "truncated": out.truncated, "errors": scores.errors_F[None]}, rows)
      scores = rewards.Scores(scores.names, whole["scores"], whole["errors"].sum(0),
                              scores.on_error)
      reward, reward_info = rewards.weigh_scores(scores, weights)
      adv = np.asarray(advantages.group_advantages(jnp.asarray(reward), g,
                                                   scale=rl.scale_rewards))

      # Trim to the bucket of the longest completion: no padding beyond it.
      t_eff = min(batching.bucket_length(int(whole["lengths"].max()), batching.COMPLETION_BUCKETS),
                  rl.max_completion_length)
      mask = out.mask[:, :t_eff]
      if rl.mask_truncated_completions:
        mask = mask * (~out.truncated)[:, None]
      batch = grpo.Batch(prompts=prompts, prompt_mask=prompt_mask,
                         completions=to_device(out.tokens[:, :t_eff], batch_sh, rows, b * g),
                         completion_mask=to_device(mask, batch_sh, rows, b * g),
                         old_logps=to_device(out.logps[:, :t_eff], batch_sh, rows, b * g),
                         advantages=to_device(adv[rows], batch_sh, rows, b * g))
      t_update = time.perf_counter()
      for _ in range(rl.num_iterations):
        params, opt_state, update_metrics = update(params, opt_state, ref_params, batch)
      update_metrics = jax.device_get(update_metrics)
      t_update = time.perf_counter() - t_update
      if update_programs is not None and update._cache_size() > update_programs:
        log.warning("step %d compiled a new update program (completion bucket %d); each new "
                    "bucket compiles once", step + 1, t_eff)
      update_programs = update._cache_size()

      # ------------------------------------------------------------ metrics --
      done = step + 1
      rec = {k: float(v) for k, v in update_metrics.items()}
      rec.update(advantages.reward_metrics(reward, g))
      rec.update(reward_info)
      rec.update({
          "completions/mean_length": float(whole["lengths"].mean()),
          "completions/clipped_ratio": float(whole["truncated"].mean()),
          "learning_rate": float(run.lr_schedule(step * rl.num_iterations)),
          "time/sample_s": t_sample, "time/update_s": t_update,
          "time/step_s": time.perf_counter() - t_step,
      })
      if run.eval_due(done):
        rec.update(run.evaluate(params))
      if run.log(done, rec) and run.is_main:
        _write_samples(workdir, done, prompt_texts[0], texts[:g], reward[rows][:g])
      if run.checkpoint(done, params, opt_state, guard, data_position=done * b):
        break
  return run.close()


def _write(writer, progress, step, rec):
  if writer is not None:
    rec = writer.write(step, rec)
    progress.update(step, rec)
  return dict(rec, step=step)


def _write_samples(workdir, step, prompt, texts, reward):
  """A group of completions per logged step in samples.jsonl: what the policy writes."""
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, "prompt": prompt,
                        "completions": [{"text": t, "reward": float(r)}
                                        for t, r in zip(texts, reward)]}) + "\n")
