"""Data tests: task determinism, difficulty knobs, answers, disjoint splits, templates."""

import functools
import os
import re
import sys
import types
from fractions import Fraction

import pytest

from grpo_jax import data
from grpo_jax.data import tasks, tfds_tasks


def _operands_and_ops(expression):
  tokens = expression.split(" ")
  return tokens[0::2], tokens[1::2]


def test_examples_are_a_pure_function_of_seed_split_index():
  a, b = data.get_task("arithmetic", seed=3), data.get_task("arithmetic", seed=3)
  assert a.train_batch(0, 50) == b.train_batch(0, 50)
  # Any window of the stream equals the same slice of a longer one: resuming at an index is exact.
  assert a.train_batch(17, 9) == b.train_batch(0, 30)[17:26]
  assert a.eval_examples(20, allow_repeats=True) == [b.example("eval", i) for i in range(20)]
  other = data.get_task("arithmetic", seed=4).train_batch(0, 50)
  assert sum(x != y for x, y in zip(a.train_batch(0, 50), other)) > 40
  assert len({e["prompt"] for e in a.train_batch(0, 50)}) > 40  # not a constant stream


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(min_terms=3, max_terms=4, min_digits=2, max_digits=3, operators="*-"),
    dict(min_terms=2, max_terms=5, min_digits=1, max_digits=1, operators="+-*"),
    dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators="+-*/"),
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
    # Independent reference: Python's own evaluation of the expression, in exact fractions.
    exact = eval(re.sub(r"(\d+)", r"F(\1)", ex["expression"]), {"F": Fraction})  # noqa: S307
    assert exact.denominator == 1 and ex["answer"] == str(exact.numerator)
    seen_terms.add(len(operands))
    seen_digits.update(len(x) for x in operands)
    seen_ops.update(ops)
  assert seen_terms == set(range(cfg.min_terms, cfg.max_terms + 1))
  assert seen_digits == set(range(cfg.min_digits, cfg.max_digits + 1))
  assert seen_ops == set(cfg.operators)


def test_division_is_exact_and_keeps_its_share_of_problems():
  task = data.get_task("arithmetic", min_digits=2, max_digits=2, operators="+-*/")
  ops = [_operands_and_ops(e["expression"])[1][0] for e in task.train_batch(0, 800)]
  assert 0.18 < ops.count("/") / len(ops) < 0.32  # drawn first: a quarter, not rejected away
  for e in task.train_batch(0, 200):
    (a, b), (op,) = _operands_and_ops(e["expression"])
    if op == "/":
      assert int(b) != 0 and int(a) % int(b) == 0 and int(e["answer"]) == int(a) // int(b)
  assert tasks._evaluate([7, 2], ["/"]) is None and tasks._evaluate([7, 0], ["/"]) is None
  assert tasks._evaluate([1, 8, 4, 3], ["+", "/", "*"]) == 7  # 1 + (8 / 4) * 3


def test_eval_examples_are_distinct_unless_repeats_are_asked_for():
  big = data.get_task("arithmetic", min_digits=2, max_digits=2, operators="+-*/")
  assert len({e["prompt"] for e in big.eval_examples(500)}) == 500
  small = data.get_task("arithmetic", min_digits=1, max_digits=1, operators="+-")  # 200 in all
  distinct = small.eval_examples(48)
  assert len(distinct) == len({e["prompt"] for e in distinct}) < 48  # all it has, once each
  repeated = small.eval_examples(48, allow_repeats=True)
  assert len(repeated) == 48 and {e["prompt"] for e in repeated} <= {e["prompt"] for e in distinct}
  # The distinct problems come in the order the split lists them: a prefix stays a prefix.
  assert big.eval_examples(20) == big.eval_examples(500)[:20]
  countdown = data.get_task("countdown")
  assert len({e["prompt"] for e in countdown.eval_examples(500)}) == 500


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
  with pytest.raises(ValueError, match=r"known tasks: \['arithmetic', 'countdown', 'gsm8k', "
                     r"'jsonl', 'math'\]"):
    data.get_task("gsm9k")
  with pytest.raises(ValueError, match="operators"):
    data.get_task("arithmetic", operators="+^")
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


def test_stop_strings_add_every_token_that_holds_them_and_cut_the_text():
  from grpo_jax.data import templates
  from grpo_jax.models import tiny

  tok = tiny.tokenizer()
  newline, period = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids(".")
  plain = templates.stop_ids(tok)
  assert plain == (tok.eos_token_id,) and newline not in plain
  assert templates.stop_ids(tok, ("\n", ".")) == tuple(sorted({*plain, newline, period}))
  # The tag "</answer>" is one token of this tokenizer: "</answer>" and "answer" find it, and
  # "swe" finds it too (inside), with no character token.
  tag = tok.convert_tokens_to_ids("</answer>")
  assert templates.tokens_containing(tok, ["</answer>"]) == [tag]
  assert templates.tokens_containing(tok, ["swe"]) == [tok.convert_tokens_to_ids("<answer>"),
                                                        tag]
  with pytest.raises(ValueError, match="'ab': no token of this tokenizer contains it"):
    templates.stop_ids(tok, ("ab",))  # only ever two tokens here: it could never stop
  assert templates.cut_at_stop("답: 네\n답: 아니오", ("\n",)) == "답: 네"
  assert templates.cut_at_stop("a. b\nc", ("\n", ".")) == "a"  # the first of any of them
  assert templates.cut_at_stop("no stop here", ("\n",)) == "no stop here"
  assert templates.cut_at_stop("a\nb", ()) == "a\nb"


def test_stop_strings_find_the_line_breaks_of_a_real_vocabulary(tokenizer):
  """SmolLM2's byte-level BPE: "\n" lies in 129 tokens ("\n\n", " \n", "\n   " ...); each of
  them is a stop token, and no token without a line break is."""
  from grpo_jax.data import templates

  ids = set(templates.stop_ids(tokenizer, ("\n",))) - set(templates.stop_ids(tokenizer))
  for text in ("\n", "\n\n", " \n", "\n    "):
    (token,) = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert token in ids, text
  assert all("\n" in tokenizer.decode([i]) for i in ids) and len(ids) == 129
  for word in ("Hello", " world", "."):
    assert not set(tokenizer(word, add_special_tokens=False)["input_ids"]) & ids


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


# -- Countdown ---------------------------------------------------------------------
def _countdown_scores(examples):
  from grpo_jax import rewards

  return rewards.countdown_reward(
      prompts=[e["prompt"] for e in examples], completions=[e["answer"] for e in examples],
      numbers=[e["numbers"] for e in examples], target=[e["target"] for e in examples])


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(min_numbers=2, max_numbers=2, max_number=9, min_target=1, max_target=30),
    dict(min_numbers=4, max_numbers=5, max_number=50, min_target=100, max_target=999),
])
def test_countdown_answers_reach_their_targets(knobs):
  task = data.get_task("countdown", **knobs)
  cfg = tasks.Countdown(**knobs)
  examples = task.train_batch(0, 200) + task.eval_examples(200, allow_repeats=True)
  assert _countdown_scores(examples) == [1.0] * 400
  seen_counts, seen_ops = set(), set()
  for ex in examples:
    assert set(ex) == {"prompt", "answer", "numbers", "target"}
    assert cfg.min_numbers <= len(ex["numbers"]) <= cfg.max_numbers
    assert all(1 <= x <= cfg.max_number for x in ex["numbers"])
    assert cfg.min_target <= ex["target"] <= cfg.max_target and ex["target"] not in ex["numbers"]
    assert str(ex["numbers"]) in ex["prompt"] and str(ex["target"]) in ex["prompt"]
    # Independent reference: Python's own arithmetic (digits, + - * / and parentheses only).
    assert eval(ex["answer"]) == ex["target"]  # noqa: S307
    assert sorted(int(x) for x in re.findall(r"\d+", ex["answer"])) == sorted(ex["numbers"])
    seen_counts.add(len(ex["numbers"]))
    seen_ops.update(re.findall(r"[-+*/]", ex["answer"]))
  assert seen_counts == set(range(cfg.min_numbers, cfg.max_numbers + 1))
  assert seen_ops == set("+-*/")


def test_countdown_is_a_pure_function_of_seed_split_index():
  a, b = data.get_task("countdown", seed=5), data.get_task("countdown", seed=5)
  assert a.train_batch(0, 40) == b.train_batch(0, 40)
  assert a.train_batch(11, 7) == b.train_batch(0, 20)[11:18]
  assert a.eval_examples(20, allow_repeats=True) == [b.example("eval", i) for i in range(20)]
  other = data.get_task("countdown", seed=6).train_batch(0, 40)
  assert sum(x != y for x, y in zip(a.train_batch(0, 40), other)) > 30


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(min_numbers=2, max_numbers=2, max_number=6, min_target=7, max_target=36),  # tiny space
])
def test_countdown_train_and_eval_never_share_a_problem(knobs):
  def problems(examples):
    return {(tuple(sorted(e["numbers"])), e["target"]) for e in examples}

  train = problems(e for seed in (0, 1) for e in
                   data.get_task("countdown", seed=seed, **knobs).train_batch(0, 1000))
  evals = problems(e for seed in (0, 2) for e in
                   data.get_task("countdown", seed=seed, **knobs).eval_examples(200))
  assert train and evals and not train & evals


def test_countdown_bad_knobs_are_clear_errors():
  with pytest.raises(ValueError, match="min_numbers"):
    data.get_task("countdown", min_numbers=1)
  with pytest.raises(ValueError, match="min_target"):
    data.get_task("countdown", min_target=50, max_target=10)
  with pytest.raises(ValueError, match="max_number"):
    data.get_task("countdown", max_number=0)
  with pytest.raises(ValueError, match="no train problem"):  # 1 op 1 never reaches 50..60
    data.get_task("countdown", min_numbers=2, max_numbers=2, max_number=1, min_target=50,
                  max_target=60).example("train", 0)


# -- GSM8K and MATH through tensorflow-datasets ---------------------------------------
@pytest.fixture
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def _gsm8k_record(split, i):
  value = 1000 + 37 * i
  solution = f"{split} step {i}: 1000 + 37 * {i} = <<1000+37*{i}={value}>>{value}\n#### {value:,}"
  return {"question": f"{split} question {i}: what is 1000 + 37 * {i}?".encode(),
          "answer": solution.encode(), "annotation": b"", "short_answer": f"{value:,}".encode()}


GSM8K_RECORDS = {split: [_gsm8k_record(split, i) for i in range(n)]
                 for split, n in (("train", 30), ("test", 8))}


def _gsm8k(tfds, **kwargs):
  """The gsm8k task on GSM8K-shaped records: tfds's real Gsm8k builder, its data source mocked."""

  def as_data_source(builder, split, **unused):
    assert builder.name == "gsm8k"
    return GSM8K_RECORDS[split]

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    return data.get_task("gsm8k", **kwargs)


def test_gsm8k_task_maps_fields_and_splits(tfds):
  task = _gsm8k(tfds, seed=1)
  train, evals = task.train_batch(0, 60), task.eval_examples(8)  # two epochs of train
  for ex in train + evals:
    assert set(ex) == {"prompt", "answer", "solution"}
    i = int(re.search(r"question (\d+)", ex["prompt"]).group(1))
    assert ex["answer"] == str(1000 + 37 * i)  # after "####", thousands comma dropped
    assert ex["solution"].endswith(f"#### {1000 + 37 * i:,}")
  # Train comes from the train split, eval from the test split, in its stored order.
  assert {e["prompt"] for e in train} == {r["question"].decode() for r in GSM8K_RECORDS["train"]}
  assert [e["prompt"] for e in evals] == [r["question"].decode() for r in GSM8K_RECORDS["test"]]
  # Each epoch is a new permutation of the train split.
  assert [e["prompt"] for e in train[:30]] != [e["prompt"] for e in train[30:]]
  assert task.default_reward == "accuracy"


def test_gsm8k_task_is_deterministic_by_index(tfds):
  task, again = _gsm8k(tfds, seed=1), _gsm8k(tfds, seed=1)
  assert task.train_batch(0, 45) == again.train_batch(0, 45)
  assert task.train_batch(37, 5) == again.train_batch(0, 42)[37:]  # resume mid-epoch
  assert task.example("eval", 3) == again.example("eval", 11)  # eval wraps around
  assert task.train_batch(0, 30) != _gsm8k(tfds, seed=2).train_batch(0, 30)


def test_gsm8k_task_reads_the_builders_real_features(tfds):
  # tfds's random mock data follows the Gsm8k builder's own feature spec: the
  # field names the task reads are the ones tfds serves.
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    task = data.get_task("gsm8k")
  for ex in task.train_batch(0, 5) + task.eval_examples(5):
    assert set(ex) == {"prompt", "answer", "solution"}
    assert all(isinstance(v, str) and v for v in ex.values())


MATH_RECORDS = {
    "train": [dict(problem=f"Train problem {i}: what is $\\frac{{{i}}}{{2}}$ doubled?",
                   solution=f"Doubling gives $\\boxed{{{i}}}$.", level=f"Level {1 + i % 5}",
                   type="Prealgebra") for i in range(10)]
             + [dict(problem="Train problem without a boxed answer", solution="It is 3.",
                     level="Level 1", type="Algebra")],
    "test": [dict(problem=f"Test problem {i}", level="Level 5", type="Geometry",
                  solution=f"First \\boxed{{0}}, then finally $\\boxed{{\\frac{{{i}}}{{3}}}}$.")
             for i in range(4)],
}


@functools.cache
def _math_fixture_builder():
  """A tfds builder with MATH's fields and a few records; built for real, nothing downloaded."""
  import tensorflow_datasets as tfds

  class MathFixture(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
          {key: tfds.features.Text() for key in ("problem", "level", "type", "solution")}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in MATH_RECORDS}

    def _generate_examples(self, split):
      for i, record in enumerate(MATH_RECORDS[split]):
        yield i, record

  return MathFixture


def test_math_task_reads_a_prepared_tfds_dataset(tfds, tmp_path):
  _math_fixture_builder()
  task = data.get_task("math", tfds_name="math_fixture", data_dir=str(tmp_path), seed=3)
  train, evals = task.train_batch(0, 20), task.eval_examples(4)
  # Two epochs of the 10 train records with a \boxed{} answer: the 11th is skipped.
  assert {e["prompt"] for e in train} == {r["problem"] for r in MATH_RECORDS["train"][:10]}
  assert {e["prompt"] for e in evals} == {r["problem"] for r in MATH_RECORDS["test"]}
  for ex in train:
    i = int(re.search(r"problem (\d+)", ex["prompt"]).group(1))
    assert ex["answer"] == str(i) and ex["type"] == "Prealgebra"
    assert ex["level"] == f"Level {1 + i % 5}" and "\\boxed" in ex["solution"]
  for ex in evals:
    i = int(re.search(r"problem (\d+)", ex["prompt"]).group(1))
    assert ex["answer"] == f"\\frac{{{i}}}{{3}}"  # the last \boxed{}, nested braces intact
  # The same index gives the same example, from a second task reading the prepared files.
  again = data.get_task("math", tfds_name="math_fixture", data_dir=str(tmp_path), seed=3)
  assert again.train_batch(0, 25) == task.train_batch(0, 25)
  assert again.eval_examples(4) == evals
  assert task.default_reward == "math_accuracy"


def test_math_task_defaults_to_hugging_face_through_tfds(tfds, tmp_path, monkeypatch):
  calls = []

  def fake_hf_builder(**kwargs):  # stands in for the Hub: returns the local fixture
    calls.append(kwargs)
    return _math_fixture_builder()(data_dir=kwargs["data_dir"], file_format=kwargs["file_format"])

  monkeypatch.setattr(tfds.dataset_builders, "HuggingfaceDatasetBuilder", fake_hf_builder)
  monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
  task = data.get_task("math", data_dir=str(tmp_path))
  assert calls == [dict(hf_repo_id=tfds_tasks.MATH_HF_REPO, hf_config=None, data_dir=str(tmp_path),
                        file_format="array_record")]
  assert len({e["prompt"] for e in task.train_batch(0, 10)}) == 10
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
  with pytest.raises(ImportError, match="pip install datasets"):
    data.get_task("math", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_tfds_tasks_without_tfds_say_how_to_install_it(name, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` now fails
  with pytest.raises(ImportError, match=rf"task '{name}'.*pip install 'grpo_jax\[tfds\]'"):
    data.get_task(name)
