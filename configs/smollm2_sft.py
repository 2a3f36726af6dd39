"""SmolLM2-135M-Instruct, supervised fine-tuning on a prompt/completion JSONL (cold start,
rejection-sampling SFT, distillation; experiments/run.py uses it for each).

    python -m grpo_jax.main --config=configs/smollm2_sft.py:configs/data/arithmetic_sft.jsonl \\
        --workdir=runs/smollm2_cold_start
    python -m grpo_jax.main --config=configs/smollm2_arithmetic.py --workdir=runs/smollm2_r1 \\
        --config.model.name=runs/smollm2_cold_start   # then GRPO from the SFT model

The model and the task (its chat template and R1 system prompt, its held-out
problems) are configs/smollm2_arithmetic.py's, read from that file, so the
SFT-ed model is trained on exactly what GRPO will show it.
"""

import os

from grpo_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "arithmetic_sft.jsonl")


def get_config(arg: str | None = None):
  grpo = config_lib.from_file(os.path.join(HERE, "smollm2_arithmetic.py"))
  c = config_lib.defaults()
  c.mode = "sft"
  c.model = grpo.model
  c.task = grpo.task
  c.sft.path = arg or DEFAULT_DATA
  c.sft.epochs = 2.0
  c.sft.max_length = 256
  c.opt.learning_rate = 3e-5
  c.opt.warmup_steps = 5
  c.opt.schedule = "cosine"
  c.train.prompts_per_step = 8
  c.train.checkpoint_every = 1000
  c.eval.num_problems = 0  # experiments/run.py evaluates each model with grpo_jax.evaluate
  return c
