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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random

SPLITS = ("train", "eval")
OPERATORS = "+-*"


def _hash_fraction(text: str) -> float:
  """A uniform number in [0, 1) fixed by the text alone."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _evaluate(operands: list[int], ops: list[str]) -> int:
  """Value with the usual precedence: products first, then + and - left to right."""
  total, sign, product = 0, 1, operands[0]
  for op, x in zip(ops, operands[1:]):
    if op == "*":
      product *= x
    else:
      total, sign, product = total + sign * product, (1 if op == "+" else -1), x
  return total + sign * product


class _IndexedTask:
  """train_batch / eval_examples on top of a subclass's `example(split, index)`."""

  def example(self, split: str, index: int) -> dict:
    raise NotImplementedError

  def train_batch(self, start_index: int, batch_size: int) -> list[dict]:
    return [self.example("train", i) for i in range(start_index, start_index + batch_size)]

  def eval_examples(self, num: int) -> list[dict]:
    return [self.example("eval", i) for i in range(num)]


@dataclasses.dataclass(frozen=True)
class Arithmetic(_IndexedTask):
  """Integer expressions, e.g. "What is 23 + 58 - 7?" -> "74".

  Difficulty: the number of terms, the digits of each operand (a digit count is
  drawn uniformly from [min_digits, max_digits], then the operand uniformly
  among numbers with that many digits; one digit includes 0) and the operators
  (usual precedence, so "*" binds tighter). 2 terms of 1-2 digits with "+-"
  is a level SmolLM2-135M-Instruct partly solves before training.

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
      expression = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
      if (_hash_fraction(expression) < self.eval_fraction) == (split == "eval"):
        return {"prompt": f"What is {expression}?", "answer": str(_evaluate(operands, ops)),
                "expression": expression}
    raise ValueError(f"no {split} problem found for {self}: the problem space is too small "
                     "for this eval_fraction")


class Jsonl(_IndexedTask):
  """Problems from local JSON-lines files, one {"prompt": ..., "answer": ...} per line.

  `prompt_key` / `answer_key` name other fields (GSM8K exports use "question"
  and an answer ending in "#### 72", which the accuracy rewards read). Other
  fields become extra reward columns. The eval split is `eval_path` if given,
  else the problems whose prompt hash falls below `eval_fraction`. Train
  example i is problem perm_e[i mod n] of epoch e = i // n, where perm_e is a
  seeded shuffle: deterministic by index, so resuming is exact.
  """

  def __init__(self, path: str, eval_path: str | None = None, eval_fraction: float = 0.05,
               prompt_key: str = "prompt", answer_key: str = "answer", seed: int = 0):
    import json
    import os

    if not path:
      raise ValueError("task 'jsonl' needs the path of a JSON-lines file: "
                       "--config.task.kwargs.path=FILE.jsonl")

    def read(p):
      if not os.path.isfile(p):
        raise ValueError(f"JSONL file not found: {p} (config.task.kwargs.path / eval_path)")
      rows = []
      with open(p) as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          row = json.loads(line)
          if prompt_key not in row or answer_key not in row:
            raise ValueError(f"{p}:{line_no}: needs the keys {prompt_key!r} and {answer_key!r} "
                             f"(set prompt_key / answer_key); has {sorted(row)}")
          extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
          rows.append({"prompt": str(row[prompt_key]), "answer": str(row[answer_key]), **extra})
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

  def example(self, split: str, index: int) -> dict:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rows = self._splits[split]
    n = len(rows)
    if split == "eval":
      return rows[index % n]
    epoch, i = divmod(index, n)
    return rows[self._order(epoch)[i]]

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> list[int]:
    order = list(range(len(self._splits["train"])))
    random.Random(f"jsonl/{self.seed}/{epoch}").shuffle(order)
    return order


TASKS = {
    "arithmetic": Arithmetic,
    "jsonl": Jsonl,
}


def get_task(name: str, **kwargs):
  """The task `name` built with `kwargs` (its difficulty settings and seed)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name](**kwargs)
