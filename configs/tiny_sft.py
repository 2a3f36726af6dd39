"""Tiny random model, supervised fine-tuning (a cold start): tests and smoke runs of mode "sft".

    python -m grpo_jax.main --config=configs/tiny_sft.py --workdir=/tmp/tiny_sft
    python -m grpo_jax.main --config=configs/tiny_sft.py:/path/data.jsonl --workdir=/tmp/tiny_sft
    python -m grpo_jax.main --config=configs/tiny_arithmetic.py --workdir=/tmp/tiny_grpo \\
        --config.model.name=/tmp/tiny_sft     # then GRPO from the SFT checkpoint

Data: the JSONL after ":" ({"prompt", "completion"} or {"messages"} rows), by
default configs/data/arithmetic_sft.jsonl: the 183 training problems of
configs/tiny_arithmetic.py's task (1-digit + and -, none of its held-out ones)
with R1-format completions, "<think>3 + 4 = 7</think><answer>7</answer>".
The task's held-out problems are evaluated (greedy) before, during and after,
as in GRPO, so the cold start can be compared with a GRPO run.

Measured (2-core CPU, ~40 s in all): the loss 4.71 nats a token at step 1,
0.125 over the last 50 steps; held-out accuracy (16 problems, greedy) 0 ->
0.375 at step 400 (0.19, 0.0, 0.25 at steps 100-300: a 2-layer model, noisy);
every held-out completion then has the R1 format (the format reward 0 -> 1.0).
"""

import os

from grpo_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "arithmetic_sft.jsonl")


def get_config(arg: str | None = None):
  grpo = config_lib.from_file(os.path.join(HERE, "tiny_arithmetic.py"))
  c = config_lib.defaults()
  c.mode = "sft"
  c.model = grpo.model  # the model and the task (template, held-out problems) of GRPO's run
  c.task = grpo.task
  c.sft.path = arg or DATA
  c.sft.max_length = 64
  c.rl.max_prompt_length = 32  # evaluation: prompts and new tokens
  c.rl.max_completion_length = 32
  c.opt.learning_rate = 3e-3
  c.opt.warmup_steps = 10
  c.opt.schedule = "constant"
  c.train.steps = 400  # 35 epochs
  c.train.prompts_per_step = 16
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.eval.num_problems = 16
  c.eval.temperature = 0.0
  c.eval.prompts_per_batch = 16
  c.eval.reward = "accuracy"
  return c
