"""Supervised fine-tuning, the algorithm: rows, batches, the loss and the update step.

The cold start and the distillation of DeepSeek-R1 (docs/maths.md); the loop
that runs it is sft_train.py (config.mode = "sft").

Data: a JSONL file (config.sft.path), one object a line, either
    {"prompt": "What is 3 + 4?", "completion": "<think>...</think><answer>7</answer>"}
    {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}
A prompt goes through config.task.template exactly as GRPO and evaluation
present it ("chat": the tokenizer's chat template with the system prompt); a
"messages" row (template "chat" only) is its turns before the last under the
chat template, and the last (assistant) turn is the completion. Every
completion ends with the end-of-turn token (`templates.end_of_turn_id`: the
chat template's, e.g. <|im_end|>, else EOS), so the model learns to stop. A row
longer than config.sft.max_length tokens keeps its first max_length (TRL's
truncation).

Loss: -mean log p(completion token | prompt, earlier completion tokens) over
all the batch's completion tokens (`losses.sft_loss`), from
`grpo.completion_logps` with one completion per prompt: the prompt is run
once and logits exist only at completion positions, a chunk at a time.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from grpo_jax import distributed, grpo, lora, losses, optim
from grpo_jax.config import ConfigError
from grpo_jax.data import batching, format_prompt
from grpo_jax.data.tasks import read_jsonl

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
  longest_p = distributed.global_max(max(len(e[0]) for e in encoded))
  longest_c = distributed.global_max(max(len(e[1]) for e in encoded))
  p_len = min(batching.bucket_length(max(longest_p, 1)), max_length)
  t_len = min(batching.bucket_length(max(longest_c, 1), batching.COMPLETION_BUCKETS), max_length)
  prompts, prompt_mask = batching.left_pad([e[0] for e in encoded], pad_id, p_len)
  completions = np.full((len(encoded), t_len), pad_id, np.int32)
  completion_mask = np.zeros((len(encoded), t_len), np.int32)
  for i, e in enumerate(encoded):
    completions[i, :len(e[1])] = e[1]
    completion_mask[i, :len(e[1])] = 1 if keep is None or keep[i] else 0
  return Batch(prompts, prompt_mask, completions, completion_mask)


# -- the loss and the update ---------------------------------------------------------
def loss_and_metrics(params, graphdef, batch: Batch, chunk_size: int = 64, remat: str = "none"):
  """The SFT loss of a (micro-)batch: the mean of -log p(completion token | prompt, prefix)
  over its completion tokens; `remat` is config.model.remat (`transformer.REMAT`).

  Returns (loss, {"loss": loss, "entropy": the completion tokens' mean entropy}).
  """
  logps, entropy = grpo.completion_logps(
      nnx.merge(graphdef, params), batch.prompts, batch.prompt_mask, batch.completions,
      batch.completion_mask, num_generations=1, chunk_size=chunk_size, remat=remat)
  nll, metrics = losses.sft_loss(logps, batch.completion_mask)
  mask = batch.completion_mask.astype(jnp.float32)
  return nll, {"loss": nll, "entropy": losses.masked_mean(entropy, mask)}


def make_update_step(graphdef, optimizer, *, grad_accum_steps: int = 1, param_sharding=None,
                     opt_sharding=None, batch_sharding=None, remat: str = "none"):
  """The jitted SFT update: (params, opt_state, batch) -> (params, opt_state, metrics).

  With grad_accum_steps > 1 the batch is split into that many micro-batches (lax.scan), each
  weighted by its share of the batch's completion tokens, so their gradients and metrics add
  up to the whole batch's token mean. params and opt_state are donated; shardings as in
  `grpo.make_update_step`; `remat` is config.model.remat.
  """
  grad_fn = functools.partial(lora.grad(loss_and_metrics), remat=remat)  # adapters only, w/ LoRA

  def grads_fn(params, batch):
    if grad_accum_steps == 1:
      return grad_fn(params, graphdef, batch)
    total = jnp.maximum(jnp.sum(batch.completion_mask), 1).astype(jnp.float32)
    grads, metrics, weights = optim.accumulate(
        lambda mb: grad_fn(params, graphdef, mb), lora.trainable(params),
        optim.split_micro_batches(batch, grad_accum_steps),
        lambda mb: jnp.sum(mb.completion_mask) / total)
    return grads, jax.tree.map(lambda m: jnp.sum(m * weights), metrics)

  extra = None
  if param_sharding is not None:
    extra = (jax.tree.map(lambda _: batch_sharding, Batch(0, 0, 0, 0)),)
  return optim.jit_update(grads_fn, optimizer, param_sharding=param_sharding,
                         opt_sharding=opt_sharding, extra_shardings=extra)


def memory_config(cfg):
  """The config the start-up memory estimate reads: one completion per prompt, no reference,
  and (an upper bound) prompts and completions both padded to sft.max_length."""
  shapes = cfg.copy_and_resolve_references()
  shapes.rl.num_generations, shapes.rl.beta = 1, 0.0
  shapes.rl.max_prompt_length = shapes.rl.max_completion_length = cfg.sft.max_length
  return shapes
