"""The default experiment: SmolLM2-135M-Instruct learns arithmetic with GRPO on a laptop CPU.

    python -m grpo_jax.main --config=configs/smollm2_arithmetic.py --workdir=runs/smollm2_arithmetic

R1 style: the chat template's system prompt asks for <think> reasoning and an
<answer>; rewards are accuracy (the answer in the tags, else the last number of
the completion: the 135M model does not use the tags at first) plus the R1
format reward. Held-out pass@1 (k samples at temperature 1, docs/maths.md's
definition) is evaluated before the first step, midway and after the last.
Expected on a 2-core CPU: about 15 minutes; see README.md for the measured curve.
"""

from grpo_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.defaults()
  c.model.name = "smollm2-135m-instruct"
  c.task.name = "arithmetic"
  c.task.template = "chat"
  c.task.kwargs.min_digits = 1
  c.task.kwargs.max_digits = 1
  c.task.kwargs.operators = "+-"
  c.rewards = [("accuracy_lenient", 1.0), ("format", 0.5)]
  c.rl.num_generations = 8
  c.rl.beta = 0.0  # no reference forward (DAPO / Dr. GRPO practice): a third less compute
  c.rl.max_prompt_length = 128
  c.rl.max_completion_length = 48
  c.rl.temperature = 1.0
  c.opt.learning_rate = 2e-5
  c.opt.max_grad_norm = 1.0
  c.train.steps = 30
  c.train.prompts_per_step = 4
  c.train.eval_every = 15
  c.train.checkpoint_every = 15
  c.eval.num_problems = 48
  c.eval.num_samples = 4
  c.eval.temperature = 1.0
  c.eval.prompts_per_batch = 8
  c.eval.reward = "accuracy_lenient"
  return c
