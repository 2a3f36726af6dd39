"""Countdown: an arithmetic expression over given numbers that must hit a target.

Answers are parsed with `ast` and evaluated on Fractions by a hand-written
walk (never eval), so hostile completions cannot run code.
"""

from __future__ import annotations

import ast
import collections
import fractions
import re

from grpo_jax.rewards.parse import completion_text, final_answer

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
