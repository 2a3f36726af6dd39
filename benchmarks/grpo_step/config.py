"""The GRPO-step benchmark's workload for grpo_jax (run by benchmarks/grpo_step/bench.py).

    python -m grpo_jax.main --config=benchmarks/grpo_step/config.py --workdir=/tmp/bench \\
        --config.train.steps=6

SmolLM2-135M-Instruct (the embedded GGUF, fp32) on 1-digit "+-" arithmetic with
the chat template; 2 prompts x 8 generations a step, up to 64 new tokens,
beta 0.04 (reference forward), loss "grpo", one update per step, no eval.
bench.py gives TRL's GRPOTrainer the same prompts, rewards and settings.
"""

from grpo_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.defaults()
  c.model.name = "smollm2-135m-instruct"
  c.model.dtype = "float32"
  c.task.name = "arithmetic"
  c.task.template = "chat"
  c.task.kwargs.min_digits = 1
  c.task.kwargs.max_digits = 1
  c.task.kwargs.operators = "+-"
  c.rewards = [("accuracy_lenient", 1.0), ("format", 0.5)]
  c.rl.num_generations = 8
  c.rl.beta = 0.04
  c.rl.epsilon = 0.2
  c.rl.loss_type = "grpo"
  c.rl.num_iterations = 1
  c.rl.max_prompt_length = 128
  c.rl.max_completion_length = 64
  c.rl.temperature = 1.0
  c.opt.learning_rate = 2e-5
  c.opt.max_grad_norm = 1.0
  c.train.steps = 6
  c.train.prompts_per_step = 2
  c.train.checkpoint_every = 1_000_000  # only the final checkpoint, after the last timed step
  c.eval.num_problems = 0  # no eval
  return c
