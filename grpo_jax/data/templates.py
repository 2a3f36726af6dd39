"""Prompt templates: a task's question -> the text the model continues.

    "r1_zero"  DeepSeek-R1-Zero's template (docs/maths.md), for base models
    "chat"     the tokenizer's chat template, with a system message asking for
               <think> reasoning and an <answer>, for instruction-tuned models
    "plain"    the question as it is
"""

from __future__ import annotations

import functools
from typing import Sequence

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


def end_of_turn_id(tokenizer, template: str = "chat") -> int:
  """The token that ends an answer: under a chat template, the special token the template puts
  right after an assistant turn (<|im_end|>, <|eot_id|>, <end_of_turn>, ...); else EOS."""
  if template == "chat" and getattr(tokenizer, "chat_template", None):
    marker = "COMPLETION"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"},
                                          {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text[text.rindex(marker) + len(marker):]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
      if token in special:
        return token
  return tokenizer.eos_token_id


def stop_ids(tokenizer, stop_strings: Sequence[str] = ()) -> tuple[int, ...]:
  """The tokens that end sampling: EOS and the chat template's end of turn (an instruct model
  ends its answer with the latter, a base model with the former), and every token whose text
  contains one of `stop_strings` (config.rl.stop_strings, e.g. ("\n",): a base model's
  one-line answer ends at its line break, as vLLM's `stop` ends it).

  Raises:
    ValueError: a stop string that no token contains (it would never stop anything).
  """
  ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer, "chat")}
  ids |= set(tokens_containing(tokenizer, stop_strings))
  return tuple(sorted(i for i in ids if i is not None))


def tokens_containing(tokenizer, stop_strings: Sequence[str]) -> list[int]:
  """The ids of the tokens whose decoded text contains one of `stop_strings`, special tokens
  left out (a completion's text skips them, so a string in their names is no text of it).

  A completion is cut token by token, so a stop string must lie inside one token: a single
  character such as "\n" always does (every token holding a line break is found, "\n\n" and
  " \n" too); a longer string that the tokenizer only ever splits is refused here rather than
  left to never stop a completion.
  """
  if not stop_strings:
    return []
  texts = _vocabulary_texts(tokenizer)
  found = []
  for s in stop_strings:
    ids = [i for i, text in enumerate(texts) if s in text]
    if not ids:
      raise ValueError(f"stop string {s!r}: no token of this tokenizer contains it, so it "
                       "would never end a completion; a stop string must lie within one token "
                       '(a single character such as "\n" always does)')
    found += ids
  return sorted(set(found))


@functools.lru_cache(maxsize=4)
def _vocabulary_texts(tokenizer) -> tuple[str, ...]:
  """Each token id's text as a completion shows it, special tokens as "" (Gemma 3's 262k
  tokens: ~3 s, once per tokenizer)."""
  return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))],
                                      skip_special_tokens=True))


def decode_completion(tokenizer, token_ids, stop_strings: Sequence[str] = ()) -> str:
  """A completion's text: its tokens decoded without special tokens, cut before the first of
  `stop_strings` (what training's rewards, the evaluation and `generate` all read)."""
  return cut_at_stop(tokenizer.decode(token_ids, skip_special_tokens=True), stop_strings)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to (without) the first of `stop_strings` in it: what the rewards see of a
  completion that a stop string ended (the stop token may carry more text after it)."""
  cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
  return text[:cut]
