"""`python -m grpo_jax`: what the package offers and how to launch it."""

import grpo_jax
from grpo_jax import cli
from grpo_jax.models import KNOWN_MODELS


def entry_points() -> str:
  """One line per cli.ENTRY_POINTS program and its docstring's summary."""
  return "\n".join(f"  python -m grpo_jax.{name}\n      {cli.summary(name)}"
                   for name in cli.ENTRY_POINTS)


HELP = f"""grpo_jax {grpo_jax.__version__}: GRPO (DeepSeekMath / DeepSeek-R1 RL from verifiable rewards) in JAX/Flax

Entry points (each takes --help; --helpfull lists every flag):
{entry_points()}

For example:
  python -m grpo_jax.main --config=configs/smollm2_arithmetic.py --workdir=runs/smollm2_arithmetic
  python -m grpo_jax.generate --model=smollm2-135m-instruct --prompt="What is 7*6?"
  python -m grpo_jax.evaluate --model=runs/smollm2_arithmetic --num_problems=48

Library:
  grpo_jax.models.load(name_or_path, dtype=None) -> (model, tokenizer)
  grpo_jax.models.export(model, tokenizer, folder)       -> Hugging Face folder
  grpo_jax.losses.grpo_loss(...), grpo_jax.advantages.group_advantages(...)
  grpo_jax.rewards: TRL-signature reward functions and their combination

Known models: {", ".join(sorted(KNOWN_MODELS))}
See README.md.
"""

if __name__ == "__main__":
  print(HELP)
