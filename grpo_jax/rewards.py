"""Rewards: rule-based reward functions, their weighted sum, and a jittable numeric reward.

Host-side reward functions have TRL's signature and are called with keywords,
    fn(prompts=[...], completions=[...], **columns) -> list[float | None]
so TRL reward functions work unchanged. A completion is a string or TRL's
conversational form [{"role": "assistant", "content": "..."}]. Columns are
the dataset's per-row columns (lists of length N), e.g. `answer`.

None means "this function has no reward for this completion" (e.g. the
ground truth could not be parsed). `combine_rewards` skips it; a completion
that no function rewards gets NaN, which `advantages.py` treats as missing.

`numeric_answer_reward_ids` is the on-device alternative for synthetic tasks
whose tokenizer writes one digit per token (SmolLM2, Llama 2, Qwen2).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import fractions
import functools
import logging
import math
import re
import threading
import unicodedata
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

RewardFn = Callable[..., Sequence[Any]]

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class RewardError(RuntimeError):
  """A reward function failed or broke the reward-function contract."""


# ----------------------------------------------------------------------------
# Reading completions.
# ----------------------------------------------------------------------------


def completion_text(completion) -> str:
  """Text of a completion: a string, or the joined contents of chat messages."""
  if isinstance(completion, str):
    return completion
  if isinstance(completion, dict):
    completion = [completion]
  parts = []
  for message in completion:
    content = message.get("content") or ""
    if not isinstance(content, str):  # multimodal list of parts
      content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    parts.append(content)
  return "".join(parts)


def extract_answer(text: str) -> str | None:
  """Content of the last complete <answer>...</answer> block, or None.

  With nested tags the innermost block counts; an unclosed (truncated) last
  block is skipped in favour of an earlier complete one.
  """
  start = text.rfind("<answer>")
  while start >= 0:
    end = text.find("</answer>", start)
    if end >= 0:
      return text[start + len("<answer>"):end]
    start = text.rfind("<answer>", 0, start)
  return None


def extract_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} whose braces balance, or None."""
  start = text.rfind("\\boxed{")
  while start >= 0:
    begin = end = start + len("\\boxed{")
    depth = 1
    while end < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[end], 0)
      end += 1
    if depth == 0:
      return text[begin:end - 1]
    start = text.rfind("\\boxed{", 0, start)
  return None


def final_answer(text: str) -> str | None:
  """The answer a completion commits to: <answer> content (a \\boxed{} inside
  it wins), else the last \\boxed{}; None when there is neither."""
  span = extract_answer(text)
  boxed = extract_boxed(text if span is None else span)
  return span if boxed is None else boxed


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def lenient_final_answer(text: str) -> str | None:
  """`final_answer`, else the last number in the text (like eval harnesses'
  "flexible extract"): for models that do not (yet) use the answer tags."""
  answer = final_answer(text)
  if answer is not None:
    return answer
  numbers = _LAST_NUMBER.findall(text)
  return numbers[-1].rstrip(",") if numbers else None


def _answer_or_text(completion) -> str:
  text = completion_text(completion)
  span = extract_answer(text)
  return text if span is None else span


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")
_FRAC = re.compile(r"\\d?frac\{\s*([^{}]+?)\s*\}\{\s*([^{}]+?)\s*\}")


def parse_number(text) -> fractions.Fraction | None:
  """Exact value of a plain numeric answer ("42", "-0.5", "1,000", "3/4",
  "\\frac{3}{4}", "$7$", "1e3"); GSM8K "... #### 42" reads the part after ####."""
  if text is None:
    return None
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    text = repr(text)  # repr(0.1) == "0.1": the decimal as written, not its binary value
  text = str(text).split("####")[-1].strip().strip("$").strip().rstrip(".")
  if _THOUSANDS.fullmatch(text):
    text = text.replace(",", "")
  text = _FRAC.sub(r"\1/\2", text)
  try:
    return fractions.Fraction(text)
  except (ValueError, ZeroDivisionError):
    return None


# ----------------------------------------------------------------------------
# Reward functions (TRL signature).
# ----------------------------------------------------------------------------


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


SCRIPTS = ("latin", "cjk", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai")
_SCRIPT_ALIASES = {"en": "latin", "english": "latin", "zh": "cjk", "chinese": "cjk",
                   "ja": "cjk", "japanese": "cjk", "ko": "cjk", "korean": "cjk", "ru": "cyrillic"}
_CJK_NAMES = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO")
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _char_script(ch: str) -> str | None:
  """Script of a letter; "mark" for combining marks; None for anything else."""
  if unicodedata.category(ch).startswith("M"):
    return "mark"
  if not ch.isalpha():
    return None
  name = unicodedata.name(ch, "").removeprefix("FULLWIDTH ")
  if name.startswith("MATHEMATICAL"):  # italic x and friends: maths, not language
    return None
  if name.startswith(_CJK_NAMES):
    return "cjk"
  script = name.split(" ", 1)[0].lower()
  return script if script in SCRIPTS else "other"


def script_word_counts(text: str) -> dict[str, int]:
  """Words per script: runs of letters of one script (combining marks join
  the run), except that each CJK character is a word of its own."""
  counts: dict[str, int] = {}
  previous = None
  for ch in text:
    script = _char_script(ch)
    if script == "mark":
      continue
    if script is not None and (script == "cjk" or script != previous):
      counts[script] = counts.get(script, 0) + 1
    previous = script
  return counts


def language_consistency_reward(prompts, completions, language=None, **unused_columns):
  """Share of the reasoning's words written in the target script (DeepSeek-R1).

  The reasoning is the content of the <think> blocks or, when there is none,
  the whole completion; tags never count as words. A CJK character counts as
  a word. Reasoning with no words at all (pure maths) cannot mix languages
  and gets 1.0.

  Args:
    language: optional column (or one value for all rows) naming the target:
      a script in SCRIPTS or an alias ("en", "zh", ...). Default "latin".
  """
  del prompts, unused_columns
  if language is None or isinstance(language, str):
    language = [language or "latin"] * len(completions)
  rewards = []
  for completion, target in zip(completions, language, strict=True):
    target = (target or "latin").lower()
    target = _SCRIPT_ALIASES.get(target, target)
    if target not in SCRIPTS:
      raise ValueError(f"unknown target language {target!r}; expected one of "
                       f"{list(SCRIPTS)} or {sorted(_SCRIPT_ALIASES)}.")
    text = completion_text(completion)
    thoughts = _THINK_RE.findall(text)
    counts = script_word_counts(_TAG_RE.sub(" ", " ".join(thoughts) if thoughts else text))
    total = sum(counts.values())
    rewards.append(counts.get(target, 0) / total if total else 1.0)
  return rewards


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

  return [None if ref is None else float(normalise(_answer_or_text(c)) == normalise(str(ref)))
          for c, ref in zip(completions, _references(reference, answer, "exact_match"), strict=True)]


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


# Countdown: an arithmetic expression over given numbers that must hit a target.
_COUNTDOWN_CHARS = re.compile(r"[0-9+\-*/()\s]+")
_EQUATION_RUN = re.compile(r"[0-9(][0-9+\-*/()= \t]*[0-9)]|[0-9]")  # within one line
_COUNTDOWN_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                  ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_MAX_EQUATION_CHARS = 500


def countdown_equation(text: str) -> str | None:
  """The equation a Countdown completion commits to: `final_answer` (the
  <answer> or \\boxed{} content), else the last run of digits, + - * / ( ) =
  and spaces within a line that holds an operator; None when there is neither."""
  answer = final_answer(text)
  if answer is not None:
    return answer
  runs = [run for run in _EQUATION_RUN.findall(text) if re.search(r"[+\-*/]", run)]
  return runs[-1] if runs else None


def countdown_value(expression: str, numbers) -> fractions.Fraction | None:
  """Exact value of `expression` if it is a valid Countdown answer, else None.

  Valid: only integer literals, + - * / and parentheses (no unary signs, no
  ** or //), each literal one of `numbers`, used at most as often as it is
  given. The text is parsed with `ast` and the tree walked by hand, never
  eval'd; literals are checked before any arithmetic, and the arithmetic is
  on Fractions, so 7 / 2 * 2 is exactly 7 and division by zero is invalid.
  """
  if len(expression) > _MAX_EQUATION_CHARS or not _COUNTDOWN_CHARS.fullmatch(expression):
    return None
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  literals = []
  for node in ast.walk(tree.body):
    if isinstance(node, ast.Constant) and type(node.value) is int:
      literals.append(node.value)
    elif not isinstance(node, (ast.BinOp, *_COUNTDOWN_OPS)):
      return None  # a unary sign, **, //, a call, a name, ...
  if not literals or not collections.Counter(literals) <= collections.Counter(numbers):
    return None  # a number not given, or one used more often than it is given

  def value(node):
    if isinstance(node, ast.Constant):
      return fractions.Fraction(node.value)
    return _COUNTDOWN_OPS[type(node.op)](value(node.left), value(node.right))

  try:
    return value(tree.body)
  except ZeroDivisionError:
    return None


def countdown_reward(prompts, completions, numbers, target, **unused_columns):
  """1.0 if the completion's equation (see `countdown_equation`) is a valid
  Countdown answer (see `countdown_value`) equal to the `target` column, else
  0.0; None where a row has no numbers or target.

  "(3 + 5) * 2 = 16" counts as "(3 + 5) * 2" when every part after the first
  "=" is the target itself. `numbers` holds one list of integers per row.
  """
  del prompts, unused_columns
  rewards = []
  for completion, given, goal in zip(completions, numbers, target, strict=True):
    if given is None or goal is None:
      rewards.append(None)
      continue
    goal, given = int(goal), [int(x) for x in given]
    equation = countdown_equation(completion_text(completion))
    if equation is None:
      rewards.append(0.0)
      continue
    expression, *results = equation.split("=")
    if any(not re.fullmatch(r"\s*[0-9]+\s*", r) or int(r) != goal for r in results):
      rewards.append(0.0)
      continue
    rewards.append(float(countdown_value(expression, given) == goal))
  return rewards


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
        raise ValueError("soft_overlong_penalty needs a 'completion_lengths' or 'completion_ids' column.")
      completion_lengths = [len(ids) for ids in completion_ids]
    return [max(-1.0, min(0.0, (budget - int(n)) / soft_cache_length)) for n in completion_lengths]

  penalty.__name__ = "soft_overlong_penalty"
  return penalty


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "accuracy_lenient": lenient_accuracy_reward,
    "math_accuracy": math_accuracy_reward,
    "format": format_reward,
    "format_lenient": lenient_format_reward,
    "tag_count": tag_count_reward,
    "language_consistency": language_consistency_reward,
    "exact_match": exact_match_reward,
    "rouge1": rouge1_reward,
    "countdown": countdown_reward,
}


# ----------------------------------------------------------------------------
# Combining reward functions.
# ----------------------------------------------------------------------------


def reward_fn_name(fn) -> str:
  """__name__ of a function (or of a partial's function), else its class name."""
  if isinstance(fn, functools.partial):
    return reward_fn_name(fn.func)
  return getattr(fn, "__name__", None) or type(fn).__name__


# Rewards the training loop builds at run time (they need a model), by name in config.rewards.
RUNTIME_REWARDS = ("judge",)  # judge.py: a model ranks each group's answers (config.judge)


def get_reward_fns(specs) -> tuple[list[tuple[str, RewardFn]], list[float]]:
  """Resolves `config.rewards` into (named reward functions, weights).

  Args:
    specs: sequence of (name_or_fn, weight), or bare names / functions
      (weight 1). Names are keys of REWARD_FUNCTIONS or RUNTIME_REWARDS; a
      RUNTIME_REWARDS name comes back with None as its function, for the
      caller that has the model to build it.

  Returns:
    ([(name, fn)], [weight]), ready for `combine_rewards(*get_reward_fns(...), ...)`.
  """
  named, weights = [], []
  for spec in specs:
    fn, weight = (spec, 1.0) if isinstance(spec, str) or callable(spec) else spec
    if callable(fn):
      named.append((reward_fn_name(fn), fn))
    elif fn in REWARD_FUNCTIONS:
      named.append((fn, REWARD_FUNCTIONS[fn]))
    elif fn in RUNTIME_REWARDS:
      named.append((fn, None))
    else:
      raise ValueError(f"unknown reward {fn!r}; known rewards: "
                       f"{sorted(REWARD_FUNCTIONS) + list(RUNTIME_REWARDS)}.")
    weights.append(float(weight))
  return named, weights


def _short(completion, limit: int = 200) -> str:
  text = repr(completion)
  return text if len(text) <= limit else text[:limit] + "..."


def _checked_value(value) -> float:
  """float(value), NaN for None; raises on non-numbers and on NaN / inf."""
  if value is None:
    return math.nan
  if isinstance(value, (str, bytes)):
    raise TypeError(f"returned {value!r}, not a number")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"returned {value}; rewards must be finite (None means 'no reward')")
  return value


def _row_columns(columns: dict, i: int, n: int) -> dict:
  """The columns of row i as length-1 lists; other keyword values unchanged."""
  return {k: v[i:i + 1] if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n else v
          for k, v in columns.items()}


def _score(name, fn, prompts, completions, columns):
  """One function's rewards [N] (NaN = None) and [(row, exception)] failures."""
  n = len(completions)
  try:
    values = list(fn(prompts=prompts, completions=completions, **columns))
  except Exception as batch_error:  # any bug in user code: find the row, then report or zero it
    # Call row by row to find out which completion it chokes on.
    values, failures = [], []
    for i in range(n):
      try:
        row = list(fn(prompts=None if prompts is None else prompts[i:i + 1],
                      completions=completions[i:i + 1], **_row_columns(columns, i, n)))
      except Exception as e:
        values.append(math.nan)
        failures.append((i, e))
        continue
      if len(row) != 1:
        raise RewardError(f"reward function {name!r} returned {len(row)} values for 1 completion.")
      values.append(row[0])
    if not failures:
      raise RewardError(f"reward function {name!r} raised {type(batch_error).__name__}: "
                        f"{batch_error} on the batch, but on no single completion.") from batch_error
  else:
    failures = []
    if len(values) != n:
      raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions.")
  rewards = np.full(n, np.nan)
  failed = {i for i, _ in failures}
  for i, value in enumerate(values):
    if i in failed:
      continue
    try:
      rewards[i] = _checked_value(value)
    except (TypeError, ValueError) as e:
      failures.append((i, e))
  return rewards, sorted(failures, key=lambda f: f[0])


def combine_rewards(reward_fns, weights, prompts, completions, *, on_error: str = "raise", **columns):
  """Weighted sum of reward functions, skipping their None rewards.

  Args:
    reward_fns: functions or (name, function) pairs; a bare function is named
      by its __name__. Names must be unique.
    weights: one float per function, or None for all 1.
    prompts: N prompts (strings or chat messages).
    completions: N completions (strings or chat messages).
    on_error: "raise": a function that raises, or returns NaN / inf / a
      non-number, raises RewardError naming it and the completion. "zero":
      that completion gets 0 from that function, counted in
      `rewards/<name>/errors`. A list of the wrong length always raises.
    **columns: per-row dataset columns, passed on to every function.

  Returns:
    (rewards [N] float32, metrics). A completion that every function gave None
    is NaN (missing; TRL's nansum would make it 0). Metrics hold
    `rewards/<name>/mean` (of the unweighted rewards, NaN if all None) and,
    with on_error="zero", `rewards/<name>/errors`.
  """
  scores = score_rewards(reward_fns, prompts, completions, on_error=on_error, **columns)
  return weigh_scores(scores, weights)


@dataclasses.dataclass
class Scores:
  """Each reward function's unweighted rewards: what `score_rewards` measured.

  Scores of disjoint slices of a batch (e.g. one per host) concatenate with
  `Scores.concatenate`, and `weigh_scores` of the whole gives the batch's
  rewards and metrics.
  """
  names: list[str]
  rewards_NxF: np.ndarray  # NaN = the function gave None
  errors_F: np.ndarray  # rows set to 0 after a failure (on_error="zero")
  on_error: str = "raise"

  @staticmethod
  def concatenate(parts: Sequence["Scores"]) -> "Scores":
    return Scores(parts[0].names, np.concatenate([p.rewards_NxF for p in parts]),
                  np.sum([p.errors_F for p in parts], axis=0), parts[0].on_error)


def score_rewards(reward_fns, prompts, completions, *, on_error: str = "raise",
                  **columns) -> Scores:
  """Every function's rewards for N completions (see `combine_rewards` for the arguments)."""
  if on_error not in ("raise", "zero"):
    raise ValueError(f"on_error={on_error!r} is not supported; expected one of ['raise', 'zero'].")
  named = [(reward_fn_name(f), f) if callable(f) else tuple(f) for f in reward_fns]
  names = [name for name, _ in named]
  if not named or len(set(names)) != len(names):
    raise ValueError(f"need at least one reward function, with unique names; got {names}.")
  completions = list(completions)
  if prompts is not None and len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions.")
  per_fn, errors = [], []
  for name, fn in named:
    rewards, failures = _score(name, fn, prompts, completions, columns)
    if failures and on_error == "raise":
      i, e = failures[0]
      raise RewardError(f"reward function {name!r} failed ({type(e).__name__}: {e}) on completion {i}: "
                        f"{_short(completions[i])}") from e
    for i, e in failures:
      logging.warning("reward function %r: %s: %s on completion %d, reward set to 0.",
                      name, type(e).__name__, e, i)
      rewards[i] = 0.0
    per_fn.append(rewards)
    errors.append(len(failures))
  return Scores(names, np.stack(per_fn, axis=1), np.asarray(errors), on_error)


def weigh_scores(scores: Scores, weights) -> tuple[np.ndarray, dict]:
  """(rewards [N] float32, metrics) from `Scores`: see `combine_rewards`."""
  f = len(scores.names)
  weights = [1.0] * f if weights is None else [float(w) for w in weights]
  if len(weights) != f:
    raise ValueError(f"{len(weights)} weights for {f} reward functions {scores.names}.")
  rewards_NxF = scores.rewards_NxF
  present_NxF = ~np.isnan(rewards_NxF)
  metrics = {}
  for j, name in enumerate(scores.names):
    column = rewards_NxF[present_NxF[:, j], j]
    metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.size else math.nan
    if scores.on_error == "zero":
      metrics[f"rewards/{name}/errors"] = int(scores.errors_F[j])
  weighted = np.where(present_NxF, rewards_NxF * np.asarray(weights), 0.0).sum(axis=1)
  return np.where(present_NxF.any(axis=1), weighted, np.nan).astype(np.float32), metrics


# ----------------------------------------------------------------------------
# Jittable numeric reward on token ids.
# ----------------------------------------------------------------------------

MINUS_CODE = -2
_SPACE_MARKERS = "Ġ▁ "  # byte-level BPE, SentencePiece, plain


def digit_table(tokenizer_or_vocab, vocab_size: int | None = None) -> np.ndarray:
  """Per-token codes for `numeric_answer_reward_ids`: int32 [V].

  d (0..9) for a token that is exactly one ASCII digit; d + 10 for a space
  marker ('Ġ', '▁', ' ') then one digit (a digit that starts a new number);
  MINUS_CODE for '-' (with or without a space marker); -1 for everything else.

  Args:
    tokenizer_or_vocab: a transformers tokenizer (uses get_vocab()), a dict
      {token: id}, or a list of token strings indexed by id.
    vocab_size: pad the table to at least this many ids (the model's V).
  """
  if hasattr(tokenizer_or_vocab, "get_vocab"):
    vocab, size = tokenizer_or_vocab.get_vocab(), len(tokenizer_or_vocab)
  elif isinstance(tokenizer_or_vocab, dict):
    vocab, size = tokenizer_or_vocab, 0
  else:
    vocab = {token: i for i, token in enumerate(tokenizer_or_vocab)}
    size = len(vocab)
  table = np.full(max(size, max(vocab.values()) + 1, vocab_size or 0), -1, np.int32)
  multi_digit = 0
  for token, i in vocab.items():
    body = token.lstrip(_SPACE_MARKERS)
    if len(body) == 1 and body in "0123456789":
      table[i] = int(body) + (10 if body != token else 0)
    elif body == "-":
      table[i] = MINUS_CODE
    elif body.isascii() and body.isdigit():
      multi_digit += 1
  if not (table >= 0).any():
    raise ValueError("the vocabulary has no single-digit tokens; numeric_answer_reward_ids cannot read numbers.")
  if multi_digit:
    logging.warning("%d tokens hold several digits; numeric_answer_reward_ids reads only "
                    "numbers written one digit per token.", multi_digit)
  return table


def numeric_answer_reward_ids(completion_ids, mask, answers, table):
  """1.0 where the last number in a completion equals the answer, else 0.0; jittable.

  The number is the last run of digit tokens among the masked tokens (a
  spaced digit starts a new run), negative if a minus token directly precedes
  it; leading zeros are allowed ("007" is 7), thousands separators are not
  ("1,234" reads as 234). Digits are compared one by one, so a run of any
  length can neither overflow nor match by accident.

  Args:
    completion_ids: [N, T] int token ids.
    mask: [N, T] 1 on completion tokens.
    answers: [N] int32 ground truths.
    table: [V] int32 from `digit_table` (ids beyond it count as non-digits).

  Returns:
    [N] float32.
  """
  t = completion_ids.shape[1]
  codes_NxT = jnp.take(jnp.asarray(table), completion_ids, mode="fill", fill_value=-1)
  codes_NxT = jnp.where(mask > 0, codes_NxT, -1)
  is_digit = codes_NxT >= 0
  pos_T = jnp.arange(t)
  last_N = jnp.max(jnp.where(is_digit, pos_T, -1), axis=1)
  # The run starts after the last non-digit, or at the last spaced digit, before `last`.
  starts_NxT = jnp.where(is_digit, jnp.where(codes_NxT >= 10, pos_T, 0), pos_T + 1)
  start_N = jnp.max(jnp.where(pos_T <= last_N[:, None], starts_NxT, 0), axis=1)
  run_len_N = last_N - start_N + 1  # 0 when there is no digit

  # Digit k (units = 0) of the run and of |answer|; int32 has at most 10 digits.
  k_K = jnp.arange(max(t, 10))
  run_idx_NxK = jnp.clip(last_N[:, None] - k_K, 0, t - 1)
  run_digit_NxK = jnp.where(k_K < run_len_N[:, None],
                            jnp.take_along_axis(codes_NxT % 10, run_idx_NxK, axis=1), 0)
  answers = jnp.asarray(answers, jnp.int32)
  power_K = jnp.asarray([10**min(k, 9) for k in range(max(t, 10))], jnp.int32)
  answer_digit_NxK = jnp.where(k_K < 10, (jnp.abs(answers)[:, None] // power_K) % 10, 0)
  digits_equal = jnp.all(run_digit_NxK == answer_digit_NxK, axis=1)

  before_N = jnp.take_along_axis(codes_NxT, jnp.maximum(start_N - 1, 0)[:, None], axis=1)[:, 0]
  start_code_N = jnp.take_along_axis(codes_NxT, start_N[:, None].clip(0, t - 1), axis=1)[:, 0]
  negative = (start_N > 0) & (before_N == MINUS_CODE) & (start_code_N < 10)
  sign_ok = (negative == (answers < 0)) | (answers == 0)
  return ((run_len_N > 0) & digits_equal & sign_ok).astype(jnp.float32)
