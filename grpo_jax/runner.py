"""The run harness both training loops share (GRPO in train.py, SFT in sft_train.py).

    resume = run_dir.check(cfg, workdir, steps=S)            # config diff; a finished run?
    if resume.complete:
      return runner.Records(metrics_io.read_metrics(workdir))  # nothing loaded, nothing to do
    run, params = runner.setup(cfg, workdir, steps=S, history=resume.history)  # mesh, model, ...
    state, start, position = runner.restore_or_init(run, params)  # resumes the workdir
    log = runner.Log(run, start)                             # metrics, samples, plots, bar
    runner.evaluate_first(run, log, eval_fn, state.params, start)
    with runner.Preemption() as preemption:
      for step in range(start, S):
        state, rec = ...                                     # the algorithm's update of `step`
        rec.update(runner.evaluate_if_due(run, eval_fn, step + 1, state.params))
        log.write(step + 1, rec)
        if runner.checkpoint_or_stop(run, step + 1, state, preemption, data_position=...):
          break
    return runner.finish(run, log, preemption)             # Records; .signum: a signal stopped it

`Run` holds what does not change during a run; `TrainState` is the pytree that
does (params and optimizer state, donated to each update). Everything else is a
free function of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx, struct
from jax.experimental import multihost_utils

from grpo_jax import (checkpointing, compiled, config as config_lib, distributed, evaluate,
                      lora, memory, metrics_io, models, optim, plots, rewards, sampling, sharding)
from grpo_jax.run_dir import CONFIG_FILE
from grpo_jax.data import templates

log = logging.getLogger("grpo_jax")
EvalFn = Callable[[Any], dict]  # params -> eval/* metrics


@struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  critic: Any = None  # PPO's critic (critic.CriticState: params, opt_state); None without one


@dataclasses.dataclass(frozen=True)
class Run:
  """The fixed parts of a run: config, mesh, model definition, shardings, optimizer, checkpoints."""
  cfg: Any
  workdir: str
  steps: int
  mesh: Any
  tokenizer: Any
  model_cfg: Any
  graphdef: Any
  param_sh: Any
  batch_sh: Any
  optimizer: Any
  lr_schedule: Callable[[int], Any]
  opt_sh: Any
  ckpt: checkpointing.Checkpointer
  # params -> the samplers' copy of them (sampling.rollout_copier): compute dtype, whole on
  # each device but for the tensor split; the params themselves when that changes nothing.
  # With LoRA the copy has the adapters merged in (lora.rollout_copier).
  rollout_params: Callable[[Any], Any]
  rollout_graphdef: Any  # the model the rollout copy is of: graphdef, or the base's with LoRA

  @property
  def is_main(self) -> bool:
    return distributed.is_main()


def setup(cfg, workdir: str, *, steps: int, optimizer_steps: int | None = None,
          memory_cfg=None, history: list = ()) -> tuple[Run, Any]:
  """The mesh, the model (params placed on it), the device memory check, then the workdir with
  its config.json (which makes the workdir loadable by `models.load`), the optimizer and the
  checkpointer. Nothing is written before every start-up check has passed.

  Args:
    cfg: the validated experiment config.
    workdir: the run directory (created).
    steps: the run's number of steps (logging, evaluation and checkpoint schedule).
    optimizer_steps: updates over the run, for the learning-rate schedule (default `steps`).
    memory_cfg: the config whose shapes the memory estimate reads (default `cfg`).
    history: config.json's "history" list (`run_dir.check`'s).
  Returns:
    (run, params): params are the model's as loaded, sharded by name over the mesh.
  """
  mesh = config_lib.make_mesh(cfg)
  log.info("loading model %s", cfg.model.name)
  try:
    model, tokenizer = models.load(cfg.model.name, dtype=cfg.model.dtype,
                                   attention_block=cfg.model.attention_block)
  except (ValueError, FileNotFoundError) as e:  # a file that is not a model, a missing file
    raise config_lib.ConfigError(f"config.model.name={cfg.model.name!r}: {e}") from None
  config_lib.validate_with_model(cfg, model.cfg)
  model = lora.attach(model, cfg.model.lora, seed=cfg.train.seed)  # rank 0: unchanged

  model_cfg = model.cfg
  graphdef, params = nnx.split(model)
  del model
  try:
    param_sh = sharding.param_shardings(mesh, params)
  except ValueError as e:  # a mesh axis that does not divide a param it must split
    raise config_lib.ConfigError(str(e)) from None
  params = jax.device_put(params, param_sh)
  trainable = lora.trainable(params)  # what gets gradients and optimizer state

  est = memory.estimate(memory_cfg or cfg, model_cfg, mesh,
                        param_bytes=compiled.device_bytes(params),
                        trainable_bytes=(compiled.device_bytes(trainable)
                                         if lora.has_adapters(params) else None))
  log.info("memory per device (estimate):\n%s", est.table())
  limit = memory.device_memory_limit(cfg)
  if limit is not None:  # XLA's analysis of the programs the run will execute, when it has one
    log.info("compiling the run's programs at their largest shapes to check their memory "
             "before the first step")
    # With PPO also the critic's programs; each peak counts the state it leaves on the devices.
    peaks = compiled.compiled_peaks(cfg, model_cfg, mesh)
    if peaks:
      log.info("memory per device (compiled): %s", ", ".join(
          f"{name} {p['peak_bytes'] / 2**30:.2f} GiB" for name, p in peaks.items()))
      compiled.check_compiled(peaks, limit)
    else:
      memory.check(est, limit)

  os.makedirs(workdir, exist_ok=True)
  if distributed.is_main():
    saved = dict(json.loads(cfg.to_json_best_effort()), **({"history": history} if history else {}))
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(saved, f, indent=2)
  optimizer, lr_schedule = optim.optimizer_from_config(cfg.opt, optimizer_steps or steps)
  opt_sh = sharding.param_shardings(mesh, jax.eval_shape(optimizer.init, trainable))
  ckpt = checkpointing.run_checkpointer(workdir, cfg.train.keep_checkpoints)
  if lora.has_adapters(params):
    rollout_graphdef, base = lora.base_of(graphdef, params)
    rollout = lora.rollout_copier(graphdef, sharding.rollout_shardings(mesh, base),
                                  cfg.model.dtype)
  else:
    rollout_graphdef = graphdef
    rollout = sampling.rollout_copier(param_sh, sharding.rollout_shardings(mesh, params),
                                      cfg.model.dtype)
  return Run(cfg, workdir, steps, mesh, tokenizer, model_cfg, graphdef, param_sh,
             sharding.batch_sharding(mesh), optimizer, lr_schedule, opt_sh, ckpt,
             rollout, rollout_graphdef), params


def restore_or_init(run: Run, params, critic: tuple[Any, Any] | None = None
                    ) -> tuple[TrainState, int, int]:
  """The train state of the workdir's latest checkpoint, else `params` with a fresh optimizer
  state; the step it starts from and its data position (the examples consumed; 0 and 0 for a
  fresh run). `critic`: PPO's (initial critic state, its shardings) (`critic.Critic.init_state`),
  restored with the rest. With LoRA a checkpoint holds the adapters (`checkpointing.run_state`),
  joined to the base `params` as loaded."""
  opt_state = jax.jit(run.optimizer.init, out_shardings=run.opt_sh)(lora.trainable(params))
  state = TrainState(params, opt_state, None if critic is None else critic[0])
  start, position = run.ckpt.latest_step() or 0, 0
  if start:
    shardings = TrainState(run.param_sh, run.opt_sh, None if critic is None else critic[1])
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
    restored, meta = run.ckpt.restore(abstract_state=checkpointing.run_state(abstract))
    state = TrainState(lora.join(restored["params"], lora.split(params)[1]),
                       restored["opt_state"],
                       None if critic is None else critic[0].replace(**restored["critic"]))
    position = int(meta["data_position"])
    log.info("resumed from step %d (data position %d)", start, position)
  return state, start, position


def checkpoint_or_stop(run: Run, step: int, state: TrainState, preemption: Preemption, *,
                       data_position: int, before_save: Callable[[], Any] | None = None) -> bool:
  """Saves step `step` every train.checkpoint_every steps (0: never in between), at the last
  step, and when a signal asks the run to stop; True when it should stop now (every process
  agrees). `before_save` runs first when a checkpoint is saved (the GRPO loop writes its
  pending metrics: a checkpoint never gets ahead of metrics.jsonl)."""
  stop = preemption.reached(step)
  every = run.cfg.train.checkpoint_every
  if (every and step % every == 0) or step == run.steps or stop:
    if before_save is not None:
      before_save()
    run.ckpt.save(step, checkpointing.run_state(state),
                  meta={"step": step, "data_position": data_position, "seed": run.cfg.train.seed})
  if stop:
    log.warning("%s: checkpointed step %d, stopping; the same command resumes the run",
                signal.Signals(preemption.signum).name, step)
  return stop


# -- evaluation ----------------------------------------------------------------------
def task_evaluator(run: Run, task) -> EvalFn | None:
  """params -> the eval/* metrics of `task`'s held-out problems (config.eval); None when
  config.eval.num_problems is 0. The sampling key is the same at every evaluation.

  Each batch of config.eval.prompts_per_batch problems (fewer when there are fewer) is split
  over the mesh's batch axes like a training batch (`evaluate.sample_texts` with the run's
  batch sharding), filled up to a multiple of data x fsdp; every process gets the metrics of
  all problems, the same as on one device.
  """
  cfg = run.cfg
  if not cfg.eval.num_problems:
    return None
  examples = task.eval_examples(cfg.eval.num_problems, allow_repeats=cfg.eval.allow_repeats)
  if len(examples) < cfg.eval.num_problems:
    log.warning("the task's eval split holds only %d distinct problems: evaluating those, not "
                "config.eval.num_problems=%d (config.eval.allow_repeats=True repeats them)",
                len(examples), cfg.eval.num_problems)
  key = jax.random.fold_in(jax.random.key(cfg.train.seed), 2**31 - 1)  # no step reaches it
  stop_strings = tuple(cfg.rl.stop_strings)
  stop_ids = templates.stop_ids(run.tokenizer, stop_strings)
  return lambda params: evaluate.evaluate(
      run.rollout_graphdef, params, run.tokenizer, examples, template=cfg.task.template,
      num_samples=cfg.eval.num_samples, temperature=cfg.eval.temperature,
      max_new_tokens=cfg.rl.max_completion_length, key=key, stop_ids=stop_ids,
      prompts_per_batch=min(cfg.eval.prompts_per_batch, len(examples)),  # as compiled.programs
      correct_fn=rewards.reward_fn(cfg.eval.reward, cfg.get("reward_kwargs"), run.tokenizer),
      batch_sh=run.batch_sh, stop_strings=stop_strings)


def combine_evaluators(*fns: EvalFn | None) -> EvalFn | None:
  """One EvalFn running each of `fns` that is not None (None if none is left)."""
  fns = tuple(f for f in fns if f is not None)
  if not fns:
    return None
  return lambda params: {k: v for f in fns for k, v in f(params).items()}


def eval_due(run: Run, eval_fn: EvalFn | None, step: int) -> bool:
  """step = updates done (>= 1; step 0 is evaluated by `evaluate_first`)."""
  every = run.cfg.train.eval_every
  return eval_fn is not None and bool(step == run.steps or (every and step % every == 0))


def _timed(eval_fn: EvalFn, params) -> dict:
  t = time.perf_counter()
  return dict(eval_fn(params), **{"time/eval_s": time.perf_counter() - t})


def evaluate_if_due(run: Run, eval_fn: EvalFn | None, step: int, params) -> dict:
  """The eval/* metrics after `step` updates when an evaluation is due, else {}: sampled from
  the rollout copy of `params` (`Run.rollout_params`, dropped after)."""
  if not eval_due(run, eval_fn, step):
    return {}
  return _timed(eval_fn, run.rollout_params(params))


def evaluate_first(run: Run, log_: Log, eval_fn: EvalFn | None, params, start: int) -> None:
  """A fresh run with an evaluation records one of the starting params as step 0."""
  if start == 0 and eval_fn is not None:
    log_.write(0, _timed(eval_fn, run.rollout_params(params)))


# -- outputs -------------------------------------------------------------------------
class Log:
  """The run's metric records: metrics.jsonl and TensorBoard, plots and the progress bar (all
  written by process 0; the records are kept on every process)."""

  def __init__(self, run: Run, start: int):
    self.run = run
    # MetricsWriter cuts metrics.jsonl, samples.jsonl and TensorBoard back to the restored step
    # (a run without a checkpoint starts over: none of an earlier attempt's records are kept).
    self.writer = metrics_io.MetricsWriter(
        run.workdir, resume_step=start, wandb_cfg=run.cfg.logging.wandb,
        run_config=json.loads(run.cfg.to_json_best_effort())) if run.is_main else None
    self.progress = metrics_io.Progress(run.steps, initial=start) if run.is_main else None
    self.records = metrics_io.read_metrics(run.workdir) if start and run.is_main else []
    self._samples = os.path.join(run.workdir, metrics_io.SAMPLES_FILE)

  def write(self, step: int, rec: dict) -> bool:
    """Records step `step` when due (every train.log_every steps, with an evaluation, at the
    last step, and step 0) and rewrites the plots now and then; True if recorded."""
    evaluated = any(k.startswith("eval/") for k in rec)
    due = step % self.run.cfg.train.log_every == 0 or evaluated or step == self.run.steps
    if not due:
      return False
    if self.writer is not None:
      rec = self.writer.write(step, rec)
      self.progress.update(step, rec)
      if "eval/pass@1_ci95_low" in rec:
        log.info("step %d: held-out pass@1 %.3f, 95%% interval [%.3f, %.3f], over %d distinct "
                 "problems", step, rec["eval/pass@1"], rec["eval/pass@1_ci95_low"],
                 rec["eval/pass@1_ci95_high"], rec["eval/num_distinct_problems"])
    self.records.append(dict(rec, step=step))
    if self.run.is_main and (step % 5 == 0 or step == self.run.steps or evaluated):
      plots.write_plots(self.run.workdir, self.records)
    return True

  def write_samples(self, step: int, sample: dict) -> None:
    """Appends {"step": step, **sample} to samples.jsonl (process 0)."""
    if self.run.is_main:
      with open(self._samples, "a") as f:
        f.write(json.dumps({"step": step, **sample}) + "\n")


class Records(list):
  """A loop's metric records; `signum` is the signal that stopped the run early (None: it ran
  to its last step)."""
  signum: int | None = None


def finish(run: Run, log_: Log, preemption: Preemption | None = None) -> Records:
  """Waits for the last checkpoint, writes the final plots; returns the metric records, with
  the signal that stopped the run (main.py exits with 128 + it, as a shell does)."""
  run.ckpt.wait()
  run.ckpt.close()
  if run.is_main:
    plots.write_plots(run.workdir, log_.records)
    log_.writer.close()
    log_.progress.close()
  records = Records(log_.records)
  records.signum = preemption.signum if preemption is not None and preemption.stopped else None
  return records


# -- stopping on a signal ------------------------------------------------------------
class Preemption:
  """Within the block, SIGTERM or SIGINT asks the run to checkpoint and stop; `reached(step)`
  says whether to do so after `step`, the same answer on every process.

  One process: a flag set by the signal handlers, checked at step boundaries. Several
  processes (jax.distributed): JAX's preemption service watches SIGTERM on every host and
  agrees on a step at which all of them save (`multihost_utils.reached_preemption_sync_point`),
  so a signal on one host stops all of them at the same step; SIGINT is passed on as SIGTERM to
  reach it. A second SIGINT on one process raises KeyboardInterrupt (Ctrl-C twice stops a stuck
  run). Must be entered from the main thread.
  """

  def __init__(self):
    self.signum: int | None = None
    self.stopped = False  # `reached` said to stop
    self._flag = False
    self._previous: dict[int, Any] = {}
    self._synced = distributed.is_multi_process()

  def _handler(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum, self._flag = signum, True
    if self._synced:  # JAX's handler of SIGTERM tells the other hosts
      os.kill(os.getpid(), signal.SIGTERM)

  def __enter__(self) -> Preemption:
    # With several processes SIGTERM stays JAX's (installed by jax.distributed.initialize).
    signals = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
    self._previous = {s: signal.signal(s, self._handler) for s in signals}
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)

  def reached(self, step: int) -> bool:
    """True when the run should checkpoint `step` and stop. With several processes, call it at
    every step on every process: it is a collective."""
    if not self._synced:
      self.stopped = self._flag
      return self._flag
    try:
      stop = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # JAX's preemption service is off: agree on the local flags instead
      stop = bool(np.any(multihost_utils.process_allgather(np.int32(self._flag))))
    if stop and self.signum is None:
      self.signum = signal.SIGTERM
    self.stopped = bool(stop)
    return self.stopped
