"""A run's workdir across restarts and failures: the config a resume may change, a finished run
re-run, per-step files cut back to the checkpoint, exit codes on signals, and start-up errors
that leave no directory behind.

The runs share train_test's persistent compilation cache fixture (autouse, per module).
"""

import json
import os
import shutil
import signal

import pytest

from grpo_jax import config as config_lib, metrics_io, run_dir, train
from tests.train_test import compile_cache  # noqa: F401  (the fixture, autouse here too)
from tests.train_test import (REPO, TINY, cli_args, run_cli, signal_mid_run, subprocess_env,
                              tiny_config, training_records)

TINY_SFT = os.path.join(REPO, "configs", "tiny_sft.py")
# Four steps, checkpoints at 2 and 4, no evaluation: steps 3-4 can be "lost" by deleting the
# last checkpoint, as a kill -9 after step 4 and before its save would.
RUN = {"train.steps": 4, "train.checkpoint_every": 2, "eval.num_problems": 0}


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def read_config(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def error_line(stderr: str) -> str:
  """The last line of the CLI's stderr: its error message, which must be that one line."""
  assert "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 4-step run (tests copy it before changing it) and its records."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  records = train.train_and_evaluate(tiny_config(RUN), workdir)
  return workdir, records


# -- resuming with another config --------------------------------------------------------
@pytest.mark.parametrize("flags, diff", [
    (["--config.rl.beta=0.1"], "rl.beta: 0.0 -> 0.1"),
    (["--config.rl.num_generations=4", "--config.rl.beta=0.5"],
     "rl.beta: 0.0 -> 0.5; rl.num_generations: 8 -> 4"),
    (["--config.model.name=smollm2-135m-instruct"],
     "model.name: 'tiny-random' -> 'smollm2-135m-instruct'"),
])
def test_resume_with_another_config_is_refused_before_loading(finished, flags, diff,
                                                              compile_cache):  # noqa: F811
  workdir, _ = finished
  before = read_config(workdir)
  proc = run_cli(cli_args(workdir, RUN) + flags, subprocess_env(compile_cache))
  assert proc.returncode != 0
  line = error_line(proc.stderr)
  assert f"--workdir={workdir} holds checkpoints of another config ({diff})" in line
  assert "--allow_config_change" in line
  assert "loading model" not in proc.stderr
  assert read_config(workdir) == before


def test_sft_config_on_a_grpo_workdir_is_refused(finished, compile_cache):  # noqa: F811
  workdir, _ = finished
  proc = run_cli([f"--config={TINY_SFT}", f"--workdir={workdir}"], subprocess_env(compile_cache))
  assert proc.returncode != 0
  assert "mode: 'grpo' -> 'sft'" in error_line(proc.stderr)


def test_allow_config_change_resumes_and_records_the_change(finished, tmp_path,
                                                             compile_cache):  # noqa: F811
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  flags = cli_args(workdir, dict(RUN, **{"train.steps": 5, "rl.beta": 0.1}))
  proc = run_cli(flags + ["--allow_config_change"], subprocess_env(compile_cache))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 4" in proc.stderr
  assert [r["step"] for r in metrics_io.read_metrics(workdir)] == [1, 2, 3, 4, 5]
  saved = read_config(workdir)
  assert saved["rl"]["beta"] == 0.1 and saved["train"]["steps"] == 5
  [entry] = saved["history"]
  assert entry["step"] == 4 and entry["forced"] == ["rl.beta"]
  assert entry["changes"] == {"rl.beta": [0.0, 0.1], "train.steps": [4, 5]}
  assert "T" in entry["time"]  # ISO 8601


def fake_workdir(path, cfg, step):
  """A workdir whose checkpoint of `step` is an empty directory: enough for the start-up check,
  which reads names and config.json only."""
  os.makedirs(os.path.join(path, "checkpoints", str(step)))
  os.makedirs(os.path.join(path, "checkpoints", f"{step + 1}.orbax-checkpoint-tmp-123"))
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort())
  return str(path)


def test_bookkeeping_keys_may_change_and_are_kept_in_the_history(tmp_path):
  workdir = fake_workdir(tmp_path, tiny_config(RUN), 2)
  new = {"train.steps": 8, "train.log_every": 2, "train.eval_every": 3,
         "train.checkpoint_every": 0, "train.keep_checkpoints": 1, "eval.num_problems": 4,
         "eval.num_samples": 3, "eval.temperature": 0.5, "eval.prompts_per_batch": 2,
         "train.device_memory_gb": 80.0, "train.grad_accum_steps": 2, "mesh.data": 1}
  resume = run_dir.check(tiny_config(dict(RUN, **new)), workdir, steps=8)
  assert resume.step == 2 and not resume.complete  # the unfinished save of step 3 is not one
  [entry] = resume.history
  assert entry["forced"] == [] and set(entry["changes"]) == set(new)
  # Every other key is refused, or kept in the history with --allow_config_change.
  cfg = tiny_config(dict(RUN, **{"task.kwargs.seed": 7, "opt.learning_rate": 0.1}))
  with pytest.raises(config_lib.ConfigError, match=r"opt.learning_rate: 0.003 -> 0.1; "
                                                   r"task.kwargs.seed: '<absent>' -> 7\)"):
    run_dir.check(cfg, workdir, steps=4)
  resume = run_dir.check(cfg, workdir, steps=4, allow_config_change=True)
  assert resume.history[-1]["forced"] == ["opt.learning_rate", "task.kwargs.seed"]


def test_a_workdir_without_checkpoints_starts_over_with_any_config(tmp_path):
  workdir = fake_workdir(tmp_path, tiny_config(RUN), 2)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  resume = run_dir.check(tiny_config({"rl.beta": 0.5}), workdir, steps=4)
  assert (resume.step, resume.complete, resume.history) == (0, False, [])


# -- a finished run, run again -----------------------------------------------------------
def test_finished_run_says_so_and_how_to_extend_it(finished, compile_cache):  # noqa: F811
  workdir, records = finished
  proc = run_cli(cli_args(workdir, RUN), subprocess_env(compile_cache))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "is complete (step 4 of 4); nothing to train" in proc.stderr
  assert "--config.train.steps=8" in proc.stderr
  assert "loading model" not in proc.stderr
  assert metrics_io.read_metrics(workdir) == records


# -- per-step files after a kill ----------------------------------------------------------
def test_samples_and_metrics_are_cut_back_to_the_checkpoint(finished, tmp_path):
  """Steps 3-4 were written but their checkpoint was lost (kill -9): the resumed run writes
  them again, once, as an uninterrupted run did."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  samples = read_jsonl(os.path.join(workdir, "samples.jsonl"))
  assert [s["step"] for s in samples] == [1, 2, 3, 4]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    f.write('{"step": 5, "prompt": "torn')  # a write cut by the kill
  records = train.train_and_evaluate(tiny_config(RUN), workdir)
  assert read_jsonl(os.path.join(workdir, "samples.jsonl")) == samples
  assert training_records(records) == training_records(finished[1])
  assert [r["step"] for r in metrics_io.read_metrics(workdir)] == [1, 2, 3, 4]


# -- signals: checkpoint, stop, and say so in the exit code --------------------------------
def test_sigint_checkpoints_and_exits_130(tmp_path, compile_cache):  # noqa: F811
  """With train.checkpoint_every = 0 the only checkpoint is the one the signal asks for."""
  workdir = str(tmp_path / "run")
  flags = cli_args(workdir, {"train.steps": 20, "train.checkpoint_every": 0,
                             "eval.num_problems": 0})
  rc, log = signal_mid_run(workdir, flags, signal.SIGINT, tmp_path, compile_cache)
  assert rc == 130, log[-3000:]
  last = metrics_io.read_metrics(workdir)[-1]["step"]
  assert f"SIGINT: checkpointed step {last}, stopping" in log
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(last)]


# -- start-up errors: one line, nothing created ----------------------------------------------
@pytest.mark.parametrize("flag, message", [
    ("--config.mesh.data=3", "they multiply to 3, not the 1 devices"),
    ("--config.model.name=gpt-17", "config.model.name='gpt-17': unknown model 'gpt-17'"),
    ("--config.model.name={bad_gguf}", "{bad_gguf} is not a readable GGUF file"),
    ("--config.eval.prompts_per_batch=-1", "config.eval.prompts_per_batch=-1 must be >= 1"),
    ("--config.eval.num_problems=-5", "config.eval.num_problems=-5 must be >= 0"),
    ("--config.train.checkpoint_every=-1", "config.train.checkpoint_every=-1 must be >= 0"),
])
def test_start_up_error_is_one_line_and_creates_nothing(flag, message, tmp_path,
                                                        compile_cache):  # noqa: F811
  bad_gguf = tmp_path / "model.gguf"
  bad_gguf.write_bytes(b"not a gguf file, cut short")
  workdir = tmp_path / "run"
  proc = run_cli([f"--config={TINY}", f"--workdir={workdir}", flag.format(bad_gguf=bad_gguf)],
                 subprocess_env(compile_cache))
  assert proc.returncode != 0
  assert message.format(bad_gguf=bad_gguf) in error_line(proc.stderr)
  assert not os.path.exists(workdir)


def test_workdir_that_is_a_file_is_a_one_line_error(tmp_path, compile_cache):  # noqa: F811
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  proc = run_cli([f"--config={TINY}", f"--workdir={path}"], subprocess_env(compile_cache))
  assert proc.returncode != 0
  assert f"--workdir={path} is a file, not a directory" in error_line(proc.stderr)
  assert path.read_text() == "mine"
