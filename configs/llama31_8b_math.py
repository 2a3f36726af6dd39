"""Real scale, long reasoning: Llama-3.1-8B-Instruct, otherwise configs/qwen3_8b_math.py.

    python -m grpo_jax.main --config=configs/llama31_8b_math.py:/ckpt/Llama-3.1-8B-Instruct \\
        --config.task.kwargs.path=/data/train.jsonl --config.task.kwargs.eval_path=/data/test.jsonl \\
        --workdir=runs/llama31_8b_math
    python -m grpo_jax.aot --config=configs/llama31_8b_math.py --topology=v5p:2x2x2

Without the argument the model is the shape preset "llama-3.1-8b" (shapes only).
"""

import os

from grpo_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None):
  c = config_lib.from_file(os.path.join(HERE, "qwen3_8b_math.py"))
  c.model.name = arg or "llama-3.1-8b"
  return c
