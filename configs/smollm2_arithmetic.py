"""The default experiment: SmolLM2-135M-Instruct learns arithmetic with GRPO on a laptop CPU.

    python -m grpo_jax.main --config=configs/smollm2_arithmetic.py --workdir=runs/smollm2_arithmetic

R1 style: the chat template's system prompt asks for <think> reasoning and an
<answer>; rewards are accuracy (the answer in the tags, else the last number of
the completion: the 135M model does not use the tags at first) plus the R1
format reward. Held-out pass@1 (k samples at temperature 1, docs/maths.md's
definition) is evaluated before the first step, midway and after the last.
Expected on a 2-core CPU: about 15 minutes; see README.md for the measured curve.
The 1-digit task is the quick demo: its held-out split has only 17 distinct
problems (the evaluation says so), too few to compare methods on.

The preset `:two_digit` is the headline task (README, experiments/run.py headline):
operands of 1-2 digits, which the instruct model solves ~5% of the time before
training, evaluated on 500 distinct held-out problems x 2 samples before the
first step and after the last, with 95% intervals:

    python -m grpo_jax.main --config=configs/smollm2_arithmetic.py:two_digit --workdir=runs/two_digit
"""

from grpo_jax import config as config_lib


PRESETS = ("two_digit",)


def get_config(arg: str | None = None):
  if arg not in (None, "", *PRESETS):
    raise ValueError(f"unknown preset {arg!r} of configs/smollm2_arithmetic.py; known: "
                     f"{list(PRESETS)}")
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
  if arg == "two_digit":
    c.task.kwargs.max_digits = 2
    c.eval.num_problems = 500
    c.eval.num_samples = 2
    c.eval.prompts_per_batch = 64  # ~2x the throughput of 16 on a 2-core CPU
    c.train.eval_every = 0  # before the first step and after the last: ~4 min each
  return c
