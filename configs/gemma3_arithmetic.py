"""R1-Zero from a base model: Gemma 3 270M (pretrained, not instruction-tuned) learns with GRPO.

    python -m grpo_jax.main --config=configs/gemma3_arithmetic.py --workdir=runs/gemma3_arithmetic
    python -m grpo_jax.main --config=configs/gemma3_arithmetic.py:countdown --workdir=runs/gemma3_cd

DeepSeek-R1-Zero's setting at CPU scale: RL straight from the base model, the
R1-Zero template (a plain-text conversation asking for <think> and <answer>
tags; a base model has no chat template), rule rewards only, no SFT. The
rewards are those of configs/smollm2_arithmetic.py (task accuracy plus 0.5 x
the R1 format reward), so the two runs compare a base model with an instruct
model on the same task, data and budget.

Presets (the part after ":"):
  arithmetic  one-digit addition and subtraction, the default experiment's task
              (accuracy_lenient: the <answer> if there is one, else the last number)
  countdown   Countdown with 2 or 3 numbers in [1, 10] and targets <= 30
              (the countdown reward: an expression using the given numbers that hits the target)

The embedded model is the GGUF's Q4_K_M weights dequantised to fp32; Gemma
terms apply to them. About 3 times the default experiment's time per step on a
2-core CPU (the 262k-word vocabulary makes the logits the largest matmul);
experiments/README.md has the measured curves.
"""

import os

from grpo_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    "arithmetic": (dict(min_digits=1, max_digits=1, operators="+-"), "accuracy_lenient"),
    "countdown": (dict(min_numbers=2, max_numbers=3, max_number=10, max_target=30), "countdown"),
}


def get_config(arg: str | None = None):
  task = arg or "arithmetic"
  if task not in PRESETS:
    raise ValueError(f"unknown preset {task!r} for configs/gemma3_arithmetic.py; "
                     f"use one of {sorted(PRESETS)}, e.g. --config=configs/gemma3_arithmetic.py:"
                     "countdown")
  kwargs, reward = PRESETS[task]
  # Everything but the model, template, task and rewards is the SmolLM2 run's, so the two
  # compare on the same batch, learning rate, steps and evaluation.
  c = config_lib.from_file(os.path.join(HERE, "smollm2_arithmetic.py"))
  c.model.name = "gemma3-270m"
  c.task.name = task
  c.task.template = "r1_zero"
  c.task.kwargs = kwargs
  c.rewards = [(reward, 1.0), ("format", 0.5)]
  c.eval.reward = reward
  return c
