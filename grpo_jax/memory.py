"""A start-up estimate of device memory per device, and a clear error when it cannot fit.

    est = estimate(cfg, model_cfg, mesh, param_bytes=...)
    print(est.table())
    check(est, limit_bytes)  # ConfigError that says what to change

What one device holds during a step (B prompts, G completions each, prompt
length P, completion length T, the batch split over data x fsdp):
- persistent: the policy's params, AdamW's two moments (as large as the
  params), the reference params when beta != 0, and with PPO
  (advantage_estimator="gae") the critic's params and AdamW moments (its
  update is a program of its own, smaller than the policy's: no logits);
- while sampling: the KV cache (each prompt's keys/values once, shared by its
  G rows, plus G x T slots per prompt; of B / rl.rollout_parts prompts at a
  time), the next-token logits, and the sampler's copy of the weights
  (compute dtype, split over tensor only) unless it would equal the params;
- while updating (per micro-batch of B / grad_accum_steps prompts): the
  gradients, and the activations the backward pass keeps: per layer and token
  the residual stream and its norms, q/k/v before and after RoPE, the
  attention scores and probabilities over the prompt and completion (only for
  a forward no longer than config.model.attention_block; a longer one keeps
  none and holds one block's at a time), and the MLP's F-wide arrays (with
  config.model.remat "full": each layer's input, and those of one layer at a
  time); plus one chunk of logits (`losses.token_logps_and_entropy` works a
  chunk at a time).
The estimate is of the arrays' sizes; XLA's buffer reuse and workspace move the
real peak by tens of percent either way (tests compare it with XLA's own
memory analysis of the compiled programs).
"""

from __future__ import annotations

import dataclasses

import jax

from grpo_jax import sharding
from grpo_jax.config import ConfigError

GIB = 2 ** 30


@dataclasses.dataclass
class Estimate:
  persistent: dict[str, int]  # bytes per device, held for the whole run
  sampling: dict[str, int]  # bytes per device while sampling
  update: dict[str, int]  # bytes per device while computing gradients

  @property
  def peak(self) -> int:
    return sum(self.persistent.values()) + max(sum(self.sampling.values()),
                                               sum(self.update.values()))

  def table(self) -> str:
    lines = []
    for phase, parts in (("held", self.persistent), ("sampling", self.sampling),
                         ("update", self.update)):
      for name, size in parts.items():
        lines.append(f"  {phase:9s}{name:22s}{_size(size)}")
    lines.append(f"  {'peak':31s}{_size(self.peak)}")
    return "\n".join(lines)


def _size(n: int) -> str:
  return f"{n / GIB:9.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:9.2f} MiB"


def estimate(cfg, model_cfg, mesh, *, param_bytes: int,
             trainable_bytes: int | None = None) -> Estimate:
  """Bytes per device of the config's run (see the module docstring).

  Args:
    cfg: the experiment config (rl, train sections).
    model_cfg: the model's `ModelConfig`.
    mesh: the run's mesh (axes data, fsdp, tensor).
    param_bytes: bytes of the policy's params on one device (after sharding).
    trainable_bytes: with LoRA, the adapters' bytes on one device: only they have gradients
      and optimizer state, and the reference is the base itself (no copy); None: all train.
  """
  m, rl, train = model_cfg, cfg.rl, cfg.train
  shards = sharding.batch_shards(mesh)
  tp = mesh.shape["tensor"]
  act = 2 if cfg.model.dtype == "bfloat16" else 4  # matmul operands and the KV cache
  prompts = max(train.prompts_per_step // shards, 1)
  rows = prompts * rl.num_generations
  p_len, t_len = rl.max_prompt_length, rl.max_completion_length
  kv_width = 2 * m.num_kv_heads * m.head_dim // tp  # keys and values per token and layer

  lora = trainable_bytes is not None
  trained = trainable_bytes if lora else param_bytes
  persistent = {"params": param_bytes, "optimizer state": 2 * trained}
  if rl.beta != 0 and not lora:
    persistent["reference params"] = param_bytes
  if rl.get("advantage_estimator") == "gae":  # PPO's critic: the policy's trunk, its own AdamW
    persistent["critic params"] = param_bytes  # (an untied LM head counted: an upper bound)
    persistent["critic optimizer state"] = 2 * param_bytes
  parts = rl.get("rollout_parts", 1)  # sampling.sample_in_parts: B / parts prompts at a time
  sampling = {
      "KV cache": m.num_layers * kv_width * (prompts * p_len + rows * t_len) * act // parts,
      "next-token logits": 3 * rows * m.vocab_size * 4 // parts,
  }
  if lora or shards > 1 or cfg.model.dtype != "float32":  # the rollout copy (lora: merged)
    sampling["weights (rollout copy)"] = m.num_params() * act // tp

  micro_prompts = max(prompts // train.grad_accum_steps, 1)
  micro_rows = micro_prompts * rl.num_generations

  heads, block = m.num_heads // tp, cfg.model.attention_block

  def blocked(length):  # a forward of `length` tokens attends a block of queries at a time
    return 0 < block < length

  def scores(context, length):  # fp32 scores and probabilities of one query, if kept
    return 0 if blocked(length) else 3 * heads * context * 4

  def per_token(context, length):  # activations kept for the backward, per token and layer
    return (8 * m.hidden_size * 4 + (3 * heads * m.head_dim + 2 * kv_width) * act
            + 4 * m.intermediate_size // tp * act + scores(context, length))

  def kept(layers, per_token):  # activations of `layers` layers, over the micro-batch's tokens
    return layers * (micro_prompts * p_len * per_token(p_len, p_len)
                     + micro_rows * t_len * per_token(p_len + t_len, t_len - 1))

  if cfg.model.remat in ("full", "nothing_saveable"):
    # Each layer's input (fp32 residual stream) is kept; one layer's activations exist at a time.
    layers = kept(m.num_layers, lambda *_: m.hidden_size * 4) + kept(1, per_token)
  else:  # "dots_saveable" keeps most of it (the attention scores are matmul outputs)
    layers = kept(m.num_layers, per_token)
  chunk = min(64, t_len)
  update = {"gradients": trained, "activations": layers,
            "logits (one chunk)": 3 * micro_rows * chunk * m.vocab_size * 4 // tp}
  one_block = max(micro_prompts * 3 * heads * block * p_len * 4 if blocked(p_len) else 0,
                  micro_rows * 3 * heads * block * (p_len + t_len) * 4 if blocked(t_len - 1) else 0)
  if one_block:
    update["attention (one block)"] = one_block
  return Estimate(persistent, sampling, update)


def device_memory_limit(cfg) -> int | None:
  """Bytes of memory of one device: config.train.device_memory_gb, else what the device
  reports (GPUs and TPUs do; CPUs do not: None)."""
  if cfg.train.device_memory_gb:
    return int(cfg.train.device_memory_gb * GIB)
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def check(est: Estimate, limit: int | None) -> None:
  """ConfigError when the estimate exceeds `limit` bytes; says what to change."""
  if limit is None or est.peak <= limit:
    return
  raise ConfigError(
      f"the run needs about {_size(est.peak).strip()} per device, more than the "
      f"{_size(limit).strip()} a device has:\n{est.table()}\n"
      "To fit: config.model.remat = \"full\" (each layer recomputed in the backward), fewer "
      "prompts per step (config.train.prompts_per_step) or more gradient accumulation"
      " (config.train.grad_accum_steps) for activations; a smaller config.model.attention_block "
      "for the attention scores; shorter "
      "config.rl.max_completion_length / max_prompt_length for activations and the KV cache; "
      "config.mesh.fsdp or config.mesh.tensor > 1 to split params, optimizer state and "
      "activations over devices; config.rl.beta = 0 drops the reference params.")
