"""Data tests: task determinism, difficulty knobs, answers, disjoint splits, templates."""

import os
import re

import pytest

from grpo_jax import data
from grpo_jax.data import tasks


def _operands_and_ops(expression):
  tokens = expression.split(" ")
  return tokens[0::2], tokens[1::2]


def test_examples_are_a_pure_function_of_seed_split_index():
  a, b = data.get_task("arithmetic", seed=3), data.get_task("arithmetic", seed=3)
  assert a.train_batch(0, 50) == b.train_batch(0, 50)
  # Any window of the stream equals the same slice of a longer one: resuming at an index is exact.
  assert a.train_batch(17, 9) == b.train_batch(0, 30)[17:26]
  assert a.eval_examples(20) == [b.example("eval", i) for i in range(20)]
  other = data.get_task("arithmetic", seed=4).train_batch(0, 50)
  assert sum(x != y for x, y in zip(a.train_batch(0, 50), other)) > 40
  assert len({e["prompt"] for e in a.train_batch(0, 50)}) > 40  # not a constant stream


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(min_terms=3, max_terms=4, min_digits=2, max_digits=3, operators="*-"),
    dict(min_terms=2, max_terms=5, min_digits=1, max_digits=1, operators="+-*"),
])
def test_difficulty_knobs_and_answers(knobs):
  task = data.get_task("arithmetic", **knobs)
  cfg = tasks.Arithmetic(**knobs)
  seen_terms, seen_digits, seen_ops = set(), set(), set()
  for ex in task.train_batch(0, 400) + task.eval_examples(100):
    operands, ops = _operands_and_ops(ex["expression"])
    assert ex["prompt"] == f"What is {ex['expression']}?"
    assert cfg.min_terms <= len(operands) <= cfg.max_terms
    for x in operands:
      assert re.fullmatch(r"0|[1-9][0-9]*", x), x  # no leading zeros or signs
      assert cfg.min_digits <= len(x) <= cfg.max_digits
    assert set(ops) <= set(cfg.operators)
    # Independent reference: Python's own evaluation of the expression.
    assert ex["answer"] == str(eval(ex["expression"]))  # noqa: S307 (digits and + - * only)
    seen_terms.add(len(operands))
    seen_digits.update(len(x) for x in operands)
    seen_ops.update(ops)
  assert seen_terms == set(range(cfg.min_terms, cfg.max_terms + 1))
  assert seen_digits == set(range(cfg.min_digits, cfg.max_digits + 1))
  assert seen_ops == set(cfg.operators)


def test_precedence_and_negative_answers():
  assert tasks._evaluate([2, 3, 4], ["+", "*"]) == 14
  assert tasks._evaluate([2, 3, 4, 5], ["*", "-", "*"]) == -14
  assert tasks._evaluate([1, 9], ["-"]) == -8
  answers = [int(e["answer"]) for e in data.get_task("arithmetic").train_batch(0, 300)]
  assert min(answers) < 0 < max(answers)


@pytest.mark.parametrize("knobs", [
    dict(),  # 2 terms, 1-2 digits, + -: 20,000 problems, many collisions without the hash split
    dict(min_digits=1, max_digits=1, operators="+"),  # 100 problems
])
def test_train_and_eval_never_share_a_problem(knobs):
  train = {e["expression"] for seed in (0, 1) for e in
           data.get_task("arithmetic", seed=seed, **knobs).train_batch(0, 2000)}
  evals = {e["expression"] for seed in (0, 2) for e in
           data.get_task("arithmetic", seed=seed, **knobs).eval_examples(300)}
  assert train and evals and not train & evals
  # Eval is a small, fixed share of the space: train covers most of a tiny one.
  if knobs:
    assert len(train) + len(evals) <= 100 and len(train) > 5 * len(evals)


def test_unknown_names_and_bad_knobs_are_clear_errors():
  with pytest.raises(ValueError, match=r"known tasks: \['arithmetic', 'jsonl'\]"):
    data.get_task("gsm9k")
  with pytest.raises(ValueError, match="operators"):
    data.get_task("arithmetic", operators="+/")
  with pytest.raises(ValueError, match="min_digits"):
    data.get_task("arithmetic", min_digits=3, max_digits=2)
  with pytest.raises(ValueError, match="min_terms"):
    data.get_task("arithmetic", min_terms=1)
  with pytest.raises(ValueError, match="split"):
    data.get_task("arithmetic").example("test", 0)


# -- templates ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
  """SmolLM2's tokenizer alone, read from the embedded GGUF (~4 s)."""
  from transformers import AutoTokenizer

  from grpo_jax import models

  folder, name = os.path.split(models.embedded_gguf_path("smollm2-135m-instruct"))
  return AutoTokenizer.from_pretrained(folder, gguf_file=name)


EXAMPLE = {"prompt": "What is 23 + 58 - 7?", "answer": "74"}


def test_r1_zero_and_plain_templates():
  assert data.format_prompt(EXAMPLE, "r1_zero") == (
      "A conversation between User and Assistant. The user asks a question, and the Assistant "
      "solves it. The assistant first thinks about the reasoning process in the mind and then "
      "provides the user with the answer. The reasoning process and answer are enclosed within "
      "<think> </think> and <answer> </answer> tags, respectively. "
      "User: What is 23 + 58 - 7?. Assistant:")
  assert data.format_prompt(EXAMPLE, "plain") == "What is 23 + 58 - 7?"


def test_chat_template_has_system_message_and_generation_prompt(tokenizer):
  text = data.format_prompt(EXAMPLE, "chat", tokenizer)
  assert text == ("<|im_start|>system\n" + data.SYSTEM_PROMPT + "<|im_end|>\n"
                  "<|im_start|>user\nWhat is 23 + 58 - 7?<|im_end|>\n<|im_start|>assistant\n")
  assert "<think>" in data.SYSTEM_PROMPT and "<answer>" in data.SYSTEM_PROMPT


def test_unknown_template_and_chat_without_tokenizer():
  with pytest.raises(ValueError, match=r"known templates: \['r1_zero', 'chat', 'plain'\]"):
    data.format_prompt(EXAMPLE, "alpaca")
  with pytest.raises(ValueError, match="chat template"):
    data.format_prompt(EXAMPLE, "chat", None)


# -- JSONL files ---------------------------------------------------------------------
def write_jsonl(path, rows):
  import json

  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def test_jsonl_task_reads_splits_and_is_deterministic(tmp_path):
  rows = [{"question": f"What is {i} + {i}?", "answer": f"... #### {2 * i}", "id": i}
          for i in range(200)]
  path = write_jsonl(tmp_path / "train.jsonl", rows)
  task = tasks.get_task("jsonl", path=path, prompt_key="question", eval_fraction=0.1, seed=3)
  train = task.train_batch(0, 400)  # two epochs
  evals = task.eval_examples(1000)
  train_prompts = {ex["prompt"] for ex in train}
  assert train_prompts.isdisjoint({ex["prompt"] for ex in evals})
  assert len(train_prompts) + len({ex["prompt"] for ex in evals}) == 200
  # Each epoch is a permutation of the train split; epochs differ in order.
  n = len(train_prompts)
  assert {ex["prompt"] for ex in train[:n]} == train_prompts
  assert [ex["prompt"] for ex in train[:n]] != [ex["prompt"] for ex in train[n:2 * n]]
  assert train[:50] == tasks.get_task("jsonl", path=path, prompt_key="question",
                                      eval_fraction=0.1, seed=3).train_batch(0, 50)
  assert train[7]["answer"].endswith(f"#### {2 * train[7]['id']}")  # extra columns kept


def test_jsonl_task_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="not found: .*missing.jsonl"):
    tasks.get_task("jsonl", path=str(tmp_path / "missing.jsonl"))
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x", "answer": "1"}])
  with pytest.raises(ValueError, match="bad.jsonl:1: needs the keys 'prompt' and 'answer'"):
    tasks.get_task("jsonl", path=bad)
  good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "answer": "1"}])
  other = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "b", "answer": "2"}])
  task = tasks.get_task("jsonl", path=good, eval_path=other)
  assert task.eval_examples(1)[0]["prompt"] == "b" and task.train_batch(5, 1)[0]["prompt"] == "a"
