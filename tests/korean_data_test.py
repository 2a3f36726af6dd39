"""configs/data/korean_correction.jsonl, the Korean sentence-correction task of
configs/gemma3_korean.py: every row reads, its answer follows the config's template, and the
rewards of that config give the reference answer full marks."""

import difflib
import json
import os

import pytest

from grpo_jax import config as config_lib, rewards
from grpo_jax.data import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "gemma3_korean.py")
DATA = os.path.join(ROOT, "configs", "data", "korean_correction.jsonl")


@pytest.fixture(scope="module")
def cfg():
  return config_lib.from_file(CONFIG)


@pytest.fixture(scope="module")
def rows():
  with open(DATA, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def has_final_consonant(syllable: str) -> bool:
  """A Hangul syllable's final consonant (batchim): syllables run 가 (U+AC00) to 힣 in blocks
  of 28, the first of each block without one."""
  return (ord(syllable) - 0xAC00) % 28 != 0


def test_rows_read_and_follow_the_template(cfg, rows):
  assert 250 <= len(rows) <= 400
  pattern = cfg.reward_kwargs.regex_format.pattern
  assert cfg.reward_kwargs.exact_match.pattern == pattern
  for row in rows:
    assert set(row) == {"prompt", "answer", "sentence", "corrected", "reason"}, row
    assert row["sentence"] != row["corrected"], row
    assert row["prompt"].endswith(f"문장: {row['sentence']}\n답:"), row
    assert rewards.extract_with_pattern(row["answer"], pattern, "sentence") == row["corrected"]
    assert rewards.extract_with_pattern(row["answer"], pattern, "reason") == row["reason"]
    assert "\n" not in row["answer"] and row["reason"].endswith("다."), row
    # 이 after a final consonant, else 가: of the last Hangul syllable, punctuation skipped.
    last = [ch for ch in row["corrected"] if "가" <= ch <= "힣"][-1]
    particle = "이" if has_final_consonant(last) else "가"
    assert row["answer"].startswith(f"\"{row['corrected']}\"{particle} 옳다. "), row


def test_each_row_has_one_error_and_no_near_duplicates(rows):
  sentences = [row["sentence"] for row in rows]
  assert len(set(sentences)) == len(sentences)
  assert len({row["corrected"] for row in rows}) == len(rows)
  for row in rows:  # one change: a single run of differing words (a spacing fix included)
    words = difflib.SequenceMatcher(None, row["sentence"].split(), row["corrected"].split())
    changes = [op for op in words.get_opcodes() if op[0] != "equal"]
    assert len(changes) == 1, row
  for i, a in enumerate(sentences):
    for b in sentences[i + 1:]:
      m = difflib.SequenceMatcher(None, a, b)
      assert m.real_quick_ratio() < 0.8 or m.quick_ratio() < 0.8 or m.ratio() < 0.8, (a, b)


def test_the_config_trains_on_it_and_rewards_the_reference(cfg, rows):
  config_lib.validate(cfg)
  task = TASKS[cfg.task.name](**cfg.task.kwargs.to_dict())
  assert task.eval_examples(3)[0]["answer"] in {row["answer"] for row in rows}
  named, _ = rewards.get_reward_fns(cfg.rewards, cfg.reward_kwargs)
  fns = dict(named)
  answers = [row["answer"] for row in rows]
  for name in ("regex_format", "exact_match", "rouge1"):
    assert fns[name](prompts=None, completions=answers, answer=answers) == [1.0] * len(rows)
  # The uncorrected sentence in the template: the format holds, exact match does not.
  wrong = [row["answer"].replace(row["corrected"], row["sentence"], 1) for row in rows]
  assert fns["regex_format"](prompts=None, completions=wrong) == [1.0] * len(rows)
  assert fns["exact_match"](prompts=None, completions=wrong, answer=answers) == [0.0] * len(rows)
  # Korean reasoning scores high on the Korean target; an English answer scores 0.
  korean = fns["language_consistency"](prompts=None, completions=[r["reason"] for r in rows])
  assert min(korean) > 0.5 and sum(korean) / len(korean) > 0.9
  assert fns["language_consistency"](prompts=None, completions=["It is right."]) == [0.0]


def test_the_documented_command_line_template_is_the_configs(cfg, rows):
  """The one-line Korean template of docs/config.md and docs/maths.md, read as a shell reads it
  and applied as grpo_jax.main applies it, is configs/gemma3_korean.py's pattern and accepts
  every reference answer."""
  import shlex

  from grpo_jax import config_cli

  for doc in ("config.md", "maths.md"):
    with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
      lines = [line.strip().rstrip("\\").strip() for line in f
               if line.strip().startswith("--config.reward_kwargs.")]
    assert lines, doc
    args = [arg for line in lines for arg in shlex.split(line)]
    _, own, keys = config_cli.split_overrides(["main", *args])
    assert not keys
    parsed = config_lib.defaults()
    config_cli.apply_own(parsed, own, task_renamed=False)
    pattern = parsed.reward_kwargs.regex_format.pattern
    assert pattern == cfg.reward_kwargs.regex_format.pattern, doc
    fn = rewards.reward_fn("regex_format", parsed.reward_kwargs)
    answers = [row["answer"] for row in rows]
    assert fn(prompts=None, completions=answers) == [1.0] * len(rows)
