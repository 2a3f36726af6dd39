"""Tiny random model (character tokenizer) on 1-digit arithmetic: tests and smoke runs.

    python -m grpo_jax.main --config=configs/tiny_arithmetic.py --workdir=/tmp/tiny

A few seconds a step on a 2-core CPU. The model starts random, so accuracy
stays near 0; the tag_count reward (0.25 per R1 tag used exactly once) is the
signal that rises within ~20 steps (mean reward ~0.1 -> ~0.4+), which is what
the end-to-end test checks. Presets: `:steps=N`.
"""

from grpo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.defaults()
  c.model.name = "tiny-random"
  c.task.name = "arithmetic"
  c.task.template = "plain"  # "What is 3 + 4?": the chat system prompt is 150 characters
  c.task.kwargs.min_digits = 1
  c.task.kwargs.max_digits = 1
  c.rewards = [("accuracy", 1.0), ("tag_count", 1.0)]
  c.rl.num_generations = 8
  c.rl.beta = 0.0
  c.rl.max_prompt_length = 32
  c.rl.max_completion_length = 16
  c.rl.temperature = 1.0
  c.opt.learning_rate = 3e-3
  c.opt.max_grad_norm = 1.0
  c.train.steps = 30
  c.train.prompts_per_step = 4
  c.train.eval_every = 10
  c.train.checkpoint_every = 10
  c.eval.num_problems = 16
  c.eval.num_samples = 2
  c.eval.temperature = 1.0
  c.eval.prompts_per_batch = 8
  for item in (arg or "").split(","):
    if item.startswith("steps="):
      c.train.steps = int(item.split("=", 1)[1])
  return c
