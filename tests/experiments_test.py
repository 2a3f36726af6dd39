"""experiments/run.py's pipelines and experiments/report.py's README blocks."""

import importlib.util
import json
import os

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  """Imports experiments/NAME.py; both scripts define --root, so an earlier one's goes first."""
  for flag_name in ("root", "dry_run"):
    if flag_name in flags.FLAGS:
      delattr(flags.FLAGS, flag_name)
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flag(command, name):
  """The value of --name=VALUE in a command line (None if absent)."""
  values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
  return values[0] if values else None


def test_base_model_stages_train_and_evaluate_each_task_with_the_r1_zero_template(tmp_path):
  run = load("run")
  stages = {stage: rest for stage, *rest in run.stages("r1_zero_base", str(tmp_path))}
  assert list(stages) == ["base_arithmetic", "grpo_arithmetic", "base_countdown", "grpo_countdown"]
  for stage, (command, _, model, on) in stages.items():
    task = stage.split("_")[1]
    evaluation = run.evaluate("out.jsonl", model, on)
    assert (flag(evaluation, "task"), flag(evaluation, "template")) == (task, "r1_zero")
    assert flag(evaluation, "reward") == ("countdown" if task == "countdown" else "accuracy_lenient")
    if command is not None:  # training: the Gemma config's preset for the same task
      assert flag(command, "config").endswith("gemma3_arithmetic.py" + (
          ":countdown" if task == "countdown" else ""))
      assert flag(command, "config.model.name") == "gemma3-270m"
    else:
      assert model == "gemma3-270m"
  # the SmolLM2 experiments keep the chat template
  (_, _, _, instruct), *_ = run.stages("r1_zero", str(tmp_path))
  assert flag(run.evaluate("out.jsonl", instruct), "template") == "chat"


def test_report_rewrites_only_the_blocks_that_have_results(tmp_path):
  report = load("report")
  root, out = tmp_path / "runs", tmp_path / "out"
  (root / "r1_zero_base" / "grpo_countdown").mkdir(parents=True)
  out.mkdir()
  answers = ["<think>a</think><answer>7</answer>", "7"]
  evals = {}
  for stage, p in [("base_countdown", 0.25), ("grpo_countdown", 0.5)]:
    with open(root / "r1_zero_base" / f"eval_{stage}.jsonl", "w") as f:
      f.write(json.dumps({"prompt": "p", "completions": answers, "num_correct": 1}) + "\n")
    evals[f"r1_zero_base/{stage}"] = {"eval": {"pass@1": p, "maj@2": p, "pass@2": p,
                                               "num_samples": 2, "mean_length": 3.0}}
  evals["r1_zero_base/grpo_countdown"]["stage_s"] = 120.0
  (root / "results.json").write_text(json.dumps(evals))
  with open(root / "r1_zero_base" / "grpo_countdown" / "metrics.jsonl", "w") as f:
    for step in (1, 2):
      f.write(json.dumps({"step": step, "reward": 0.1 * step, "rewards/countdown/mean": 0.1,
                          "rewards/format/mean": 0.0, "completions/mean_length": 40.0}) + "\n")
  main_block = "\n".join(report.BLOCKS["main"][1:])
  base_begin, base_end = report.BLOCKS["r1_zero_base"][1:]
  (out / "README.md").write_text(f"head\n{main_block}\nmiddle\n{base_begin}\nold\n{base_end}\ntail\n")
  report.report(str(root), str(out))
  text = (out / "README.md").read_text()
  assert main_block in text  # no r1_zero/r1/distill results: that block is left as it was
  base = text.split(base_begin)[1].split(base_end)[0]
  assert "old" not in base
  assert ("| r1_zero_base/grpo_countdown | 0.500 | [0.50, 0.50] | 0.500 | 0.500 | 0.50 | 3.0 | "
          "2.0 min |") in base
  assert "| r1_zero_base/base_countdown | 0.250 |" in base
  assert text.startswith("head\n") and text.endswith("tail\n")
  assert (out / "r1_zero_base.png").exists() and not (out / "accuracy_per_stage.png").exists()


def test_pass1_interval_resamples_distinct_problems_with_all_their_rows(tmp_path):
  report = load("report")
  path = tmp_path / "eval.jsonl"
  rows = [("a", 2), ("a", 2), ("b", 0)] + [(f"c{i}", 1) for i in range(40)]
  path.write_text("".join(json.dumps({"prompt": p, "completions": ["x", "y"], "num_correct": c})
                          + "\n" for p, c in rows))
  low, high = report.pass1_interval(str(path))
  point = sum(c for _, c in rows) / (2 * len(rows))
  assert low < point < high and high - low < 0.2
  # one problem: every resample is that problem, so no spread at all
  path.write_text(json.dumps({"prompt": "a", "completions": ["x", "y"], "num_correct": 1}) + "\n")
  assert report.pass1_interval(str(path)) == (0.5, 0.5)
  # two distinct problems, always right and always wrong: the interval spans [0, 1]
  path.write_text("".join(json.dumps({"prompt": p, "completions": ["x"], "num_correct": c}) + "\n"
                          for p, c in [("a", 1), ("b", 0)]))
  assert report.pass1_interval(str(path)) == (0.0, 1.0)
