"""Reading completions: their text, the answer they commit to, and its value.

A completion is a string or TRL's conversational form
[{"role": "assistant", "content": "..."}]; `completion_text` flattens both.
"""

from __future__ import annotations

import fractions
import re

TAGS = ("<think>", "</think>", "<answer>", "</answer>")

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
