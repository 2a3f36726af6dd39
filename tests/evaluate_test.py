"""Evaluation metrics on fake outputs with known answers."""

import itertools

import numpy as np
import pytest

from grpo_jax import evaluate

EXAMPLES = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]


def answers(texts_per_problem):
  return [[f"<answer>{t}</answer>" for t in texts] for texts in texts_per_problem]


def test_always_right():
  m = evaluate.score(EXAMPLES, answers([[ex["answer"]] * 4 for ex in EXAMPLES]))
  assert m["eval/accuracy"] == m["eval/maj@4"] == m["eval/pass@4"] == 1.0


def test_always_wrong():
  m = evaluate.score(EXAMPLES, answers([["-1"] * 4 for _ in EXAMPLES]))
  assert m["eval/accuracy"] == m["eval/maj@4"] == m["eval/pass@4"] == 0.0


def test_right_one_time_in_k():
  k = 4
  outs = [[ex["answer"]] + [str(100 + j) for j in range(k - 1)] for ex in EXAMPLES]
  m = evaluate.score(EXAMPLES, answers(outs))
  assert m["eval/accuracy"] == pytest.approx(1 / k)
  assert m["eval/pass@4"] == 1.0
  # Four different answers: the vote's tie goes to the first seen, here the right one.
  assert m["eval/maj@4"] == 1.0
  # With the wrong answer repeated, the majority is wrong.
  outs = [[ex["answer"], "7", "7", "9"] for ex in EXAMPLES]
  assert evaluate.score(EXAMPLES, answers(outs))["eval/maj@4"] == 0.0


def test_majority_right_though_not_all():
  outs = [[ex["answer"], ex["answer"], "0", "no answer"] for ex in EXAMPLES]
  m = evaluate.score(EXAMPLES, answers(outs))
  assert m["eval/maj@4"] == 1.0 and m["eval/accuracy"] == 0.5


@pytest.mark.parametrize("n,c,k", [(4, 1, 1), (10, 3, 2), (8, 0, 3), (6, 6, 2), (5, 2, 5)])
def test_pass_at_k_matches_enumeration(n, c, k):
  """Unbiased estimator == the fraction of k-subsets of the n samples holding a right one."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  brute = np.mean([any(samples[i] for i in s) for s in subsets])
  assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute)
