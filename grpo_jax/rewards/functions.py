"""Rule rewards with TRL's signature, called with keywords:

    fn(prompts=[...], completions=[...], **columns) -> list[float | None]

so TRL reward functions work unchanged. Columns are the dataset's per-row
columns (lists of length N), e.g. `answer`. None means "no reward for this
completion" (e.g. the ground truth could not be parsed); see combine.py.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any, Callable, Sequence

from grpo_jax.rewards.parse import (TAGS, completion_text, extract_answer, final_answer,
                                    lenient_final_answer, parse_number)

RewardFn = Callable[..., Sequence[Any]]


def _answer_or_text(completion) -> str:
  text = completion_text(completion)
  span = extract_answer(text)
  return text if span is None else span


def _numeric_accuracy(completions, answer, extract) -> list[float | None]:
  rewards = []
  for completion, gold in zip(completions, answer, strict=True):
    gold = parse_number(gold)
    if gold is None:
      rewards.append(None)
      continue
    pred = parse_number(extract(completion_text(completion)))
    rewards.append(float(pred == gold))
  return rewards


def accuracy_reward(prompts, completions, answer, **unused_columns):
  """1.0 if the final answer (see `final_answer`) equals the `answer` column
  as a number, exactly; 0.0 if not or if there is no final answer; None where
  the ground truth is not a number."""
  del prompts, unused_columns
  return _numeric_accuracy(completions, answer, final_answer)


def lenient_accuracy_reward(prompts, completions, answer, **unused_columns):
  """As `accuracy_reward`, but without tags or \\boxed{} the last number in
  the completion is its answer (see `lenient_final_answer`)."""
  del prompts, unused_columns
  return _numeric_accuracy(completions, answer, lenient_final_answer)


def _math_verify_timeout() -> int | None:
  # math-verify times out with signal.alarm, which raises ValueError outside
  # the main thread (e.g. a reward thread pool). There it runs without a
  # timeout. Note the alarm also cancels any outer SIGALRM (pytest-timeout's
  # signal method) while it runs.
  return 5 if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str, timeout: int | None, *, wrap: bool):
  from math_verify import parse  # imported here: it imports sympy, which is slow

  parsed = []
  if wrap and "$" not in text:
    # A bare answer is all maths, but math-verify reads LaTeX only between $
    # signs: unwrapped, "2^{1/2}" parses as 2 and "x^2+1" not at all.
    parsed = parse(f"${text}$", parsing_timeout=timeout)
  return parsed or parse(text, parsing_timeout=timeout)


def math_accuracy_reward(prompts, completions, answer, **unused_columns):
  """1.0 if math-verify finds the answer equivalent to the `answer` column
  (symbolically or numerically: 1/2 == 0.5 == \\frac{1}{2}), else 0.0; None
  where math-verify cannot parse the ground truth.

  The answer is the <answer> content when there is one, else math-verify's
  own pick from the whole completion (\\boxed{} first, then the last expression).
  """
  del prompts, unused_columns
  from math_verify import verify

  timeout = _math_verify_timeout()
  rewards = []
  for completion, gold in zip(completions, answer, strict=True):
    gold = _math_parse(str(gold), timeout, wrap=True) if gold is not None else []
    if not gold:
      rewards.append(None)
      continue
    text = completion_text(completion)
    span = extract_answer(text)
    pred = _math_parse(text if span is None else span, timeout, wrap=span is not None)
    rewards.append(float(bool(pred) and verify(gold, pred, timeout_seconds=timeout)))
  return rewards


_STRICT_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_LENIENT_FORMAT = re.compile(r"</think>.*?<answer>.*?</answer>", re.DOTALL)


def format_reward(prompts, completions, **unused_columns):
  """R1 format, strict: exactly "<think>R</think><answer>A</answer>" with
  non-empty R and A, each tag once, only whitespace around. 1.0 or 0.0."""
  del prompts, unused_columns
  rewards = []
  for completion in completions:
    text = completion_text(completion)
    match = _STRICT_FORMAT.fullmatch(text)
    ok = (match is not None and all(text.count(tag) == 1 for tag in TAGS)
          and match.group(1).strip() and match.group(2).strip())
    rewards.append(float(bool(ok)))
  return rewards


def lenient_format_reward(prompts, completions, **unused_columns):
  """R1 format, lenient: "</think>" followed somewhere by "<answer>...</answer>".

  The opening <think> is not required, so it also works when the chat template
  already opens the reasoning in the prompt (Qwen3, DeepSeek-R1 distills).
  """
  del prompts, unused_columns
  return [float(_LENIENT_FORMAT.search(completion_text(c)) is not None) for c in completions]


def tag_count_reward(prompts, completions, **unused_columns):
  """0.25 for each of <think>, </think>, <answer>, </answer> present exactly once."""
  del prompts, unused_columns
  return [sum(0.25 for tag in TAGS if completion_text(c).count(tag) == 1) for c in completions]


def _references(reference, answer, name: str):
  if reference is not None:
    return reference
  if answer is not None:
    return answer
  raise ValueError(f"{name} needs a 'reference' or an 'answer' column.")


def exact_match_reward(prompts, completions, reference=None, answer=None, **unused_columns):
  """1.0 if the <answer> content (else the whole completion) equals the
  `reference` column (else `answer`) up to case and whitespace; None where the
  reference is None."""
  del prompts, unused_columns

  def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()

  references = _references(reference, answer, "exact_match")
  return [None if ref is None else float(normalise(_answer_or_text(c)) == normalise(str(ref)))
          for c, ref in zip(completions, references, strict=True)]


@functools.cache
def _rouge1_scorer():
  from rouge_score import rouge_scorer  # imported here: it imports nltk, which is slow

  return rouge_scorer.RougeScorer(["rouge1"])


def rouge1_reward(prompts, completions, reference=None, answer=None, **unused_columns):
  """ROUGE-1 F1 between the <answer> content (else the whole completion) and
  the `reference` column (else `answer`); None where the reference is None.

  rouge-score's tokenizer keeps only [a-z0-9] words: use it for English.
  """
  del prompts, unused_columns
  scorer = _rouge1_scorer()
  return [None if ref is None else scorer.score(str(ref), _answer_or_text(c))["rouge1"].fmeasure
          for c, ref in zip(completions, _references(reference, answer, "rouge1"), strict=True)]


def soft_overlong_penalty(max_completion_length: int, soft_cache_length: int) -> RewardFn:
  """DAPO's soft overlong punishment, as a reward function.

  With L_max = max_completion_length, L_cache = soft_cache_length and L the
  completion's length in tokens: 0 for L <= L_max - L_cache, then linearly
  down to -1 at L = L_max, and -1 beyond. Lengths come from the column
  `completion_lengths` (ints), else `completion_ids` (unpadded id lists, as TRL
  passes them).
  """
  if not 0 < soft_cache_length <= max_completion_length:
    raise ValueError(f"need 0 < soft_cache_length <= max_completion_length; got "
                     f"{soft_cache_length} and {max_completion_length}.")
  budget = max_completion_length - soft_cache_length

  def penalty(prompts, completions, completion_lengths=None, completion_ids=None, **unused_columns):
    del prompts, completions, unused_columns
    if completion_lengths is None:
      if completion_ids is None:
        raise ValueError("soft_overlong_penalty needs a 'completion_lengths' or "
                         "'completion_ids' column.")
      completion_lengths = [len(ids) for ids in completion_ids]
    return [max(-1.0, min(0.0, (budget - int(n)) / soft_cache_length)) for n in completion_lengths]

  penalty.__name__ = "soft_overlong_penalty"
  return penalty
