"""Evaluation metrics on fake outputs with known answers; the `python -m grpo_jax.evaluate` CLI."""

import fractions
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from grpo_jax import evaluate
from grpo_jax.data import tasks
from grpo_jax.models import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]


def answers(texts_per_problem):
  return [[f"<answer>{t}</answer>" for t in texts] for texts in texts_per_problem]


def test_always_right():
  m = evaluate.score(EXAMPLES, answers([[ex["answer"]] * 4 for ex in EXAMPLES]))
  assert m["eval/pass@1"] == m["eval/maj@4"] == m["eval/pass@4"] == 1.0


def test_always_wrong():
  m = evaluate.score(EXAMPLES, answers([["-1"] * 4 for _ in EXAMPLES]))
  assert m["eval/pass@1"] == m["eval/maj@4"] == m["eval/pass@4"] == 0.0


def test_right_one_time_in_k():
  k = 4
  outs = [[ex["answer"]] + [str(100 + j) for j in range(k - 1)] for ex in EXAMPLES]
  m = evaluate.score(EXAMPLES, answers(outs))
  assert m["eval/pass@1"] == pytest.approx(1 / k)
  assert m["eval/pass@4"] == 1.0
  # Four different answers: the vote's tie goes to the first seen, here the right one.
  assert m["eval/maj@4"] == 1.0
  # With the wrong answer repeated, the majority is wrong.
  outs = [[ex["answer"], "7", "7", "9"] for ex in EXAMPLES]
  assert evaluate.score(EXAMPLES, answers(outs))["eval/maj@4"] == 0.0


def test_majority_right_though_not_all():
  outs = [[ex["answer"], ex["answer"], "0", "no answer"] for ex in EXAMPLES]
  m = evaluate.score(EXAMPLES, answers(outs))
  assert m["eval/maj@4"] == 1.0 and m["eval/pass@1"] == 0.5


def test_lengths_and_partial_credit():
  outs = answers([[ex["answer"]] * 2 for ex in EXAMPLES])
  m = evaluate.score(EXAMPLES, outs, lengths=np.full((6, 2), 5))
  assert m["eval/mean_length"] == 5.0
  assert m["eval/mean_length_chars"] == np.mean([len(t) for texts in outs for t in texts])

  def partial(prompts, completions, **unused):  # e.g. 0.1 for the format alone: not right
    return [0.1] * len(completions)

  m = evaluate.score(EXAMPLES, outs, partial)
  assert m["eval/pass@1"] == m["eval/maj@2"] == m["eval/pass@2"] == 0.0


def test_vote_key_numbers_and_strings():
  assert evaluate.vote_key("<answer>1,000</answer>") == evaluate.vote_key("so 1000.0") == 1000
  assert evaluate.vote_key("\\boxed{\\frac{1}{2}}") == fractions.Fraction(1, 2)
  assert evaluate.vote_key("<answer> (1 + 2)  * 3 </answer>") == "(1 + 2) * 3"
  assert evaluate.vote_key("<answer>\\sqrt{2}</answer>") == "\\sqrt{2}"
  assert evaluate.vote_key("<answer>  </answer>") is None
  assert evaluate.vote_key("no answer here") is None


def test_majority_vote_on_non_numeric_answers():
  """Equations (a countdown task) and LaTeX vote on their normalised string."""
  examples = [{"prompt": "Make 9 from 1, 2, 3", "answer": "(1 + 2) * 3"}]

  def same_equation(prompts, completions, answer, **unused):
    return [float(evaluate.vote_key(c) == evaluate.vote_key(f"<answer>{a}</answer>"))
            for c, a in zip(completions, answer)]

  right, wrong = "(1 + 2) * 3", "3 * 3"
  m = evaluate.score(examples, answers([[wrong, right, f" {right} ", "no"]]), same_equation)
  assert m["eval/maj@4"] == 1.0 and m["eval/pass@1"] == 0.5
  m = evaluate.score(examples, answers([[right, wrong, wrong, ""]]), same_equation)
  assert m["eval/maj@4"] == 0.0 and m["eval/pass@1"] == 0.25
  record = evaluate.score_problem(examples[0], answers([[right, wrong, wrong, ""]])[0],
                                  same_equation)
  assert record["votes"] == [right, wrong, wrong, None] and record["majority"] == wrong


@pytest.mark.parametrize("n,c,k", [(4, 1, 1), (10, 3, 2), (8, 0, 3), (6, 6, 2), (5, 2, 5)])
def test_pass_at_k_matches_enumeration(n, c, k):
  """Unbiased estimator == the fraction of k-subsets of the n samples holding a right one."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  brute = np.mean([any(samples[i] for i in s) for s in subsets])
  assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute)


# -- the CLI with a fake model ----------------------------------------------------------
RIGHT_TOKENS, WRONG_TOKENS = 7, 3  # token lengths the fake reports for its completions


def fake_loader(behaviour, seen):
  """A `load` for evaluate.main: a model that reads "What is E?" in the prompt and answers
  right always, never, or once in k (its first sample; the other k - 1 agree on a wrong one)."""

  def sampler(prompts, k):
    seen["prompts"] = prompts
    texts, lengths = [], []
    for prompt in prompts:
      expression = re.search(r"What is ([\d +*-]+)\?", prompt).group(1)
      value = eval(expression)  # digits and + - * only (the regex)
      right = {"right": [True] * k, "wrong": [False] * k,
               "once": [True] + [False] * (k - 1), "untagged": [True] * k}[behaviour]
      if behaviour == "untagged":
        texts.append([f"The answer is {value}."] * k)
      else:
        texts.append([f"<answer>{value if r else value + 1}</answer>" for r in right])
      lengths.append([RIGHT_TOKENS if r else WRONG_TOKENS for r in right])
    return texts, np.asarray(lengths)

  def load(args, examples):
    seen["args"], seen["examples"] = args, examples
    return sampler, tiny.tokenizer()

  return load


CLI = ["--model=tiny-random", "--task=arithmetic", "--task_kwargs={\"max_digits\": 1}",
       "--num_problems=5", "--num_samples=4"]


@pytest.mark.parametrize("behaviour,expected", [
    ("right", {"pass@1": 1.0, "maj@4": 1.0, "pass@4": 1.0, "mean_length": 7.0}),
    ("wrong", {"pass@1": 0.0, "maj@4": 0.0, "pass@4": 0.0, "mean_length": 3.0}),
    # Right once in 4: pass@1 = 1/4; any of 4 right: pass@4 = 1; the 3 wrong ones outvote it.
    ("once", {"pass@1": 0.25, "maj@4": 0.0, "pass@4": 1.0, "mean_length": (7 + 3 * 3) / 4}),
])
def test_cli_prints_the_known_numbers_of_a_fake_model(behaviour, expected, capsys, tmp_path):
  seen = {}
  output = tmp_path / "out" / "records.jsonl"
  returned = evaluate.main([*CLI, "--temperature=0.7", f"--output={output}"],
                           load=fake_loader(behaviour, seen))
  out, err = capsys.readouterr()
  assert out.endswith("\n") and out.count("\n") == 1, out  # one JSON line, nothing else
  summary = json.loads(out)
  assert summary == returned
  assert {k: summary[k] for k in [*expected, "num_problems"]} == dict(expected, num_problems=5)
  assert summary["model"] == "tiny-random" and summary["task"] == "arithmetic"
  assert summary["task_kwargs"] == {"max_digits": 1} and summary["temperature"] == 0.7
  assert summary["num_samples"] == 4 and summary["reward"] == "accuracy"
  assert summary["template"] == "chat"  # the tiny tokenizer has a chat template
  assert "[evaluate]" in err
  # The flags reached the task and the template: 1-digit problems, in the chat format.
  assert seen["examples"] == tasks.Arithmetic(max_digits=1).eval_examples(5)
  assert all(p.startswith("<|system|>") and p.endswith("<|assistant|>") for p in seen["prompts"])

  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["prompt"] for r in records] == [ex["prompt"] for ex in seen["examples"]]
  assert [r["answer"] for r in records] == [ex["answer"] for ex in seen["examples"]]
  for r in records:
    assert len(r["completions"]) == 4 and r["prompt_text"] in seen["prompts"]
    assert r["correct"] == {"right": [True] * 4, "wrong": [False] * 4,
                            "once": [True, False, False, False]}[behaviour]
    assert r["lengths"] == [RIGHT_TOKENS if c else WRONG_TOKENS for c in r["correct"]]
    assert r["majority"] == str(int(r["answer"]) + (behaviour != "right"))
    assert r["majority_correct"] == (behaviour == "right")


def test_cli_reward_defaults_to_the_tasks_default_reward(monkeypatch, capsys):
  """An untagged "The answer is 7." is wrong for `accuracy`, right for `accuracy_lenient`."""
  assert evaluate.main([*CLI, "--template=plain"], load=fake_loader("untagged", {}))["pass@1"] == 0
  monkeypatch.setattr(tasks.Arithmetic, "default_reward", "accuracy_lenient", raising=False)
  summary = evaluate.main([*CLI, "--template=plain"], load=fake_loader("untagged", {}))
  assert summary["reward"] == "accuracy_lenient" and summary["pass@1"] == 1.0
  assert summary["template"] == "plain"
  capsys.readouterr()


def test_cli_template_defaults_to_a_workdirs(tmp_path, capsys):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "tiny-random"},
                                                    "task": {"template": "r1_zero"}}))
  seen = {}
  summary = evaluate.main([*CLI[1:], f"--model={tmp_path}"], load=fake_loader("right", seen))
  assert summary["template"] == "r1_zero" and summary["pass@1"] == 1.0
  assert all(p.startswith("A conversation between User and Assistant") for p in seen["prompts"])
  capsys.readouterr()


@pytest.mark.parametrize("flag,message", [
    ("--reward=nope", "unknown reward"), ("--task_kwargs={bad", "not valid JSON"),
    ("--task_kwargs={\"digits\": 3}", "digits"), ("--num_samples=0", "num_samples"),
    ("--template=fancy", "value should be one of"), ("--model=/no/such/dir", "unknown model"),
    ("--task=nope", "unknown task"), ("--temperature=-1", "temperature"),
    ("--no_such_flag", "Unknown command line flag"), ("stray", "unexpected arguments"),
    ("--stop_strings=\\n", "--stop_strings is not valid JSON"),
    ('--stop_strings=[""]', "a JSON list of non-empty strings")])
def test_cli_rejects_bad_flags_before_loading(flag, message):
  def load(args, examples):
    raise AssertionError("loaded a model despite a bad flag")

  with pytest.raises(app.UsageError, match=message):
    evaluate.main([*CLI, flag], load=load)


def test_cli_needs_a_task_without_a_workdir():
  with pytest.raises(app.UsageError, match="--task is required"):
    evaluate.main(["--model=tiny-random"], load=fake_loader("right", {}))


def write_workdir(path, **config):
  """A training run directory as models.resolve recognises one: config.json and checkpoints/."""
  (path / "checkpoints").mkdir()
  (path / "config.json").write_text(json.dumps({"model": {"name": "tiny-random"}, **config}))
  return path


def test_cli_takes_task_template_and_length_from_a_workdir(tmp_path, capsys):
  workdir = write_workdir(
      tmp_path, task={"name": "arithmetic", "kwargs": {"max_digits": 1}, "template": "r1_zero"},
      rl={"max_completion_length": 24})
  seen = {}
  summary = evaluate.main([f"--model={workdir}", "--num_problems=5", "--num_samples=4"],
                          load=fake_loader("right", seen))
  assert summary["task"] == "arithmetic" and summary["task_kwargs"] == {"max_digits": 1}
  assert summary["template"] == "r1_zero" and summary["max_new_tokens"] == 24
  assert summary["from_workdir"] == ["max_new_tokens", "task", "task_kwargs", "template"]
  assert seen["examples"] == tasks.Arithmetic(max_digits=1).eval_examples(5)
  assert seen["args"].max_new_tokens == 24 and summary["pass@1"] == 1.0
  assert "from the run's config.json: --task=arithmetic" in capsys.readouterr().err
  # Another task than the run's does not inherit the run's task kwargs.
  args = evaluate.parse_args([f"--model={workdir}", "--task=countdown"])
  assert args.task == "countdown" and args.task_kwargs == {}
  assert sorted(args.from_workdir) == ["max_new_tokens", "template"]


def test_cli_flags_given_win_over_a_workdirs(tmp_path, capsys):
  workdir = write_workdir(
      tmp_path, task={"name": "arithmetic", "kwargs": {"max_digits": 3}, "template": "r1_zero"},
      rl={"max_completion_length": 24})
  seen = {}
  summary = evaluate.main([f"--model={workdir}", "--num_problems=5",
                           "--task_kwargs={\"max_digits\": 1}", "--max_new_tokens=9",
                           "--template=plain"], load=fake_loader("right", seen))
  assert summary["task_kwargs"] == {"max_digits": 1} and summary["max_new_tokens"] == 9
  assert summary["template"] == "plain" and summary["from_workdir"] == ["task"]
  # Without the workdir, the next call is back to the defaults: nothing of this one lingers.
  summary = evaluate.main(CLI, load=fake_loader("right", seen))
  assert summary["max_new_tokens"] == 256 and summary["template"] == "chat"
  assert summary["from_workdir"] == []
  capsys.readouterr()


def test_cli_takes_stop_strings_from_a_workdir_or_the_flag(tmp_path, capsys):
  workdir = write_workdir(tmp_path, task={"name": "arithmetic", "kwargs": {"max_digits": 1}},
                          rl={"stop_strings": ["\n"]})
  seen = {}
  summary = evaluate.main([f"--model={workdir}", "--num_problems=5"],
                          load=fake_loader("right", seen))
  assert seen["args"].stop_strings == ("\n",) and summary["stop_strings"] == ["\n"]
  assert "stop_strings" in summary["from_workdir"]
  summary = evaluate.main([f"--model={workdir}", "--num_problems=5",
                           '--stop_strings=["\u3002", "\\n\\n"]'],
                          load=fake_loader("right", seen))
  assert seen["args"].stop_strings == ("\u3002", "\n\n")
  assert "stop_strings" not in summary["from_workdir"]
  assert evaluate.main(CLI, load=fake_loader("right", seen))["stop_strings"] == []
  capsys.readouterr()


def test_stop_strings_end_each_completion_where_the_string_first_appears():
  """With a stop string, each completion is the one sampled without it (same key, same
  draws) up to the string's first place, and sampling stopped there (fewer tokens)."""
  import collections

  import jax
  from flax import nnx

  from grpo_jax import models
  from grpo_jax.data import templates

  model, tok = models.load("tiny-random")
  graphdef, params = nnx.split(model)
  prompts = [f"<|user|>What is {i} + {2 * i}?<|assistant|>" for i in range(4)]
  kw = dict(num_samples=3, max_new_tokens=16, temperature=1.0, key=jax.random.key(5),
            prompts_per_batch=4)
  free, free_lengths = evaluate.sample_texts(graphdef, params, tok, prompts,
                                             stop_ids=templates.stop_ids(tok), **kw)
  # The character the free completions use most, so that it cuts several of them.
  stop = collections.Counter(c for row in free for t in row for c in t
                             if c.strip()).most_common(1)[0][0]
  cut, cut_lengths = evaluate.sample_texts(graphdef, params, tok, prompts,
                                           stop_ids=templates.stop_ids(tok, (stop,)),
                                           stop_strings=(stop,), **kw)
  assert [[t.split(stop)[0] for t in row] for row in free] == cut
  assert (cut_lengths <= free_lengths).all()
  was_cut = np.array([[stop in t for t in row] for row in free])
  assert was_cut.sum() >= 2 and (cut_lengths[was_cut] < free_lengths[was_cut]).any()
  assert (cut_lengths[~was_cut] == free_lengths[~was_cut]).all()


# -- the CLI end to end, with a real (tiny, random) model --------------------------------
def test_cli_end_to_end_with_tiny_random(tmp_path):
  output = tmp_path / "records.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.evaluate", "--model=tiny-random", "--task=arithmetic",
       "--num_problems=4", "--num_samples=2", "--max_new_tokens=8", f"--output={output}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout
  summary = json.loads(lines[0])
  assert {"pass@1", "maj@2", "pass@2", "num_problems", "mean_length"} <= set(summary)
  assert 0 <= summary["pass@1"] <= summary["pass@2"] <= 1
  assert 0 <= summary["maj@2"] <= 1
  assert summary["num_problems"] == 4 and 1 <= summary["mean_length"] <= 8
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(records) == 4
  assert all(len(r["completions"]) == len(r["correct"]) == len(r["lengths"]) == 2 for r in records)
  assert np.mean([r["lengths"] for r in records]) == summary["mean_length"]


# -- under a device mesh (training's evaluator) ---------------------------------------------
def start_script(code, devices, *args):
  """`python -c code args` on `devices` host devices (CPU), running."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc, timeout=300):
  """Its stdout, once it exited 0."""
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


# Five prompts in batches of three (the last has two): a batch is filled up to 8 rows on a mesh
# of data=2 x fsdp=4. Sampling at temperature 1, so a row that drew from another key would show.
SAMPLE_KW = """
prompts = [f"<|user|>What is {i} + {2 * i}?<|assistant|>" for i in range(5)]
kw = dict(num_samples=2, max_new_tokens=12, temperature=1.0, key=jax.random.key(3),
          stop_ids=templates.stop_ids(tok), prompts_per_batch=3)
"""

MESH_EVAL = """
import types
import jax, numpy as np
from flax import nnx
from grpo_jax import config as config_lib, evaluate, models, runner, sampling, sharding
from grpo_jax.data import get_task, templates
assert jax.device_count() == 8
model, tok = models.load("tiny-random")
graphdef, params = nnx.split(model)
mesh = sharding.make_mesh(data=2, fsdp=4)
batch_sh = sharding.batch_sharding(mesh)
on_mesh = jax.device_put(params, sharding.param_shardings(mesh, params))
passed = []  # the prompts and masks the sampler is given
sample_jit = sampling.sample_jit
def spy(graphdef, params, prompts, mask, key, **kw):
  passed.extend([prompts, mask])
  return sample_jit(graphdef, params, prompts, mask, key, **kw)
sampling.sample_jit = spy
def split_over_the_batch_axes(rows):
  assert len(passed) > 0
  for x in passed:
    assert x.shape[0] == rows and x.sharding.is_equivalent_to(batch_sh, 2), x.sharding
    assert {s.data.shape[0] for s in x.addressable_shards} == {rows // 8}
""" + SAMPLE_KW + """
want = evaluate.sample_texts(graphdef, params, tok, prompts, **kw)
passed.clear()
got = evaluate.sample_texts(graphdef, on_mesh, tok, prompts, batch_sh=batch_sh, **kw)
assert got[0] == want[0], (got[0], want[0])
np.testing.assert_array_equal(got[1], want[1])
split_over_the_batch_axes(8)
assert len(passed) == 4  # two calls

# The evaluator training builds takes the run's batch sharding.
cfg = config_lib.from_file("configs/tiny_arithmetic.py")
cfg.eval.num_problems, cfg.eval.prompts_per_batch, cfg.eval.num_samples = 5, 3, 2
cfg.eval.temperature = 1.0
task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
run = types.SimpleNamespace(cfg=cfg, graphdef=graphdef, rollout_graphdef=graphdef, tokenizer=tok,
                            batch_sh=batch_sh)
passed.clear()
got = runner.task_evaluator(run, task)(on_mesh)
split_over_the_batch_axes(8)
want = runner.task_evaluator(types.SimpleNamespace(**dict(vars(run), batch_sh=None)), task)(params)
assert got == want and got["eval/num_problems"] == 5, (got, want)
print("OK")
"""


@pytest.mark.slow
def test_evaluation_on_a_mesh_splits_the_prompts_and_equals_one_device():
  """data=2 x fsdp=4 on 8 host devices: the sampler gets each batch split over the batch axes
  (filled from 3 prompts up to 8 rows), and the completions and metrics are those of the
  unsharded evaluation on one device."""
  assert "OK" in finished(start_script(MESH_EVAL, 8))


TWO_PROCESSES = """
import json, sys
import jax, numpy as np
port, pid, mine = sys.argv[1:]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(pid))
from flax import nnx
from grpo_jax import evaluate, judge, models, sharding
from grpo_jax.data import templates
assert jax.device_count() == 8 and jax.local_device_count() == 4
model, tok = models.load("tiny-random")
graphdef, params = nnx.split(model)
mesh = sharding.make_mesh(data=2, fsdp=4)  # the data axis across the two processes
batch_sh = sharding.batch_sharding(mesh)
on_mesh = jax.device_put(params, sharding.param_shardings(mesh, params))
""" + SAMPLE_KW + """
texts, lengths = evaluate.sample_texts(graphdef, on_mesh, tok, prompts, batch_sh=batch_sh, **kw)
# The policy judging its own completions: each process passes its own (6 and 3 answers), in
# forwards of 8 rows (4 per process), so the second process fills its second forward.
questions, answers = json.loads(mine)
scores = judge.judge_scores(graphdef, on_mesh, tok, questions, answers, batch_size=3,
                            batch_sh=batch_sh)
print(json.dumps({"texts": texts, "lengths": lengths.tolist(), "scores": scores.tolist()}))
"""
JUDGE = [(["What is 3 + 4?"] * 6, ["7", "8", "seven", "<answer>7</answer>", "70", "7.0"]),
         (["What is 12 + 30?"] * 3, ["42", "It is 42, I think.", "-1"])]  # per process


@pytest.mark.slow
def test_two_processes_evaluate_and_judge_like_one_device():
  """Two processes of 4 devices, the mesh's data axis across them: each tokenizes and feeds
  its rows; both get every completion of the unsharded evaluation, and the judge gives each
  process the scores of its own answers."""
  import socket

  import jax
  from flax import nnx

  from grpo_jax import judge, models
  from grpo_jax.data import templates

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [start_script(TWO_PROCESSES, 4, port, pid, json.dumps(JUDGE[pid])) for pid in range(2)]
  try:
    outs = [json.loads(finished(p).splitlines()[-1]) for p in procs]
  finally:  # one that failed leaves the other waiting for it
    for p in procs:
      if p.poll() is None:
        p.kill()

  model, tok = models.load("tiny-random")
  graphdef, params = nnx.split(model)
  scope = {"jax": jax, "templates": templates, "tok": tok}
  exec(SAMPLE_KW, scope)
  texts, lengths = evaluate.sample_texts(graphdef, params, tok, scope["prompts"], **scope["kw"])
  for pid, out in enumerate(outs):
    assert out["texts"] == texts and out["lengths"] == lengths.tolist()
    want = judge.judge_scores(graphdef, params, tok, *JUDGE[pid])
    np.testing.assert_allclose(out["scores"], want, atol=1e-5)


def test_cli_reward_kwargs_bind_keywords_to_the_reward(tmp_path, capsys):
  """regex_format needs its pattern: from --reward_kwargs, or from a workdir's config."""
  tagged = ["--reward=regex_format", '--reward_kwargs={"pattern": "<answer>-?\\\\d+</answer>"}']
  summary = evaluate.main([*CLI, *tagged], load=fake_loader("right", {}))
  assert summary["pass@1"] == 1.0 and summary["reward_kwargs"] == {"pattern": "<answer>-?\\d+</answer>"}
  assert evaluate.main([*CLI, *tagged, "--template=plain"],
                       load=fake_loader("untagged", {}))["pass@1"] == 0.0
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps({
      "model": {"name": "tiny-random"}, "task": {"name": "arithmetic"},
      "reward_kwargs": {"regex_format": {"pattern": "The answer is -?\\d+\\."}}}))
  summary = evaluate.main([*CLI[1:], f"--model={tmp_path}", "--reward=regex_format"],
                          load=fake_loader("untagged", {}))
  assert summary["pass@1"] == 1.0 and "reward_kwargs" in summary["from_workdir"]
  capsys.readouterr()


@pytest.mark.parametrize("flags_,message", [
    (["--reward=regex_format"], "pattern"),
    (["--reward=regex_format", "--reward_kwargs={bad"], "not valid JSON"),
    (["--reward=accuracy", '--reward_kwargs={"pattern": "x"}'], "pattern"),
    (["--reward=regex_format", '--reward_kwargs=["x"]'], "JSON object")])
def test_cli_rejects_bad_reward_kwargs_before_loading(flags_, message):
  def load(args, examples):
    raise AssertionError("loaded a model despite a bad flag")

  with pytest.raises(app.UsageError, match=message):
    evaluate.main([*CLI, *flags_], load=load)


# -- intervals and distinct problems ------------------------------------------------------------
def test_wilson_interval_matches_the_closed_form():
  z = 1.959964
  for successes, n in [(0, 10), (5, 10), (17, 48), (48, 48)]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    np.testing.assert_allclose(evaluate.wilson_interval(successes, n),
                               (max(0.0, centre - half), min(1.0, centre + half)), rtol=1e-12)
  low, high = evaluate.wilson_interval(0, 10)
  assert low == 0.0 and abs(high - z * z / (10 + z * z)) < 1e-12  # the "rule of three" regime


def test_interval_bootstraps_over_distinct_problems():
  rng = np.random.default_rng(1)
  right = rng.binomial(4, 0.5, 400)  # 400 problems x 4 samples at p = 0.5
  low, high = evaluate.interval(right, [4] * 400)
  assert low < right.sum() / 1600 < high
  # A problem's 4 samples are correlated only through the problem here (iid), so the width is
  # close to the normal approximation over 1600 samples: 2 x 1.96 x sqrt(0.25 / 1600).
  assert abs((high - low) - 2 * 1.96 * 0.5 / 40) < 0.01
  # A repeated problem is one cluster: two rows of one prompt count as one problem twice as big.
  rows = evaluate.interval([3, 1, 0, 2, 2], [4] * 5, groups=["a", "a", "b", "c", "c"])
  assert rows == evaluate.interval([4, 0, 4], [8, 4, 8])
  # All problems right (or all wrong): the bootstrap has no spread; Wilson over the problems.
  assert evaluate.interval([4, 4, 8], [4, 4, 8], groups=["a", "b", "b"]) == \
      evaluate.wilson_interval(2, 2)


def test_score_reports_distinct_problems_and_intervals():
  examples = [{"prompt": p, "answer": "1"} for p in ("x", "y", "x", "z")]
  completions = [["<answer>1</answer>", "<answer>2</answer>"]] * 4
  metrics = evaluate.score(examples, completions)
  assert metrics["eval/num_problems"] == 4 and metrics["eval/num_distinct_problems"] == 3
  assert metrics["eval/pass@1"] == 0.5
  # Every problem scores 1/2: the bootstrap interval is the point itself.
  assert metrics["eval/pass@1_ci95_low"] == metrics["eval/pass@1_ci95_high"] == 0.5
  assert (metrics["eval/maj@2_ci95_low"], metrics["eval/maj@2_ci95_high"]) == \
      evaluate.wilson_interval(3, 3)  # the first vote (right) wins each tie


def test_cli_evaluates_distinct_problems_and_says_when_the_split_has_fewer(capsys):
  seen = {}
  one_digit = ["--model=tiny-random", "--task=arithmetic",
               '--task_kwargs={"min_digits": 1, "max_digits": 1, "operators": "+-"}',
               "--num_problems=48", "--num_samples=2"]
  summary = evaluate.main(one_digit, load=fake_loader("once", seen))
  distinct = len({ex["prompt"] for ex in seen["examples"]})
  assert summary["num_problems"] == summary["num_distinct_problems"] == distinct < 48
  assert "holds only" in capsys.readouterr().err
  low, high = summary["pass@1_ci95"]
  assert low <= summary["pass@1"] == 0.5 <= high
  summary = evaluate.main([*one_digit, "--allow_repeats"], load=fake_loader("right", seen))
  assert summary["num_problems"] == 48 and summary["num_distinct_problems"] == distinct
  assert summary["pass@1_ci95"] == list(evaluate.wilson_interval(distinct, distinct))
