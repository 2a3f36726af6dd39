"""Real scale, long reasoning: Qwen3-8B, 4096-token completions on math word problems.

    python -m grpo_jax.main --config=configs/qwen3_8b_math.py:/ckpt/Qwen3-8B \\
        --config.task.kwargs.path=/data/train.jsonl --config.task.kwargs.eval_path=/data/test.jsonl \\
        --workdir=runs/qwen3_8b_math
    python -m grpo_jax.aot --config=configs/qwen3_8b_math.py --topology=v5p:2x2x2
    python -m grpo_jax.aot --config=configs/qwen3_8b_math.py --topology=h100:1x1x8

Without the argument the model is the shape preset "qwen3-8b" (shapes only,
for `grpo_jax.aot`). Data and rewards as in configs/qwen25_gsm8k.py, which
this builds on. The settings are R1-like: 16 prompts x 8 completions of up to
4096 tokens, bf16 compute, remat, FSDP over every device, beta 0.04, DAPO's
token-mean loss and clip-higher. Whether it fits each topology is measured
with `grpo_jax.aot` (README, "Real scale"): today the update does not.
"""

import os

from grpo_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None):
  c = config_lib.from_file(os.path.join(HERE, "qwen25_gsm8k.py"))
  c.model.name = arg or "qwen3-8b"
  c.rl.loss_type = "dapo"
  c.rl.epsilon_high = 0.28
  c.rl.max_prompt_length = 512
  c.rl.max_completion_length = 4096
  c.train.steps = 300
  c.train.prompts_per_step = 16
  c.train.grad_accum_steps = 2
  c.train.checkpoint_every = 25
  c.eval.prompts_per_batch = 16
  return c
