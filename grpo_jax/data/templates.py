"""Prompt templates: a task's question -> the text the model continues.

    "r1_zero"  DeepSeek-R1-Zero's template (GRPO.md), for base models
    "chat"     the tokenizer's chat template, with a system message asking for
               <think> reasoning and an <answer>, for instruction-tuned models
    "plain"    the question as it is
"""

from __future__ import annotations

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively. User: {prompt}. Assistant:")

SYSTEM_PROMPT = (
    "You are a helpful assistant. First reason step by step inside <think> </think> "
    "tags, then give only the final answer inside <answer> </answer> tags.")

TEMPLATES = ("r1_zero", "chat", "plain")


def format_prompt(example: dict, template: str, tokenizer=None) -> str:
  """The prompt text of `example` (a dict with "prompt") under `template`.

  Args:
    example: a task example.
    template: one of TEMPLATES.
    tokenizer: a transformers tokenizer with a chat template; only "chat" uses it.
  """
  prompt = example["prompt"]
  if template == "r1_zero":
    return R1_ZERO.format(prompt=prompt)
  if template == "plain":
    return prompt
  if template == "chat":
    if getattr(tokenizer, "chat_template", None) is None:
      raise ValueError('template "chat" needs a tokenizer with a chat template; '
                       'use "r1_zero" or "plain" for a base model')
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  raise ValueError(f"unknown template {template!r}; known templates: {list(TEMPLATES)}")
