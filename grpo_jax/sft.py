"""Supervised fine-tuning (config.mode = "sft"): the cold start and distillation of R1 (GRPO.md).

    python -m grpo_jax.main --config=configs/tiny_sft.py:data.jsonl --workdir=/tmp/sft
    python -m grpo_jax.main --config=configs/tiny_arithmetic.py --workdir=/tmp/grpo \\
        --config.model.name=/tmp/sft                    # the next stage starts from it

Data: a JSONL file (config.sft.path), one object a line, either
    {"prompt": "What is 3 + 4?", "completion": "<think>...</think><answer>7</answer>"}
    {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}
A prompt goes through config.task.template exactly as GRPO and evaluation
present it ("chat": the tokenizer's chat template with the system prompt); a
"messages" row (template "chat" only) is its turns before the last under the
chat template, and the last (assistant) turn is the completion. Every
completion ends with the end-of-turn token (the chat template's, e.g.
<|im_end|>, else EOS), so the model learns to stop. A row longer than
config.sft.max_length tokens keeps its first max_length (TRL's truncation).

Loss: -mean log p(completion token | prompt, earlier completion tokens) over
all the batch's completion tokens (`losses.sft_loss`), from
`grpo.completion_logps` with one completion per prompt: the prompt is run
once and logits exist only at completion positions, a chunk at a time.

Everything else is GRPO's (`train.Run`): the mesh and shardings, the
optimizer (config.opt), orbax checkpoints in WORKDIR/checkpoints, config.json
(so `models.load(WORKDIR)` and `config.model.name = WORKDIR` work),
metrics.jsonl, TensorBoard, plots, the progress line, and the task's
evaluation (config.eval, eval/accuracy) before the first step, every
train.eval_every steps and after the last; with config.sft.eval_path also the
held-out loss eval/loss.

Steps: train.steps, or ceil(sft.epochs * rows / B) when sft.epochs > 0, of
B = train.prompts_per_step rows. Row i of the stream is row perm_e[i mod n] of
epoch e = i // n (perm_e a shuffle seeded by train.seed and e), and step s
reads stream rows [s * B, (s + 1) * B): a run resumed from a checkpoint
continues exactly as an uninterrupted one. Multi-host: each process reads and
tokenises the rows its devices hold; padded lengths are agreed across hosts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from grpo_jax import checkpointing, config as config_lib, grpo, losses, sampling, train
from grpo_jax.config import ConfigError
from grpo_jax.data import batching, format_prompt, get_task
from grpo_jax.data.tasks import read_jsonl

log = logging.getLogger("grpo_jax")


@struct.dataclass
class Batch:
  """B rows of (prompt, completion)."""
  prompts: jax.Array  # [B, P] int32, left-padded
  prompt_mask: jax.Array  # [B, P] int32
  completions: jax.Array  # [B, T] int32, right-padded, ending with the end-of-turn token
  completion_mask: jax.Array  # [B, T] int32, 1 on the tokens to learn


# -- data ----------------------------------------------------------------------------
def _check_row(row: Any, where: str) -> dict:
  if isinstance(row, dict) and "messages" in row:
    messages = row["messages"]
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in messages)
            and messages[-1]["role"] == "assistant"):
      raise ConfigError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}} '
                        "objects ending with the assistant's turn (the completion to learn)")
    return row
  if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
          and isinstance(row.get("completion"), str)):
    has = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ConfigError(f'{where}: an SFT row needs the string fields "prompt" and "completion" '
                      f'(or "messages"); it has {has}')
  return row


def read_rows(path: str, key: str = "config.sft.path") -> list[dict]:
  """The rows of an SFT JSONL file, each checked; ConfigError naming the file and line if not."""
  if not os.path.isfile(path):
    raise ConfigError(f"{key}={path!r}: no such file ({os.path.abspath(path)})")
  rows = read_jsonl(path, _check_row, error=ConfigError)
  if not rows:
    raise ConfigError(f"{key}={path!r} holds no rows")
  return rows


def end_of_turn_id(tokenizer, template: str) -> int:
  """The token every completion ends with: under the chat template, the first of the sampler's
  stop tokens that the template puts after an assistant turn (e.g. <|im_end|>); else EOS."""
  if template == "chat" and getattr(tokenizer, "chat_template", None):
    marker = "COMPLETION"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"},
                                          {"role": "assistant", "content": marker}],
                                         tokenize=False)
    stops = sampling.stop_ids(tokenizer)
    tail = text[text.rindex(marker) + len(marker):]
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
      if token in stops:
        return token
  return tokenizer.eos_token_id


def row_texts(row: dict, template: str, tokenizer) -> tuple[str, str]:
  """(prompt text, completion text) of a row, the prompt as GRPO and evaluation present it."""
  if "messages" in row:
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False,
                                           add_generation_prompt=True)
    return prompt, row["messages"][-1]["content"]
  return format_prompt(row, template, tokenizer), row["completion"]


def encode(row: dict, tokenizer, *, template: str, stop_id: int, max_length: int):
  """(prompt ids, completion ids ending with `stop_id`, truncated) of a row; a row longer than
  `max_length` tokens keeps its first `max_length`."""
  prompt, completion = row_texts(row, template, tokenizer)
  p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  c = tokenizer(completion, add_special_tokens=False)["input_ids"]
  if not c or c[-1] != stop_id:
    c = c + [stop_id]
  truncated = len(p) + len(c) > max_length
  if truncated:
    p, c = p[:max_length], c[:max(max_length - len(p), 0)]
  return p, c, truncated


def pad_batch(encoded, pad_id: int, max_length: int, keep=None) -> Batch:
  """Numpy arrays of encoded rows: prompts left-padded, completions right-padded, each to a
  length bucket (at most `max_length`) that is the same on every process.

  Args:
    encoded: (prompt ids, completion ids, ...) of this process's rows.
    pad_id: the padding token.
    max_length: config.sft.max_length.
    keep: per row, False for a filler row (its completion is masked out); default all kept.
  """
  longest_p = train.global_max(max(len(e[0]) for e in encoded))
  longest_c = train.global_max(max(len(e[1]) for e in encoded))
  p_len = min(batching.bucket_length(max(longest_p, 1)), max_length)
  t_len = min(batching.bucket_length(max(longest_c, 1), batching.COMPLETION_BUCKETS), max_length)
  prompts, prompt_mask = batching.left_pad([e[0] for e in encoded], pad_id, p_len)
  completions = np.full((len(encoded), t_len), pad_id, np.int32)
  completion_mask = np.zeros((len(encoded), t_len), np.int32)
  for i, e in enumerate(encoded):
    completions[i, :len(e[1])] = e[1]
    completion_mask[i, :len(e[1])] = 1 if keep is None or keep[i] else 0
  return Batch(prompts, prompt_mask, completions, completion_mask)


class Stream:
  """Row indices of the training stream: example i is row perm_e[i mod n] of epoch e = i // n,
  perm_e a shuffle seeded by (seed, e). A function of i alone: resuming is exact."""

  def __init__(self, num_rows: int, seed: int):
    self.num_rows, self.seed = num_rows, seed

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

  def indices(self, start: int, count: int) -> list[int]:
    return [int(self._order(i // self.num_rows)[i % self.num_rows])
            for i in range(start, start + count)]


# -- the loss and the update ---------------------------------------------------------
def loss_and_metrics(params, graphdef, batch: Batch, chunk_size: int = 64):
  """The SFT loss of a (micro-)batch: the mean of -log p(completion token | prompt, prefix)
  over its completion tokens.

  Returns (loss, {"loss": loss, "entropy": the completion tokens' mean entropy}).
  """
  logps, entropy = grpo.completion_logps(
      nnx.merge(graphdef, params), batch.prompts, batch.prompt_mask, batch.completions,
      batch.completion_mask, num_generations=1, chunk_size=chunk_size)
  nll, metrics = losses.sft_loss(logps, batch.completion_mask)
  mask = batch.completion_mask.astype(jnp.float32)
  return nll, {"loss": nll, "entropy": losses.masked_mean(entropy, mask)}


def make_update_step(graphdef, optimizer, *, grad_accum_steps: int = 1, param_sharding=None,
                     opt_sharding=None, batch_sharding=None):
  """The jitted SFT update: (params, opt_state, batch) -> (params, opt_state, metrics).

  With grad_accum_steps > 1 the batch is split into that many micro-batches (lax.scan), each
  weighted by its share of the batch's completion tokens, so their gradients and metrics add
  up to the whole batch's token mean. params and opt_state are donated; shardings as in `grpo.make_update_step`.
  """
  grad_fn = jax.grad(loss_and_metrics, has_aux=True)

  def grads_fn(params, batch):
    if grad_accum_steps == 1:
      return grad_fn(params, graphdef, batch)
    total = jnp.maximum(jnp.sum(batch.completion_mask), 1).astype(jnp.float32)
    grads, metrics, weights = grpo.accumulate(
        lambda mb: grad_fn(params, graphdef, mb), params,
        grpo.split_micro_batches(batch, grad_accum_steps),
        lambda mb: jnp.sum(mb.completion_mask) / total)
    return grads, jax.tree.map(lambda m: jnp.sum(m * weights), metrics)

  extra = None
  if param_sharding is not None:
    extra = (jax.tree.map(lambda _: batch_sharding, Batch(0, 0, 0, 0)),)
  return grpo.jit_update(grads_fn, optimizer, param_sharding=param_sharding,
                         opt_sharding=opt_sharding, extra_shardings=extra)


# -- the loop ------------------------------------------------------------------------
def _memory_config(cfg):
  """The config the start-up memory estimate reads: one completion per prompt, no reference,
  and (an upper bound) prompts and completions both padded to sft.max_length."""
  shapes = cfg.copy_and_resolve_references()
  shapes.rl.num_generations, shapes.rl.beta = 1, 0.0
  shapes.rl.max_prompt_length = shapes.rl.max_completion_length = cfg.sft.max_length
  return shapes


def train_sft(cfg, workdir: str) -> list[dict]:
  """Runs (or resumes) the SFT experiment of `cfg` in `workdir`; returns its metric records."""
  # ---------------------------------------------------------------- set-up --
  config_lib.validate(cfg)
  sft, b = cfg.sft, cfg.train.prompts_per_step
  rows = read_rows(sft.path)
  eval_rows = read_rows(sft.eval_path, "config.sft.eval_path") if sft.eval_path else []
  if cfg.task.template != "chat" and any("messages" in r for r in rows + eval_rows):
    raise ConfigError(f'"messages" rows need config.task.template="chat" (the tokenizer\'s chat '
                      f"template renders them), not {cfg.task.template!r}")
  steps = math.ceil(sft.epochs * len(rows) / b) if sft.epochs else cfg.train.steps
  task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  run, params = train.start_run(cfg, workdir, memory_cfg=_memory_config(cfg))
  tokenizer, pad_id = run.tokenizer, run.tokenizer.pad_token_id
  stop_id = end_of_turn_id(tokenizer, cfg.task.template)
  enc = functools.partial(encode, tokenizer=tokenizer, template=cfg.task.template,
                          stop_id=stop_id, max_length=sft.max_length)
  local = train.process_rows(run.batch_sh, b)  # this process's rows of each batch

  def to_device(batch: Batch) -> Batch:
    return jax.tree.map(lambda x: train.to_device(x, run.batch_sh, local, b), batch)

  evaluators = [run.task_evaluator(task)]  # eval/accuracy etc. (None: eval.num_problems = 0)
  if eval_rows:
    evaluators.append(_loss_evaluator(run, [enc(r) for r in eval_rows], to_device, local))
  evaluators = [f for f in evaluators if f is not None]
  eval_fn = (lambda p: {k: v for f in evaluators for k, v in f(p).items()}) if evaluators else None
  params, opt_state = run.start_training(params, steps, eval_fn=eval_fn)
  update = make_update_step(run.graphdef, run.optimizer,
                            grad_accum_steps=cfg.train.grad_accum_steps,
                            param_sharding=run.param_sh, opt_sharding=run.opt_sh,
                            batch_sharding=run.batch_sh)
  stream = Stream(len(rows), cfg.train.seed)
  log.info("SFT on %d rows (%s): %d steps of %d rows = %.2f epochs; completions end with %r",
           len(rows), sft.path, steps, b, steps * b / len(rows), tokenizer.decode([stop_id]))
  run.evaluate_first(params)
  warned = False

  # ------------------------------------------------------------------ loop --
  with checkpointing.preemption_guard() as guard:
    for step in range(run.start, steps):
      t_step = time.perf_counter()
      encoded = [enc(rows[i]) for i in stream.indices(step * b + local.start,
                                                      local.stop - local.start)]
      batch = to_device(pad_batch(encoded, pad_id, sft.max_length))
      t_update = time.perf_counter()
      params, opt_state, metrics = update(params, opt_state, batch)
      metrics = jax.device_get(metrics)
      t_update = time.perf_counter() - t_update
      whole = train.gather_rows({"lengths": np.array([len(e[1]) for e in encoded]),
                                 "truncated": np.array([e[2] for e in encoded])}, local)
      if whole["truncated"].any() and not warned:
        log.warning("rows longer than config.sft.max_length=%d tokens are cut at the limit "
                    "(completions/clipped_ratio counts them; this warning is shown once)",
                    sft.max_length)
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
      if run.eval_due(done):
        rec.update(run.evaluate(params))
      run.log(done, rec)
      if run.checkpoint(done, params, opt_state, guard, data_position=done * b):
        break
  return run.close()


def _loss_evaluator(run: train.Run, encoded: list, to_device, local: slice):
  """params -> {"eval/loss"}: the token mean of -log p over the held-out rows' completions, in
  batches of train.prompts_per_step rows (the last one filled with masked repeats)."""
  b, max_length = run.cfg.train.prompts_per_step, run.cfg.sft.max_length
  batch_sh = jax.tree.map(lambda _: run.batch_sh, Batch(0, 0, 0, 0))
  loss_fn = jax.jit(lambda params, batch: loss_and_metrics(params, run.graphdef, batch)[0],
                    in_shardings=(run.param_sh, batch_sh))

  def evaluate(params) -> dict:
    nll = 0.0
    for start in range(0, len(encoded), b):
      index = [start + i for i in range(local.start, local.stop)]
      keep = [i < len(encoded) for i in index]
      batch = pad_batch([encoded[min(i, len(encoded) - 1)] for i in index],
                        run.tokenizer.pad_token_id, max_length, keep=keep)
      tokens = sum(len(e[1]) for e in encoded[start:start + b])  # the whole batch's
      nll += float(loss_fn(params, to_device(batch))) * tokens
    return {"eval/loss": nll / sum(len(e[1]) for e in encoded)}

  return evaluate
