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
import unicodedata
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


# ----------------------------------------------------------------------------
# Answers read through a regular expression (the `pattern` / `answer_group` keywords).
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
  return re.compile(pattern, re.DOTALL)


def _group_key(answer_group):
  """A group index written as text ("1", from the command line) is the index 1."""
  if isinstance(answer_group, str) and answer_group.isdigit():
    return int(answer_group)
  return answer_group


def check_extraction(pattern=None, answer_group=None, **unused_keywords) -> None:
  """ValueError unless `pattern` compiles and has the group `answer_group` (start-up check)."""
  del unused_keywords
  if pattern is None:
    if answer_group is not None:
      raise ValueError(f"answer_group={answer_group!r} needs a pattern to take the group from")
    return
  if not isinstance(pattern, str) or not pattern:
    raise ValueError(f"pattern={pattern!r}: expected a non-empty regular expression")
  try:
    compiled = _compiled(pattern)
  except re.error as e:
    raise ValueError(f"pattern={pattern!r} is not a regular expression: {e}") from None
  group = _group_key(answer_group)
  if group is None:
    return
  if isinstance(group, int) and not isinstance(group, bool):
    ok = 0 <= group <= compiled.groups
  else:
    ok = group in compiled.groupindex
  if not ok:
    raise ValueError(f"answer_group={answer_group!r}: the pattern {pattern!r} has no such group "
                     f"(groups 0..{compiled.groups}, names {sorted(compiled.groupindex)})")


def extract_with_pattern(text: str, pattern: str, answer_group=None) -> str | None:
  """The group `answer_group` (a name or an index; None: the whole match) of `pattern`
  matched against the whole of `text` after stripping (re.DOTALL: "." matches newlines);
  None when the text does not match or the group took no part in the match."""
  match = _compiled(pattern).fullmatch(text.strip())
  if match is None:
    return None
  return match.group(_group_key(answer_group) or 0)


def _predicted(completion, pattern, answer_group) -> str | None:
  """The answer a completion gives: without a pattern its <answer> content, else the whole
  text; with one, what `extract_with_pattern` takes (None: the format is broken)."""
  if pattern is None:
    return _answer_or_text(completion)
  return extract_with_pattern(completion_text(completion), pattern, answer_group)


def _reference_text(reference, pattern, answer_group) -> str:
  """A reference written in the template goes through the same extraction as the completion;
  one that does not match the pattern (a bare answer) is compared as it is."""
  reference = str(reference)
  if pattern is None:
    return reference
  extracted = extract_with_pattern(reference, pattern, answer_group)
  return reference if extracted is None else extracted


def regex_format_reward(prompts, completions, *, pattern: str,
                        answer_group: int | str | None = None, **unused_columns):
  """1.0 if the completion, stripped, matches the regular expression `pattern` as a whole
  (re.DOTALL) and is not empty, else 0.0. With `answer_group` (a group name or index) that
  group must also have matched something other than whitespace.

  `pattern` comes from the config: --config.reward_kwargs.regex_format.pattern='...'.
  """
  del prompts, unused_columns
  rewards = []
  for completion in completions:
    answer = extract_with_pattern(completion_text(completion), pattern, answer_group)
    rewards.append(float(answer is not None and bool(answer.strip())))
  return rewards


regex_format_reward.check_kwargs = check_extraction


def exact_match_reward(prompts, completions, reference=None, answer=None, *,
                       pattern: str | None = None, answer_group: int | str | None = None,
                       **unused_columns):
  """1.0 if the <answer> content (else the whole completion) equals the
  `reference` column (else `answer`) up to case and whitespace; None where the
  reference is None.

  With `pattern` (and optionally `answer_group`) the answer is read through
  `extract_with_pattern` instead: 0.0 when the completion does not match, and a
  reference that matches the pattern is read the same way.
  """
  del prompts, unused_columns

  def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()

  references = _references(reference, answer, "exact_match")
  rewards = []
  for completion, ref in zip(completions, references, strict=True):
    if ref is None:
      rewards.append(None)
      continue
    pred = _predicted(completion, pattern, answer_group)
    rewards.append(0.0 if pred is None else
                   float(normalise(pred) == normalise(_reference_text(ref, pattern, answer_group))))
  return rewards


exact_match_reward.check_kwargs = check_extraction


# ----------------------------------------------------------------------------
# ROUGE on any script.
# ----------------------------------------------------------------------------

TOKENIZATIONS = ("words", "characters", "policy")


def _single_character_word(ch: str) -> bool:
  """Han ideographs, Hiragana and Katakana: scripts written without spaces, where each
  character is one token of "words" tokenisation (a common choice for Chinese and Japanese
  ROUGE without a segmenter)."""
  o = ord(ch)
  return (0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0x3400 <= o <= 0x4DBF
          or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3FFFF)


def _normalised(text: str) -> str:
  # NFKC: full-width Latin and half-width Katakana become the usual forms, decomposed
  # accents and Hangul jamo compose; casefold: case-insensitive in every cased script.
  return unicodedata.normalize("NFKC", text).casefold()


def word_tokens(text: str) -> list[str]:
  """"words" tokenisation: NFKC-normalised, case-folded runs of letters, digits and combining
  marks, split at everything else (spaces, punctuation, symbols, "_"), except that each Han,
  Hiragana or Katakana character is a token of its own. Hangul is written with spaces, so a
  Korean token is a space-separated word with its particles ("사과를"); for a finer
  match use "characters".

  On ASCII text this gives rouge-score's default tokens (lowercase [a-z0-9] runs, no stemmer).
  """
  tokens, current = [], []
  for ch in _normalised(text):
    kind = unicodedata.category(ch)[0]
    if kind == "L" and _single_character_word(ch):
      if current:
        tokens.append("".join(current))
        current = []
      tokens.append(ch)
    elif kind in "LN" or (kind == "M" and current):
      current.append(ch)
    elif current:
      tokens.append("".join(current))
      current = []
  if current:
    tokens.append("".join(current))
  return tokens


def character_tokens(text: str) -> list[str]:
  """"characters" tokenisation: each letter or digit (NFKC-normalised, case-folded; a Hangul
  syllable is one character) with its combining marks; spaces, punctuation and symbols drop."""
  tokens = []
  for ch in _normalised(text):
    kind = unicodedata.category(ch)[0]
    if kind in "LN":
      tokens.append(ch)
    elif kind == "M" and tokens:
      tokens[-1] += ch
  return tokens


def tokenize_fn(tokenizer) -> Callable[[str], list]:
  """The text -> tokens function of the `tokenizer` keyword: "words" (`word_tokens`),
  "characters" (`character_tokens`), an object with a `tokenize` method (a Hugging Face
  tokenizer: its subword tokens), or any callable text -> list of tokens. "policy" stands for
  the policy's tokenizer, which `rewards.get_reward_fns(..., tokenizer=)` puts in its place."""
  if tokenizer is None or tokenizer == "words":
    return word_tokens
  if tokenizer == "characters":
    return character_tokens
  if tokenizer == "policy":
    raise ValueError("tokenizer='policy' is the policy's tokenizer, which the reward gets from "
                     "the training loop (rewards.get_reward_fns(..., tokenizer=the_tokenizer)); "
                     "called directly, pass the tokenizer object itself")
  if hasattr(tokenizer, "tokenize"):
    return tokenizer.tokenize
  if callable(tokenizer):
    return tokenizer
  raise ValueError(f"tokenizer={tokenizer!r}; expected one of {list(TOKENIZATIONS)}, a "
                   "tokenizer object with a tokenize method, or a function text -> tokens")


def check_rouge_kwargs(tokenizer="words", **extraction) -> None:
  """ValueError for a tokenizer or an extraction ROUGE cannot use (start-up check)."""
  if isinstance(tokenizer, str) and tokenizer not in TOKENIZATIONS:
    raise ValueError(f"tokenizer={tokenizer!r}; expected one of {list(TOKENIZATIONS)}")
  if not isinstance(tokenizer, str):
    tokenize_fn(tokenizer)
  check_extraction(**extraction)


class _Tokenizer:
  """rouge-score's tokenizer interface around a text -> tokens function."""

  def __init__(self, fn):
    self.fn = fn

  def tokenize(self, text):
    return list(self.fn(text))


def _rouge(kind, completions, reference, answer, tokenizer, pattern, answer_group):
  from rouge_score import rouge_scorer  # imported here: it imports nltk, which is slow

  scorer = rouge_scorer.RougeScorer([kind], tokenizer=_Tokenizer(tokenize_fn(tokenizer)))
  rewards = []
  for completion, ref in zip(completions, _references(reference, answer, kind), strict=True):
    if ref is None:
      rewards.append(None)
      continue
    pred = _predicted(completion, pattern, answer_group)
    rewards.append(0.0 if pred is None else float(
        scorer.score(_reference_text(ref, pattern, answer_group), pred)[kind].fmeasure))
  return rewards


def rouge1_reward(prompts, completions, reference=None, answer=None, *, tokenizer="words",
                  pattern: str | None = None, answer_group: int | str | None = None,
                  **unused_columns):
  """ROUGE-1 F1 (unigram overlap, rouge-score's scorer) between the <answer> content (else
  the whole completion) and the `reference` column (else `answer`); None where the reference
  is None.

  Args:
    tokenizer: "words" (default; `word_tokens`: any script), "characters"
      (`character_tokens`), "policy" (the policy's subword tokens, in training) or a
      tokenizer object / function (see `tokenize_fn`).
    pattern, answer_group: read the answer through a regular expression instead of
      <answer> tags (see `exact_match_reward`); 0.0 when the completion does not match.
  """
  del prompts, unused_columns
  return _rouge("rouge1", completions, reference, answer, tokenizer, pattern, answer_group)


def rougeL_reward(prompts, completions, reference=None, answer=None, *, tokenizer="words",
                  pattern: str | None = None, answer_group: int | str | None = None,
                  **unused_columns):
  """ROUGE-L F1 (longest common subsequence of tokens, rouge-score's scorer); otherwise as
  `rouge1_reward`."""
  del prompts, unused_columns
  return _rouge("rougeL", completions, reference, answer, tokenizer, pattern, answer_group)


rouge1_reward.check_kwargs = rougeL_reward.check_kwargs = check_rouge_kwargs


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
