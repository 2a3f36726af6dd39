"""grpo_jax.main's command line of a config (grpo_jax/config_cli.py), as the user meets it:
one-line errors at parse time, every key settable from flags (rewards and any task setting
included), --print_config, and a jsonl task with flag-given rewards trained end to end."""

import json
import os
import re

import pytest

from grpo_jax import config as config_lib
from tests.train_test import REPO, TINY, run_cli, subprocess_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return subprocess_env(str(tmp_path_factory.mktemp("compile_cache")))


@pytest.mark.parametrize("flag, message", [
    ("--config.train.stepz=3", "unknown config key config.train.stepz; did you mean "
     "config.train.steps?"),
    ("--config.nonexistent.key=3", "unknown config key config.nonexistent.key; --print_config "
     "lists every key"),
    ("--config.train.steps=abc", "flag --config.train.steps=abc: invalid literal for int()"),
    ("--config.task.kwargs.max_digitz=2", "config.task.kwargs.max_digitz: task 'arithmetic' has "
     "no setting 'max_digitz'; did you mean max_digits?"),
    ("--config.task.kwargs.max_digits=two", "config.task.kwargs.max_digits='two': task "
     "'arithmetic' takes int there"),
    ("--config.rewards=acuracy:1", "--config.rewards: unknown reward 'acuracy'"),
    ("--config.rewards=accuracy:high", "the weight of 'accuracy' is 'high', not a number"),
    ("--config.reward_kwargs.rouge1.tokeniser=words", "config.reward_kwargs.rouge1.tokeniser: "
     "reward 'rouge1' takes no keyword 'tokeniser'; did you mean tokenizer?"),
    ("--config.reward_kwargs.rogue1.tokenizer=words", "no reward is named 'rogue1'; did you "
     "mean rouge1?"),
    ("--config.reward_kwargs.bertscore.num_layers=six", "reward 'bertscore' takes int or None"),
    ("--workdirr=/tmp/x", "Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
])
def test_a_bad_override_is_one_line_and_exit_status_2(flag, message, env, tmp_path):
  proc = run_cli([f"--config={TINY}", f"--workdir={tmp_path / 'run'}", flag], env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert message in proc.stderr
  assert not os.path.exists(tmp_path / "run")


def test_a_config_file_that_raises_or_is_missing_is_one_line(env, tmp_path):
  raising = tmp_path / "needs_arg.py"
  raising.write_text("def get_config(arg=None):\n"
                     "  raise ValueError('give the checkpoint folder: --config=FILE:PATH')\n")
  for config, message in ((str(raising), "ValueError: give the checkpoint folder"),
                          (str(tmp_path / "nope.py"), "cannot load it: [Errno 2] No such file")):
    proc = run_cli([f"--config={config}", f"--workdir={tmp_path / 'run'}"], env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert message in proc.stderr


def printed_config(proc) -> dict:
  """{key: the value's text} from --print_config's output."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {}
  for line in proc.stdout.splitlines()[1:]:
    match = re.match(r"config\.(\S+) = (.*?) +default (.*?) +(\S.*)$", line)
    assert match, line
    rows[match.group(1)] = match.group(2)
  return rows


def test_print_config_lists_every_key_and_needs_no_workdir(env):
  proc = run_cli([f"--config={TINY}", "--print_config"], env)
  rows = printed_config(proc)
  # Every key of the schema, task.kwargs as the arithmetic task's settings, in schema order.
  schema = [k for k in config_lib.meanings() if k != "task.kwargs"]
  settings = [f"task.kwargs.{k}" for k in config_lib.task_parameters("arithmetic")]
  assert sorted(rows) == sorted(schema + settings)
  assert rows["rl.beta"] == "0.0" and rows["task.kwargs.max_digits"] == "1"
  assert rows["rewards"] == "'accuracy:1,tag_count:1'"
  assert "config.rl.beta = 0.0" in proc.stdout and "default 0.04" in proc.stdout
  for key, meaning in config_lib.meanings().items():
    if key != "task.kwargs":
      assert meaning in proc.stdout, key
  assert "loading" not in proc.stderr  # no model


def test_every_key_can_be_set_from_flags(env):
  """Each key of the schema gets a value unlike its default from one flag, and
  --print_config shows it set."""
  flags, want = [], {}
  for key in config_lib.meanings():
    value = config_lib.defaults()
    for part in key.split("."):
      value = value[part]
    if key == "task.kwargs":
      continue  # the task's settings: the tests below
    if key == "rewards":
      flags.append("--config.rewards=accuracy:2,tag_count:0.25")
      want[key] = "'accuracy:2,tag_count:0.25'"
      continue
    if key == "reward_kwargs":
      flags.append("--config.reward_kwargs.rouge1.tokenizer=characters")
      want[key] = repr({"rouge1": {"tokenizer": "characters"}})
      continue
    if isinstance(value, bool):
      new = not value
    elif isinstance(value, (int, float)):
      new = value + (3 if isinstance(value, int) else 0.5)
    elif isinstance(value, tuple):  # rl.stop_strings
      new = ("\n", "###")
    elif value is None:  # a float (rl.epsilon_high, rl.delta) or a string that may be None
      new = "token_mask" if key == "rl.rollout_correction" else 4.5
    else:
      new = value + "_x"
    flags.append(f"--config.{key}={new}")
    want[key] = repr(new)
  rows = printed_config(run_cli([f"--config={TINY}", "--print_config", *flags], env))
  assert {k: rows[k] for k in want} == want


def test_task_settings_from_flags_key_by_key_or_as_json(env):
  # JSON replaces the file's settings (max_digits=1 goes back to the task's 2); keys add to it.
  rows = printed_config(run_cli([f"--config={TINY}", "--print_config",
                                 '--config.task.kwargs={"seed": 5, "min_terms": 3}',
                                 "--config.task.kwargs.max_terms=4",
                                 "--config.task.kwargs.operators", "*"], env))
  assert (rows["task.kwargs.seed"], rows["task.kwargs.min_terms"]) == ("5", "3")
  assert (rows["task.kwargs.max_terms"], rows["task.kwargs.operators"]) == ("4", "'*'")
  assert rows["task.kwargs.max_digits"] == "2"
  # Another task's settings, once the command line switched to it; the file's settings for
  # its own task are left out, with a note.
  proc = run_cli([f"--config={TINY}", "--print_config", "--config.task.kwargs.max_number=9",
                  "--config.task.name=countdown"], env)
  rows = printed_config(proc)
  assert "left out config.task.kwargs max_digits, min_digits" in proc.stderr
  assert rows["task.kwargs.max_number"] == "9" and "task.kwargs.max_digits" not in rows


@pytest.mark.slow  # ~40 s: a full CLI or multi-step run (the slow job)
def test_jsonl_task_and_rewards_from_the_command_line_train(env, tmp_path):
  """The command the jsonl task's error recommends runs, with the rewards given as a flag."""
  data = tmp_path / "train.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)})
                          + "\n" for i in range(40)))
  args = [f"--config={TINY}", "--config.task.name=jsonl", "--config.train.steps=1",
          "--config.eval.num_problems=0", "--config.rewards=tag_count:1,format_lenient:0.5",
          "--config.task.kwargs.eval_fraction=0.25"]  # else 40 rows might leave no eval row
  proc = run_cli([*args, f"--workdir={tmp_path / 'no_path'}"], env)
  assert proc.returncode != 0
  recommended = re.search(r"(--config\.task\.kwargs\.path=)FILE\.jsonl", proc.stderr)
  assert recommended, proc.stderr[-3000:]
  proc = run_cli([*args, f"--workdir={tmp_path / 'run'}", f"{recommended.group(1)}{data}"], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == [1]
  assert {"rewards/tag_count/mean", "rewards/format_lenient/mean"} <= set(steps[0])
  assert "rewards/accuracy/mean" not in steps[0]  # the file's rewards were replaced


@pytest.mark.slow  # a training run; the rewards' wiring alone is tests/text_rewards_test.py
def test_korean_template_rewards_from_the_command_line_train(env, tmp_path):
  """Template, exact-match (through the template's group), policy-token ROUGE and Korean
  language rewards, all set by flags, score a training step and the evaluation."""
  data = os.path.join(REPO, "configs", "data", "korean_correction.jsonl")
  template = r'"(?P<sentence>[^"\n]+)"[이가] 옳다\. (?P<reason>[^\n]+)'
  proc = run_cli([
      f"--config={TINY}", f"--workdir={tmp_path / 'run'}", "--config.task.name=jsonl",
      f"--config.task.kwargs.path={data}", "--config.task.template=plain",
      "--config.train.steps=1", "--config.eval.num_problems=2", "--config.eval.reward=exact_match",
      "--config.rewards=regex_format:1,exact_match:1,rouge1:1,language_consistency:0.5",
      f"--config.reward_kwargs.regex_format.pattern={template}",
      f"--config.reward_kwargs.exact_match={json.dumps({'pattern': template, 'answer_group': 1})}",
      "--config.reward_kwargs.rouge1.tokenizer=policy",
      "--config.reward_kwargs.language_consistency.language=ko",
      # Stop strings from a flag: the tiny model's vowels, frequent enough to cut some answers.
      "--config.rl.stop_strings=('a', 'e', 'i', 'o', 'u')"], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  step = next(r for r in records if "loss" in r)
  for name in ("regex_format", "exact_match", "rouge1", "language_consistency"):
    assert 0 <= step[f"rewards/{name}/mean"] <= 1, name
  assert any("eval/pass@1" in r for r in records)
  with open(tmp_path / "run" / "samples.jsonl") as f:
    texts = [c["text"] for line in f for c in json.loads(line)["completions"]]
  assert texts and not any(v in t for t in texts for v in "aeiou"), texts
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["rl"]["stop_strings"] == ["a", "e", "i", "o", "u"]
