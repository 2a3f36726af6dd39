"""Data: tasks (deterministic, indexable examples) and prompt templates.

    task = data.get_task("arithmetic", max_digits=2, operators="+-", seed=0)
    batch = task.train_batch(start_index, batch_size)   # [{"prompt", "answer", ...}]
    texts = [data.format_prompt(ex, "chat", tokenizer) for ex in batch]
"""

from grpo_jax.data.tasks import TASKS, Arithmetic, Countdown, Jsonl, get_task
from grpo_jax.data.tfds_tasks import Gsm8k, Math
from grpo_jax.data.templates import R1_ZERO, SYSTEM_PROMPT, TEMPLATES, format_prompt

__all__ = ["TASKS", "Arithmetic", "Countdown", "Gsm8k", "Jsonl", "Math", "get_task", "R1_ZERO",
           "SYSTEM_PROMPT", "TEMPLATES", "format_prompt"]
