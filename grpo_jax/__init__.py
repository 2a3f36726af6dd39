"""grpo_jax: GRPO (critic-free RL from verifiable rewards) for language models in JAX/Flax.

One module per stage of a GRPO step:
    data/         tasks, templates, tokenisation
    sampling.py   G completions per prompt with a KV cache
    rewards/      reward functions (TRL signature) and their combination
    advantages.py group-relative advantages
    losses.py     token log-probs, the GRPO / DAPO / Dr. GRPO / GSPO losses
    models/       Llama-family transformer in Flax NNX, checkpoint import/export
"""

__version__ = "0.1.0"
