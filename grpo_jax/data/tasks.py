"""Tasks: deterministic, indexable sources of {"prompt", "answer", ...} examples.

Example i of a split is a pure function of (task settings, seed, split, i): no
state, no shuffling buffer, so a checkpoint's data position is one integer and
a resumed run sees exactly the examples an uninterrupted one would.

A task has
    example(split, index) -> dict          split in ("train", "eval")
    train_batch(start_index, batch_size)   examples start_index, start_index + 1, ...
    eval_examples(num)                     the first `num` held-out examples
Each example has "prompt" (the question, before any template) and "answer"
(the ground truth the rewards check); other keys are extra columns that reward
functions receive as keyword arguments.

Tasks: "arithmetic" and "countdown" are generated (any number of problems, no
files); "jsonl" reads local files; "gsm8k" and "math" read their datasets
through tensorflow-datasets (`pip install grpo_jax[tfds]`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random


SPLITS = ("train", "eval")
OPERATORS = "+-*/"


def _hash_fraction(text: str) -> float:
  """A uniform number in [0, 1) fixed by the text alone."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _evaluate(operands: list[int], ops: list[str]) -> int | None:
  """Value with the usual precedence: * and / first, left to right, then + and -. None when a
  division is not exact (or by 0): arithmetic problems only divide exactly."""
  total, sign, product = 0, 1, operands[0]
  for op, x in zip(ops, operands[1:]):
    if op == "*":
      product *= x
    elif op == "/":
      if x == 0 or product % x:
        return None
      product //= x
    else:
      total, sign, product = total + sign * product, (1 if op == "+" else -1), x
  return total + sign * product


def read_jsonl(path: str, check_row, error=ValueError) -> list:
  """The rows of a JSON-lines file, blank lines skipped. `check_row(row, "path:line")`
  returns what to keep of each row or raises; `error` (naming the file and line) for a
  line that is not JSON. May be empty: the caller says what an empty file means."""
  import json

  rows = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{path}:{line_no}: not a JSON object ({e})") from None
      rows.append(check_row(row, f"{path}:{line_no}"))
  return rows


@functools.lru_cache(maxsize=4)
def _permutation(num_rows: int, seed: str) -> tuple[int, ...]:
  order = list(range(num_rows))
  random.Random(seed).shuffle(order)
  return tuple(order)


def shuffled_index(index: int, num_rows: int, seed: str) -> int:
  """The row at position `index` of an endless stream over `num_rows` rows: position i is row
  perm_e[i mod n] of epoch e = i // n, perm_e a shuffle seeded by f"{seed}/{e}". A function of
  the index alone, so a resumed run reads exactly what an uninterrupted one would, and each
  epoch visits every row once."""
  epoch, i = divmod(index, num_rows)
  return _permutation(num_rows, f"{seed}/{epoch}")[i]


class _IndexedTask:
  """train_batch / eval_examples on top of a subclass's `example(split, index)`."""

  def example(self, split: str, index: int) -> dict:
    raise NotImplementedError

  def train_batch(self, start_index: int, batch_size: int) -> list[dict]:
    return [self.example("train", i) for i in range(start_index, start_index + batch_size)]

  def eval_examples(self, num: int, allow_repeats: bool = False) -> list[dict]:
    """The first `num` held-out problems; without `allow_repeats`, the first `num` distinct
    ones (by prompt): eval examples i = 0, 1, ... with any problem seen before skipped. A
    split with fewer distinct problems (a small problem space) gives all it has, found in
    the first max(2000, 50 * num) examples: `len(result) < num` then says so."""
    if allow_repeats:
      return [self.example("eval", i) for i in range(num)]
    seen, examples = set(), []
    for i in range(max(2000, 50 * num)):
      example = self.example("eval", i)
      if example["prompt"] not in seen:
        seen.add(example["prompt"])
        examples.append(example)
        if len(examples) == num:
          break
    return examples


@dataclasses.dataclass(frozen=True)
class Arithmetic(_IndexedTask):
  """Integer expressions, e.g. "What is 23 + 58 - 7?" -> "74".

  Difficulty: the number of terms, the digits of each operand (a digit count is
  drawn uniformly from [min_digits, max_digits], then the operand uniformly
  among numbers with that many digits; one digit includes 0) and the operators
  (usual precedence, so "*" and "/" bind tighter). "/" divides exactly: the
  operators are drawn first, then the operands until every division is exact
  (not by 0), so each operator keeps its share of problems and every answer is
  an integer. SmolLM2-135M-Instruct solves ~14% of 1-digit "+-" problems and
  ~5% of 1-2 digit ones before training (README).

  Splits: an expression belongs to "eval" when a hash of its text falls below
  `eval_fraction`, whatever the seed, so train and eval never share a problem,
  for any seeds and difficulty settings. Each split then draws from its own
  part of the problem space; small spaces repeat problems.
  """

  min_terms: int = 2
  max_terms: int = 2
  min_digits: int = 1
  max_digits: int = 2
  operators: str = "+-"
  eval_fraction: float = 0.1
  seed: int = 0

  def __post_init__(self):
    if not 2 <= self.min_terms <= self.max_terms:
      raise ValueError(f"need 2 <= min_terms <= max_terms; got {self.min_terms}, {self.max_terms}")
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"need 1 <= min_digits <= max_digits; got {self.min_digits}, {self.max_digits}")
    if not self.operators or set(self.operators) - set(OPERATORS):
      raise ValueError(f"operators must be a non-empty subset of {OPERATORS!r}; got {self.operators!r}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1); got {self.eval_fraction}")

  def _operand(self, rng: random.Random) -> int:
    digits = rng.randint(self.min_digits, self.max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

  def example(self, split: str, index: int) -> dict:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    # String seeds go through SHA-512: the same stream in every process and Python run.
    rng = random.Random(f"arithmetic/{self.seed}/{split}/{index}")
    for _ in range(100_000):  # rejection: eval takes ~1 / eval_fraction draws
      n = rng.randint(self.min_terms, self.max_terms)
      operands = [self._operand(rng) for _ in range(n)]
      ops = [rng.choice(self.operators) for _ in range(n - 1)]
      value = _evaluate(operands, ops)
      while value is None:  # a division that is not exact: new operands, same operators
        operands = [self._operand(rng) for _ in range(n)]
        value = _evaluate(operands, ops)
      expression = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
      if (_hash_fraction(expression) < self.eval_fraction) == (split == "eval"):
        return {"prompt": f"What is {expression}?", "answer": str(value),
                "expression": expression}
    raise ValueError(f"no {split} problem found for {self}: the problem space is too small "
                     "for this eval_fraction")


# Operator precedence in printed Countdown expressions (a bare number binds tightest).
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _join(left: tuple[int, str, int], op: str, right: tuple[int, str, int]) -> tuple[int, str, int]:
  """(value, text, precedence) of `left op right`, with only the parentheses it needs.

  The left operand needs them when it binds looser than `op`; the right one also
  when it binds as tightly and `op` is - or / (a - (b + c), a / (b * c)).
  """
  (a, a_text, a_prec), (b, b_text, b_prec) = left, right
  prec = _PRECEDENCE[op]
  if a_prec < prec:
    a_text = f"({a_text})"
  if b_prec < prec or (b_prec == prec and op in "-/"):
    b_text = f"({b_text})"
  value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
  return value, f"{a_text} {op} {b_text}", prec


@dataclasses.dataclass(frozen=True)
class Countdown(_IndexedTask):
  """The Countdown numbers game: reach a target from a few numbers with + - * /.

  E.g. "Using the numbers [7, 3, 12], write an arithmetic expression equal to 33. ..." with
  answer "7 * 3 + 12"; `countdown_reward` accepts any expression that uses the
  given numbers, each at most once, and equals the target exactly.

  Every target is reachable: the generator combines all the numbers at random
  into one expression whose intermediate values are positive integers (a - b
  only when a > b, a / b only when b > 1 divides a) and keeps it when its value
  lies in [min_target, max_target] and is not itself one of the numbers (that
  problem would be solved without any arithmetic). That expression is the
  example's "answer"; other solutions usually exist and score the same.

  Difficulty: how many numbers (uniform in [min_numbers, max_numbers]), their
  size (uniform in [1, max_number]) and the target range.

  Splits: a problem (its numbers as a multiset, and its target) belongs to
  "eval" when a hash of it falls below `eval_fraction`, whatever the seed and
  the order the numbers are listed in: train and eval never share a problem.
  """

  min_numbers: int = 3
  max_numbers: int = 4
  max_number: int = 20
  min_target: int = 1
  max_target: int = 100
  eval_fraction: float = 0.1
  seed: int = 0

  default_reward = "countdown"  # not a field: what evaluate.py scores this task with

  def __post_init__(self):
    if not 2 <= self.min_numbers <= self.max_numbers:
      raise ValueError(f"need 2 <= min_numbers <= max_numbers; got {self.min_numbers}, "
                       f"{self.max_numbers}")
    if self.max_number < 1:
      raise ValueError(f"max_number must be >= 1; got {self.max_number}")
    if not 1 <= self.min_target <= self.max_target:
      raise ValueError(f"need 1 <= min_target <= max_target; got {self.min_target}, "
                       f"{self.max_target}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1); got {self.eval_fraction}")

  @staticmethod
  def _random_expression(numbers: list[int], rng: random.Random) -> tuple[int, str, int]:
    """Joins two random terms with a random allowed operator until one term is left."""
    terms = [(x, str(x), _ATOM) for x in numbers]
    while len(terms) > 1:
      i, j = rng.sample(range(len(terms)), 2)
      (a, *_), (b, *_) = terms[i], terms[j]
      ops = "+*" + ("-" if a > b else "") + ("/" if b > 1 and a % b == 0 else "")
      joined = _join(terms[i], rng.choice(ops), terms[j])
      terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [joined]
    return terms[0]

  def example(self, split: str, index: int) -> dict:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"countdown/{self.seed}/{split}/{index}")
    for _ in range(100_000):  # rejection: targets out of range, and ~1 / eval_fraction for eval
      numbers = [rng.randint(1, self.max_number)
                 for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
      target, expression, _ = self._random_expression(numbers, rng)
      if not self.min_target <= target <= self.max_target or target in numbers:
        continue
      problem = f"{sorted(numbers)} -> {target}"
      if (_hash_fraction(problem) < self.eval_fraction) == (split == "eval"):
        prompt = (f"Using the numbers {numbers}, write an arithmetic expression equal to "
                  f"{target}. You may use +, -, *, / and parentheses, and each number at most "
                  "once.")
        return {"prompt": prompt, "answer": expression, "numbers": numbers, "target": target}
    raise ValueError(f"no {split} problem found for {self}: widen the target range or the "
                     "numbers' range, or change eval_fraction")


class _RowsTask(_IndexedTask):
  """Examples held in memory, one list per split (`self._splits`).

  Eval example i is row i mod n, in the source's order; train example i is
  `shuffled_index(i, n, f"{_shuffle_name}/{seed}")`: deterministic by index, so
  resuming is exact, and each epoch visits every train row once.
  """

  _shuffle_name = "rows"
  _splits: dict[str, list[dict]]
  seed: int

  def example(self, split: str, index: int) -> dict:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rows = self._splits[split]
    if split == "eval":
      return rows[index % len(rows)]
    return rows[shuffled_index(index, len(rows), f"{self._shuffle_name}/{self.seed}")]


class Jsonl(_RowsTask):
  """Problems from local JSON-lines files, one {"prompt": ..., "answer": ...} per line.

  `prompt_key` / `answer_key` name other fields (GSM8K exports use "question"
  and an answer ending in "#### 72", which the accuracy rewards read). Other
  fields become extra reward columns. The eval split is `eval_path` if given,
  else the problems whose prompt hash falls below `eval_fraction`. Train
  example i is problem perm_e[i mod n] of epoch e = i // n, where perm_e is a
  seeded shuffle: deterministic by index, so resuming is exact.
  """

  _shuffle_name = "jsonl"  # the seed string of earlier runs: their resumes stay exact

  # path defaults to "" only so that leaving it out gets the message below, not a TypeError.
  def __init__(self, path: str = "", eval_path: str | None = None, eval_fraction: float = 0.05,
               prompt_key: str = "prompt", answer_key: str = "answer", seed: int = 0):
    import os

    if not path:
      raise ValueError("task 'jsonl' needs the path of a JSON-lines file: in training "
                       "--config.task.kwargs.path=FILE.jsonl, in evaluate and rejection "
                       "--task_kwargs='{\"path\": \"FILE.jsonl\"}'")

    def check(row, where):
      if prompt_key not in row or answer_key not in row:
        raise ValueError(f"{where}: needs the keys {prompt_key!r} and {answer_key!r} "
                         f"(set prompt_key / answer_key); has {sorted(row)}")
      extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
      return {"prompt": str(row[prompt_key]), "answer": str(row[answer_key]), **extra}

    def read(p):
      if not os.path.isfile(p):
        raise ValueError(f"JSONL file not found: {p} (config.task.kwargs.path / eval_path)")
      rows = read_jsonl(p, check)
      if not rows:
        raise ValueError(f"{p} holds no examples")
      return rows

    rows = read(path)
    if eval_path:
      self._splits = {"train": rows, "eval": read(eval_path)}
    else:
      is_eval = [_hash_fraction(r["prompt"]) < eval_fraction for r in rows]
      self._splits = {"train": [r for r, e in zip(rows, is_eval) if not e],
                      "eval": [r for r, e in zip(rows, is_eval) if e]}
      if not self._splits["eval"] or not self._splits["train"]:
        raise ValueError(f"eval_fraction={eval_fraction} leaves an empty split of {len(rows)} "
                         "examples; give eval_path or change eval_fraction")
    self.seed = seed


def _tfds_tasks():
  # Their module is imported here, after this one is complete: it builds on _RowsTask.
  from grpo_jax.data import tfds_tasks

  return {"gsm8k": tfds_tasks.Gsm8k, "math": tfds_tasks.Math}


TASKS = {
    "arithmetic": Arithmetic,
    "countdown": Countdown,
    "jsonl": Jsonl,
    **_tfds_tasks(),
}


def get_task(name: str, **kwargs):
  """The task `name` built with `kwargs` (its difficulty settings and seed)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name](**kwargs)
