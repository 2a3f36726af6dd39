"""`python -m grpo_jax`: what the package offers and how to launch it."""

import grpo_jax
from grpo_jax.models import KNOWN_MODELS

HELP = f"""grpo_jax {grpo_jax.__version__}: GRPO (DeepSeekMath / DeepSeek-R1 RL from verifiable rewards) in JAX/Flax

Entry points:
  python -m grpo_jax.main --config=configs/smollm2_arithmetic.py --workdir=runs/smollm2_arithmetic
      train with GRPO (the default experiment; same command again to resume)
  python -m grpo_jax.generate --model=smollm2-135m-instruct --prompt="What is 7*6?" --chat
      sample from a model (a known name, a Hugging Face folder, a .gguf path, or a
      training workdir: its latest checkpoint)

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
