"""The supervised fine-tuning loop (config.mode = "sft"): `train_sft(config, workdir)`.

    python -m grpo_jax.main --config=configs/tiny_sft.py:data.jsonl --workdir=/tmp/sft
    python -m grpo_jax.main --config=configs/tiny_arithmetic.py --workdir=/tmp/grpo \\
        --config.model.name=/tmp/sft                    # the next stage starts from it

The rows, the loss and the update are sft.py's; everything else is the run
harness GRPO uses too (runner.py): mesh and shardings, the optimizer
(config.opt), orbax checkpoints in WORKDIR/checkpoints, config.json (so
`models.load(WORKDIR)` and `config.model.name = WORKDIR` work), metrics.jsonl,
TensorBoard, plots, the progress bar, and the task's evaluation (config.eval,
eval/pass@1) before the first step, every train.eval_every steps and after
the last; with config.sft.eval_path also the held-out loss eval/loss.

Steps: train.steps, or ceil(sft.epochs * rows / B) when sft.epochs > 0, of
B = train.prompts_per_step rows. Step s reads positions [s * B, (s + 1) * B) of
the shuffled stream `data.tasks.shuffled_index` (seeded by train.seed), so a
resumed run continues exactly as an uninterrupted one. Multi-host: each
process reads and tokenises the rows its devices hold; padded lengths are
agreed across hosts.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import jax
import numpy as np

from grpo_jax import config as config_lib, distributed, metrics_io, run_dir, runner, sft
from grpo_jax.config import ConfigError
from grpo_jax.data import batching, get_task, templates
from grpo_jax.data.tasks import shuffled_index

log = logging.getLogger("grpo_jax")


def train_sft(cfg, workdir: str, *, allow_config_change: bool = False) -> runner.Records:
  """Runs (or resumes) the SFT experiment of `cfg` in `workdir`; returns its metric records
  (`.signum`: the signal that stopped it early). Resuming checks the config as
  `train.train_and_evaluate` does."""
  # ---------------------------------------------------------------- set-up --
  config_lib.validate(cfg)
  cfg_sft, b = cfg.sft, cfg.train.prompts_per_step
  rows = sft.read_rows(cfg_sft.path)
  eval_rows = sft.read_rows(cfg_sft.eval_path, "config.sft.eval_path") if cfg_sft.eval_path else []
  if cfg.task.template != "chat" and any("messages" in r for r in rows + eval_rows):
    raise ConfigError(f'"messages" rows need config.task.template="chat" (the tokenizer\'s chat '
                      f"template renders them), not {cfg.task.template!r}")
  steps = math.ceil(cfg_sft.epochs * len(rows) / b) if cfg_sft.epochs else cfg.train.steps
  task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  resume = run_dir.check(cfg, workdir, steps=steps, allow_config_change=allow_config_change)
  if resume.complete:  # nothing is loaded
    return runner.Records(metrics_io.read_metrics(workdir))
  run, params = runner.setup(cfg, workdir, steps=steps, memory_cfg=sft.memory_config(cfg),
                             history=resume.history)
  tokenizer, pad_id = run.tokenizer, run.tokenizer.pad_token_id
  stop_id = templates.end_of_turn_id(tokenizer, cfg.task.template)
  enc = functools.partial(sft.encode, tokenizer=tokenizer, template=cfg.task.template,
                          stop_id=stop_id, max_length=cfg_sft.max_length)
  local = distributed.local_rows(run.batch_sh, b)  # this process's rows of each batch
  state, start, _ = runner.restore_or_init(run, params)
  del params
  eval_fn = runner.combine_evaluators(
      runner.task_evaluator(run, task),  # eval/pass@1 etc. (None: eval.num_problems = 0)
      _loss_evaluator(run, [enc(r) for r in eval_rows], local) if eval_rows else None)
  update = sft.make_update_step(run.graphdef, run.optimizer,
                                grad_accum_steps=cfg.train.grad_accum_steps,
                                param_sharding=run.param_sh, opt_sharding=run.opt_sh,
                                batch_sharding=run.batch_sh, remat=cfg.model.remat)
  seed = f"sft/{cfg.train.seed}"
  log.info("SFT on %d rows (%s): %d steps of %d rows = %.2f epochs; completions end with %r",
           len(rows), cfg_sft.path, steps, b, steps * b / len(rows), tokenizer.decode([stop_id]))
  metrics_log = runner.Log(run, start)
  runner.evaluate_first(run, metrics_log, eval_fn, state.params, start)
  warned = False

  # ------------------------------------------------------------------ loop --
  with runner.Preemption() as preemption:
    for step in range(start, steps):
      t_step = time.perf_counter()
      positions = range(step * b + local.start, step * b + local.stop)
      encoded = [enc(rows[shuffled_index(i, len(rows), seed)]) for i in positions]
      batch = distributed.to_global(sft.pad_batch(encoded, pad_id, cfg_sft.max_length),
                                    run.batch_sh)
      t_update = time.perf_counter()
      params, opt_state, metrics = update(state.params, state.opt_state, batch)
      state = runner.TrainState(params, opt_state)
      metrics = jax.device_get(metrics)
      t_update = time.perf_counter() - t_update
      whole = distributed.gather_rows({"lengths": np.array([len(e[1]) for e in encoded]),
                                       "truncated": np.array([e[2] for e in encoded])}, local)
      if whole["truncated"].any() and not warned:
        log.warning("rows longer than config.sft.max_length=%d tokens are cut at the limit "
                    "(completions/clipped_ratio counts them; this warning is shown once)",
                    cfg_sft.max_length)
        warned = True

      done = step + 1
      rec = {k: float(v) for k, v in metrics.items()}
      rec.update({
          "perplexity": math.exp(min(rec["loss"], 50.0)),
          "tokens": float(whole["lengths"].sum()),
          "completions/mean_length": float(whole["lengths"].mean()),
          "completions/clipped_ratio": float(whole["truncated"].mean()),
          "epoch": done * b / len(rows),
          "learning_rate": float(run.lr_schedule(step)),
          "time/update_s": t_update, "time/step_s": time.perf_counter() - t_step,
      })
      rec.update(runner.evaluate_if_due(run, eval_fn, done, state.params))
      metrics_log.write(done, rec)
      if runner.checkpoint_or_stop(run, done, state, preemption, data_position=done * b):
        break
  return runner.finish(run, metrics_log, preemption)


def _loss_evaluator(run: runner.Run, encoded: list, local: slice):
  """params -> {"eval/loss"}: the token mean of -log p over the held-out rows' completions, in
  batches of train.prompts_per_step rows (the last one filled with masked repeats)."""
  b, max_length = run.cfg.train.prompts_per_step, run.cfg.sft.max_length
  # Its params are the samplers' copy (runner.evaluate_if_due): laid out as they come.
  loss_fn = jax.jit(lambda params, batch: sft.loss_and_metrics(params, run.graphdef, batch)[0])
  total_tokens = sum(len(e[1]) for e in encoded)

  def evaluate(params) -> dict:
    nll = 0.0
    for start, chunk, real in batching.fixed_size_chunks(encoded, b):
      keep = [i < real for i in range(local.start, local.stop)]
      batch = sft.pad_batch(chunk[local], run.tokenizer.pad_token_id, max_length, keep=keep)
      tokens = sum(len(e[1]) for e in chunk[:real])  # the whole batch's
      nll += float(loss_fn(params, distributed.to_global(batch, run.batch_sh))) * tokens
    return {"eval/loss": nll / total_tokens}

  return evaluate
