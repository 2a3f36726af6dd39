"""Rejection sampling: known samples through the filters; one end-to-end run of the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from grpo_jax import rejection
from grpo_jax.models import tiny

MAX_NEW = 20
EXAMPLES = [
    {"prompt": "What is 3 + 4?", "answer": "7", "expression": "3 + 4"},
    {"prompt": "What is 5 - 2?", "answer": "3", "expression": "5 - 2"},
    {"prompt": "Name a colour.", "answer": "blue", "expression": ""},  # not a number: unverifiable
]
GOOD = "<think>3 plus 4</think><answer>7</answer>"
SHORT = "<think>add</think><answer>7</answer>"
# (text, length in tokens) per problem; what the checks say about each sample.
SAMPLES = [
    [(GOOD, 10),                                                 # kept (the first survivor)
     ("<answer>8</answer>", 4),                                  # incorrect (and unformatted)
     ("The answer is 7", 5),                                     # format (right, leniently)
     ("<think>3 plus 4 等于</think><answer>7</answer>", 9),       # language
     (GOOD, 10),                                                 # duplicate
     ("<think>3 plus 4 is seven, so</think><answer>7</answer>", MAX_NEW),  # truncated
     (SHORT, 6)],                                                # surplus (second survivor)
    [("<answer>2</answer>", 4),                                  # incorrect (and unformatted)
     ("<think>five minus two</think><answer>3</answer>", 12)]    # kept
    + [("<think>hmm</think><answer>4</answer>", 7)] * 5,         # incorrect (not duplicate)
    [("<think>sky</think><answer>blue</answer>", 8)] * 7,        # unverifiable
]


class FakeSampler:
  """`evaluate.sample_texts`' signature; the known samples of each problem, whatever the key."""

  def __init__(self, samples=SAMPLES):
    self.samples = samples
    self.calls = []

  def __call__(self, graphdef, params, tokenizer, prompts, *, num_samples, max_new_tokens,
               temperature, key, stop_ids, prompts_per_batch=16, prompt_length=None, top_p=1.0,
               top_k=0, stop_strings=()):
    del graphdef, params, tokenizer, temperature, key, top_p, top_k
    self.calls.append(dict(prompts=list(prompts), prompt_length=prompt_length,
                           prompts_per_batch=prompts_per_batch, max_new_tokens=max_new_tokens,
                           stop_ids=stop_ids, stop_strings=stop_strings))
    texts, lengths = [], []
    for prompt in prompts:
      (i,) = [i for i, ex in enumerate(EXAMPLES) if ex["prompt"] in prompt]
      assert len(self.samples[i]) == num_samples
      texts.append([t for t, _ in self.samples[i]])
      lengths.append([n for _, n in self.samples[i]])
    return texts, np.asarray(lengths)


def run(**kw):
  settings = dict(template="chat", num_samples=7, max_new_tokens=MAX_NEW, require_format=True,
                  prompts_per_batch=2, progress=False)
  settings.update(kw)
  sampler = FakeSampler()
  rows, stats = rejection.rejection_sample(None, None, tiny.tokenizer(), EXAMPLES, sampler=sampler,
                                           **settings)
  return rows, stats, sampler


def test_known_samples_give_the_expected_rows_and_stats():
  rows, stats, sampler = run()
  assert rows == [
      {"prompt": "What is 3 + 4?", "completion": GOOD, "answer": "7", "expression": "3 + 4"},
      {"prompt": "What is 5 - 2?", "completion": SAMPLES[1][1][0], "answer": "3",
       "expression": "5 - 2"}]
  assert stats == {
      "problems": 3, "samples": 21, "kept": 2, "acceptance_rate": 2 / 21,
      "problems_with_kept": 2, "problems_with_kept_fraction": 2 / 3,
      "mean_kept_length_tokens": 11.0,
      "mean_kept_length_chars": (len(GOOD) + len(SAMPLES[1][1][0])) / 2,
      "rejected": {"truncated": 1, "unverifiable": 7, "incorrect": 7, "format": 1, "language": 1,
                   "duplicate": 1, "surplus": 1},
      "failed": {"truncated": 1, "unverifiable": 7, "incorrect": 7, "format": 3, "language": 1}}
  assert stats["kept"] + sum(stats["rejected"].values()) == stats["samples"]
  # The model saw templated prompts, in batches of prompts_per_batch at one prompt length; the
  # rows hold the raw question (the SFT stage applies its own template).
  assert [len(c["prompts"]) for c in sampler.calls] == [2, 1]
  assert all(p.startswith("<|system|>") and p.endswith("<|assistant|>")
             for c in sampler.calls for p in c["prompts"])
  assert len({c["prompt_length"] for c in sampler.calls}) == 1
  assert all(c["stop_ids"] == (tiny.tokenizer().eos_token_id,) and c["stop_strings"] == ()
             for c in sampler.calls)


def test_stop_strings_reach_the_sampler_as_strings_and_stop_tokens():
  _, _, sampler = run(stop_strings=("\n",))
  newline = tiny.tokenizer().convert_tokens_to_ids("\n")
  assert all(c["stop_strings"] == ("\n",) and newline in c["stop_ids"] for c in sampler.calls)


def test_shortest_first_and_several_per_problem():
  rows, stats, _ = run(prefer="shortest", keep_per_problem=2)
  assert [r["completion"] for r in rows] == [SHORT, GOOD, SAMPLES[1][1][0]]
  assert stats["rejected"]["surplus"] == 0 and stats["kept"] == 3
  rows, _, _ = run(prefer="first", keep_per_problem=2)
  assert [r["completion"] for r in rows] == [GOOD, SHORT, SAMPLES[1][1][0]]


def test_filters_that_can_be_turned_off():
  # Without the format filter, the right but untagged answer survives (third, after GOOD, SHORT).
  rows, stats, _ = run(require_format=False, keep_per_problem=7)
  assert [r["completion"] for r in rows[:3]] == [GOOD, "The answer is 7", SHORT]
  assert stats["rejected"]["format"] == 0 and stats["failed"]["format"] == 0
  # Without correctness and language checks, only truncated and duplicate samples go.
  rows, stats, _ = run(require_format=False, reward=None, min_language_share=0, keep_per_problem=7)
  assert stats["rejected"] == {"truncated": 1, "unverifiable": 0, "incorrect": 0, "format": 0,
                               "language": 0, "duplicate": 1 + 4 + 6, "surplus": 0}
  assert stats["kept"] == 21 - 12 and stats["problems_with_kept"] == 3


def test_lenient_format_and_bad_settings():
  _, stats, _ = run(format_reward="format_lenient")
  assert stats["rejected"]["format"] == 1  # "The answer is 7" has no tags at all
  with pytest.raises(ValueError, match="unknown reward"):
    run(reward="no_such_reward")
  with pytest.raises(ValueError, match="prefer"):
    run(prefer="longest")


def test_stats_path():
  assert rejection.stats_path("out/rs.jsonl") == "out/rs.stats.json"
  assert rejection.stats_path("out/rs") == "out/rs.stats.json"


def test_cli_end_to_end_on_tiny_random(tmp_path):
  output = tmp_path / "rs.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.rejection", "--model=tiny-random", "--task=arithmetic",
       "--num_problems=4", "--num_samples=2", "--max_new_tokens=8", f"--output={output}"],
      capture_output=True, text=True, env=env, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  stats = json.loads(proc.stdout)
  with open(rejection.stats_path(str(output))) as f:
    assert json.load(f) == stats
  with open(output) as f:
    rows = [json.loads(line) for line in f]
  assert stats["problems"] == 4 and stats["samples"] == 8
  assert stats["kept"] == len(rows)
  assert stats["kept"] + sum(stats["rejected"].values()) == stats["samples"]
  assert stats["problems_with_kept"] == len({r["prompt"] for r in rows}) <= stats["kept"]
  assert all(set(r) >= {"prompt", "completion", "answer", "expression"}
             and r["prompt"].startswith("What is ") for r in rows)
  assert stats["settings"]["model"] == "tiny-random" and stats["settings"]["max_new_tokens"] == 8


def test_written_files_hold_the_rows_and_stats(tmp_path):
  rows, stats, _ = run(keep_per_problem=2)
  output = str(tmp_path / "sub" / "rs.jsonl")
  rejection.write_dataset(rows, stats, output)
  with open(output) as f:
    assert [json.loads(line) for line in f] == rows
  with open(tmp_path / "sub" / "rs.stats.json") as f:
    assert json.load(f) == stats
  assert sorted(os.listdir(tmp_path / "sub")) == ["rs.jsonl", "rs.stats.json"]  # no temporaries


def test_a_reward_with_bound_keywords_decides_what_is_right():
  from grpo_jax import cli

  # exact_match through a pattern: the <answer> of R1-formatted samples only
  reward = cli.reward_with_kwargs("exact_match", {
      "pattern": r"<think>.+</think><answer>(?P<a>.+)</answer>", "answer_group": "a"})
  texts = [["<think>x</think><answer>7</answer>", "<answer>7</answer>", "The answer is 7"]]
  right = rejection._scores(reward, ["What is 3 + 4?"] * 3, texts[0], {"answer": ["7"] * 3})
  assert right.tolist() == [1.0, 0.0, 0.0]
  assert rejection._scores("accuracy_lenient", ["q"] * 3, texts[0],
                           {"answer": ["7"] * 3}).tolist() == [1.0, 1.0, 1.0]
