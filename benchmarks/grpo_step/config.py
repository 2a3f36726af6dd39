"""The GRPO-step benchmark's workload for grpo_jax (run by benchmarks/grpo_step/bench.py).

    python -m grpo_jax.main --config=benchmarks/grpo_step/config.py --workdir=/tmp/bench \\
        --config.train.steps=6

The default experiment (configs/smollm2_arithmetic.py: SmolLM2-135M-Instruct,
fp32, 1-digit "+-" arithmetic with the chat template) with what the benchmark
changes: 2 prompts x 8 generations a step, up to 64 new tokens, beta 0.04 (a
reference forward), loss "grpo", one update per step, no eval. bench.py gives
TRL's GRPOTrainer the same prompts, rewards and settings.
"""

import os

from grpo_jax import config as config_lib

EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                          "smollm2_arithmetic.py")


def get_config(arg: str | None = None):
  del arg
  c = config_lib.from_file(EXPERIMENT)
  # Pinned though the experiment has them: trl_run.py hardcodes fp32 weights and one update.
  c.model.dtype = "float32"
  c.rl.num_iterations = 1
  c.rl.beta = 0.04  # the reference forward is part of the measured step
  c.rl.max_completion_length = 64
  c.train.steps = 6
  c.train.prompts_per_step = 2
  c.train.checkpoint_every = 1_000_000  # only the final checkpoint, after the last timed step
  c.train.eval_every = 0
  c.eval = config_lib.defaults().eval  # no eval: the default section, switched off below
  c.eval.num_problems = 0
  return c
