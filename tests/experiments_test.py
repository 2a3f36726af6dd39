"""experiments/run.py's pipelines and experiments/report.py's README blocks."""

import importlib.util
import json
import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  """Imports experiments/NAME.py; both scripts define --root, so an earlier one's goes first."""
  for flag_name in ("root", "dry_run", "seeds", "record", "blocks", "stages"):
    if flag_name in flags.FLAGS:
      delattr(flags.FLAGS, flag_name)
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def flag(command, name):
  """The value of --name=VALUE in a command line (None if absent)."""
  values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
  return values[0] if values else None


def test_base_model_stages_train_and_evaluate_each_task_with_the_r1_zero_template(tmp_path):
  run = load("run")
  stages = {st.name: st for st in run.stages("r1_zero_base", str(tmp_path))}
  assert list(stages) == ["base_arithmetic", "grpo_arithmetic", "base_countdown", "grpo_countdown"]
  for name, st in stages.items():
    task = name.split("_")[1]
    evaluation = run.evaluate("out.jsonl", st.model, st.on)
    assert (flag(evaluation, "task"), flag(evaluation, "template")) == (task, "r1_zero")
    assert flag(evaluation, "reward") == ("countdown" if task == "countdown" else "accuracy_lenient")
    if st.command is not None:  # training: the Gemma config's preset for the same task
      assert flag(st.command, "config").endswith("gemma3_arithmetic.py" + (
          ":countdown" if task == "countdown" else ""))
      assert flag(st.command, "config.model.name") == "gemma3-270m"
    else:
      assert st.model == "gemma3-270m"
  # the SmolLM2 experiments keep the chat template
  instruct, *_ = run.stages("headline", str(tmp_path))
  assert flag(run.evaluate("out.jsonl", instruct.model, instruct.on), "template") == "chat"


def test_r1_and_distillation_run_on_the_headline_task_and_its_500_problem_evaluation(tmp_path):
  run = load("run")
  headline = {st.name: st for st in run.stages("headline", str(tmp_path), seed=1)}
  r1 = {st.name: st for st in run.stages("r1", str(tmp_path), seed=1)}
  distill = {st.name: st for st in run.stages("distill", str(tmp_path), seed=1)}
  assert list(r1) == ["cold_start_sft", "grpo_1", "rejection_sampling", "sft_data", "sft_2",
                      "grpo_2"]
  evaluated = [st for st in [*r1.values(), *distill.values()] if st.model is not None]
  assert [st.name for st in evaluated] == ["cold_start_sft", "grpo_1", "sft_2", "grpo_2",
                                           "student_sft"]
  for st in evaluated:  # every model on the same evaluation as the headline's (R1-Zero) arm
    assert st.on == headline["grpo"].on
    assert flag(run.evaluate("o.jsonl", st.model, st.on, 1), "num_problems") == "500"
  for name in ("grpo_1", "grpo_2"):  # GRPO on the headline task, from the previous SFT model
    assert flag(r1[name].command, "config").endswith("smollm2_arithmetic.py:two_digit")
    assert flag(r1[name].command, "config.train.seed") == "1"
  assert flag(r1["grpo_1"].command, "config.model.name") == r1["cold_start_sft"].product
  assert flag(r1["grpo_2"].command, "config.model.name") == r1["sft_2"].product
  # rejection sampling and the teacher's traces draw training problems of the same task
  for st in (r1["rejection_sampling"], distill["teacher_traces"]):
    assert json.loads(flag(st.command, "task_kwargs")) == run.HEADLINE_TASK_KWARGS
  assert flag(distill["teacher_traces"].command, "model") == r1["grpo_2"].product
  assert flag(distill["student_sft"].command, "config").endswith(
      "smollm2_sft.py:" + distill["teacher_traces"].product)


def test_a_dependent_pipeline_skips_whole_recorded_seeds_and_distill_needs_its_teacher(
    tmp_path, capsys):
  import pytest

  run = load("run")
  root, rec = tmp_path / "runs", tmp_path / "record"
  rec.mkdir()
  recorded = {}
  for st in run.stages("r1", str(rec), seed=0):  # seed 0 ran in another checkout
    recorded[f"r1/{st.name}"] = {"seeds": {"0": {"stage_s": 1.0, **(
        {"eval": {"pass@1": 0.5}} if st.model is not None else {})}}}
  (rec / "results.json").write_text(json.dumps(recorded))
  run.run("r1", str(root), seeds=2, dry_run=True, record_dir=str(rec))
  said = capsys.readouterr().err.splitlines()
  assert any(line.startswith("[r1/seed0] every stage recorded") for line in said)
  assert [line for line in said if line.split()[0].endswith("/seed0]")] == [said[0]]
  assert any(line.startswith("[r1/cold_start_sft/seed1] ") for line in said)
  # one stage of seed 1 recorded is not enough: its later stages need its model, so seed 1 runs
  recorded["r1/cold_start_sft"]["seeds"]["1"] = recorded["r1/cold_start_sft"]["seeds"]["0"]
  (rec / "results.json").write_text(json.dumps(recorded))
  run.run("r1", str(root), seeds=2, dry_run=True, record_dir=str(rec))
  assert any(line.startswith("[r1/cold_start_sft/seed1] ")
             for line in capsys.readouterr().err.splitlines())
  # distillation reads r1's policy from the root: a clear error, before any work, without it
  with pytest.raises(FileNotFoundError, match="r1 pipeline's final policy"):
    run.run("distill", str(root), seeds=1, record_dir=str(rec))
  assert not (root / "distill").exists()


def test_each_seed_trains_and_evaluates_in_its_own_folder_with_its_seed(tmp_path):
  run = load("run")
  for seed in (0, 2):
    instruct, grpo = run.stages("headline", str(tmp_path), seed)
    assert grpo.product == str(tmp_path / "headline" / f"seed{seed}" / "grpo")
    assert flag(grpo.command, "config.train.seed") == flag(grpo.command, "config.task.kwargs.seed") \
        == str(seed)
    assert flag(grpo.command, "config").endswith("smollm2_arithmetic.py:two_digit")
    evaluation = run.evaluate("o.jsonl", grpo.model, grpo.on, seed)
    assert flag(evaluation, "seed") == str(seed) and flag(evaluation, "num_problems") == "500"
    # every seed is evaluated on the same problems: the task's own seed is not varied there
    assert json.loads(flag(evaluation, "task_kwargs")) == {"min_digits": 1, "max_digits": 2,
                                                           "operators": "+-"}
  # The variants differ from each other only in their own flags, all at mu = 2.
  variants = {st.name: st.command for st in run.stages("variants", str(tmp_path))}
  assert list(variants) == list(run.VARIANTS)
  for name, command in variants.items():
    assert flag(command, "config.rl.num_iterations") == "2"
    assert {a for a in command if a.startswith("--config.rl.") and "num_iterations" not in a} == \
        {f"--config.{k}={v}" for k, v in run.VARIANTS[name].items()}


def test_pipeline_training_commands_are_valid_configs(tmp_path):
  import ast

  from grpo_jax import config as config_lib

  run = load("run")
  stages = sum((run.stages(n, str(tmp_path)) for n in ("variants", "ppo", "lora", "r1", "distill")),
               [])
  for st in [st for st in stages if isinstance(st.command, list) and "grpo_jax.main" in st.command]:
    path, preset = flag(st.command, "config").split(":")
    cfg = config_lib.from_file(path, preset)
    for arg in st.command:
      if arg.startswith("--config."):
        key, text = arg.removeprefix("--config.").split("=", 1)
        *sections, leaf = key.split(".")
        node = cfg
        for section in sections:
          node = node[section]
        try:
          node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
          node[leaf] = text  # a string value
    config_lib.validate(cfg, data=False)  # raises ConfigError on a bad key or value


def test_one_seed_results_of_an_earlier_layout_become_seed_0(tmp_path):
  results_io = load("results_io")
  (tmp_path / "results.json").write_text(json.dumps(
      {"r1_zero/grpo": {"stage_s": 5.0, "eval": {"pass@1": 0.5}}}))
  entry = results_io.load_results(str(tmp_path / "results.json"))["r1_zero/grpo"]["seeds"]["0"]
  assert entry["eval"] == {"pass@1": 0.5} and entry["stage_s"] == 5.0
  assert entry["workdir"] == str(tmp_path / "r1_zero" / "grpo")
  assert entry["eval_path"] == str(tmp_path / "r1_zero" / "eval_grpo.jsonl")


def test_report_rewrites_only_the_blocks_that_have_results(tmp_path):
  report = load("report")
  root, out = tmp_path / "runs", tmp_path / "out"
  out.mkdir()
  answers = ["<think>a</think><answer>7</answer>", "7"]
  results = {}
  for stage, p_S in [("instruct", [0.25]), ("grpo", [0.5, 0.7, 0.6])]:
    seeds = {}
    for seed, p in enumerate(p_S):
      folder = root / "headline" / f"seed{seed}"
      (folder / stage).mkdir(parents=True)
      eval_path = folder / f"eval_{stage}.jsonl"
      eval_path.write_text(json.dumps({"prompt": "p", "completions": answers,
                                       "num_correct": 1}) + "\n")
      seeds[str(seed)] = {"eval": {"pass@1": p, "pass@1_ci95": [p - 0.1, p + 0.1], "maj@2": p,
                                   "pass@2": p, "num_samples": 2, "mean_length": 3.0,
                                   "num_distinct_problems": 500},
                          "stage_s": 60.0 * (seed + 1), "workdir": str(folder / stage),
                          "eval_path": str(eval_path)}
      with open(folder / stage / "metrics.jsonl", "w") as f:
        for step in (1, 2):
          f.write(json.dumps({"step": step, "reward": 0.1 * step, "rewards/accuracy_lenient/mean":
                              0.1 * seed, "completions/mean_length": 40.0,
                              "time/step_s": 2.0}) + "\n")
    results[f"headline/{stage}"] = {"seeds": seeds}
  (root / "results.json").write_text(json.dumps(results))
  main_block = "\n".join(report.MARKERS["main"])
  begin, end = report.MARKERS["headline"]
  (out / "README.md").write_text(f"head\n{main_block}\nmiddle\n{begin}\nold\n{end}\ntail\n")
  report.report(str(root), str(out), blocks=["main"])  # only the named block: nothing to write
  assert (out / "README.md").read_text().count("old") == 1
  report.report(str(root), str(out))
  text = (out / "README.md").read_text()
  assert main_block in text  # no r1_zero/r1/distill results: that block is left as it was
  block = text.split(begin)[1].split(end)[0]
  assert "old" not in block
  # 3 seeds: mean 0.6, sample sd 0.1; each seed with its interval; stage time the seeds' mean.
  assert ("| headline/grpo | 3 | 0.600 ± 0.100 | 0.500 [0.40, 0.60]; 0.700 [0.60, 0.80]; "
          "0.600 [0.50, 0.70] | 0.600 ± 0.100 | 500 x 2 | 0.50 | 3.0 | 2.0 min |") in block
  assert "| headline/instruct | 1 | 0.250 | 0.250 [0.15, 0.35] |" in block
  assert text.startswith("head\n") and text.endswith("tail\n")
  assert (out / "headline.png").exists() and not (out / "grpo_curves.png").exists()


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


def test_smooth_is_a_trailing_mean():
  report = load("report")
  np = __import__("numpy")
  np.testing.assert_allclose(report.smooth([1, 2, 3, 4, 5, 6], window=3), [1, 1.5, 2, 3, 4, 5])


def test_record_keeps_results_beyond_the_checkout_and_skips_recorded_stages(tmp_path, capsys):
  run, results_io = load("run"), load("results_io")
  root, rec = tmp_path / "runs", tmp_path / "record"
  workdir = root / "headline" / "seed0" / "grpo"
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
  (workdir / "checkpoints").mkdir()  # not copied
  eval_path = root / "headline" / "seed0" / "eval_grpo.jsonl"
  eval_path.write_text('{"prompt": "p", "completions": ["7"], "num_correct": 1}\n')
  ours = {"headline/grpo": {"seeds": {"0": {"eval": {"pass@1": 0.4}, "stage_s": 9.0,
                                            "workdir": str(workdir), "eval_path": str(eval_path)},
                                      "1": {"workdir": str(workdir)}}}}  # seed 1 not finished
  # an earlier checkout recorded the instruct model's evaluation
  rec.mkdir()
  (rec / "results.json").write_text(json.dumps({"headline/instruct": {"seeds": {"0": {
      "eval": {"pass@1": 0.02}, "eval_path": "headline/seed0/eval_instruct.jsonl"}}}}))
  got = results_io.record(ours, str(rec))
  assert set(got) == {"headline/instruct", "headline/grpo"} and set(got["headline/grpo"]["seeds"]) \
      == {"0"}
  saved = json.loads((rec / "results.json").read_text())["headline/grpo"]["seeds"]["0"]
  assert saved == {"eval": {"pass@1": 0.4}, "stage_s": 9.0, "workdir": "headline/seed0/grpo",
                   "eval_path": "headline/seed0/eval_grpo.jsonl"}
  assert (rec / "headline/seed0/grpo/metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'
  assert (rec / "headline/seed0/eval_grpo.jsonl").exists()
  assert not (rec / "headline/seed0/grpo/checkpoints").exists()
  # read back from anywhere: paths resolve against the record's folder
  assert got["headline/grpo"]["seeds"]["0"]["workdir"] == str(rec / "headline/seed0/grpo")
  # a fresh checkout (empty root) skips what the record holds and runs only the rest
  run.run("headline", str(tmp_path / "fresh"), seeds=2, dry_run=True, record_dir=str(rec))
  said = capsys.readouterr().err.splitlines()
  assert [line.split("]")[0] + "]" for line in said if "skipped" in line] == [
      "[headline/instruct/seed0]", "[headline/grpo/seed0]"]
  assert any(line.startswith("[headline/grpo/seed1] ") and "grpo_jax.main" in line for line in said)


def test_korean_experiment_evaluates_exact_match_through_the_template_on_the_held_out_split(
    tmp_path):
  run = load("run")
  from grpo_jax import cli

  base, grpo = run.stages("korean", str(tmp_path), seed=1)
  assert base.command is None and base.model == "gemma3-270m" and base.on == grpo.on
  assert flag(grpo.command, "config").endswith("gemma3_korean.py")
  evaluation = run.evaluate("o.jsonl", grpo.model, grpo.on, 1)
  assert flag(evaluation, "task") == "jsonl" and flag(evaluation, "reward") == "exact_match"
  kwargs = json.loads(flag(evaluation, "reward_kwargs"))
  task_kwargs = json.loads(flag(evaluation, "task_kwargs"))
  assert task_kwargs["eval_fraction"] == 0.3 and os.path.exists(task_kwargs["path"])
  # the keywords score a template answer by its sentence alone
  score = cli.reward_with_kwargs("exact_match", kwargs)  # as evaluate builds it
  answer = '"이번 일은 걱정하지 않아도 돼."가 옳다. 이유'
  got = score(["p", "p"], ['"이번 일은 걱정하지 않아도 돼."가 옳다. 다른 이유', "돼"],
              answer=[answer, answer], **kwargs)
  assert list(got) == [1.0, 0.0]


def test_korean_answer_kinds_sort_template_answers_copies_and_bare_corrections(tmp_path):
  report = load("report")
  answer = '"물이 얼음이 되면 부피가 늘어난다."가 옳다. 어간 뒤에 어미가 붙는다.'
  row = {"prompt": "p", "sentence": "물이 얼음이 돼면 부피가 늘어난다.",
         "corrected": "물이 얼음이 되면 부피가 늘어난다.", "answer": answer,
         "completions": [f" {answer}", ' "물이 얼음이 돼면 부피가 늘어난다"',
                         " 물이 얼음이 되면 부피가 늘어난다.", " 모르겠다"]}
  path = tmp_path / "eval.jsonl"
  path.write_text(json.dumps(row, ensure_ascii=False) + "\n")
  pattern = r'"(?P<sentence>[^"\n]+)"[이가] 옳다\. (?P<reason>[^\n]+)'
  kinds = report.answer_kinds(str(path), pattern)
  assert (kinds["template"], kinds["copy"], kinds["bare"]) == (0.25, 0.25, 0.25)
  # ROUGE-1 on words (the reference has 11: 물이 얼음이 되면 부피가 늘어난다 가 옳다 어간 뒤에
  # 어미가 붙는다): 1 for the reference itself, 0 for the unrelated answer; the copy shares 4 of
  # its 5 words, the bare correction all 5. F1 = 2 x common / (5 + 11).
  assert abs(kinds["rouge1"] - (1 + 8 / 16 + 10 / 16 + 0) / 4) < 1e-9


def test_stages_runs_only_the_named_stages_of_an_independent_pipeline(tmp_path, capsys):
  import pytest
  run = load("run")
  run.run("variants", str(tmp_path), seeds=2, dry_run=True, only=["dapo", "rloo"])
  said = [line.split("]")[0][1:] for line in capsys.readouterr().err.splitlines()]
  assert sorted(set(said)) == [f"variants/{v}/seed{s}" for v in ("dapo", "rloo") for s in (0, 1)]
  # a dependent pipeline runs whole; an unknown stage is named with the ones that exist
  with pytest.raises(ValueError, match="build on each other"):
    run.run("r1", str(tmp_path), dry_run=True, only=["grpo_1"])
  with pytest.raises(ValueError, match=r"no stage \['drgrpo'\]; its stages are \['grpo', 'dapo'"):
    run.run("variants", str(tmp_path), dry_run=True, only=["dapo", "drgrpo"])
