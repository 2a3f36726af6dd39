"""Training loop tests on the tiny config: a step's effect and metrics, sharded = one device,
exact resume (restart and SIGTERM), config errors, the reward rising, loading a workdir.

The runs compile the same few programs again and again (every run jits its
own update step); a persistent compilation cache shared by this module's runs
and subprocesses turns each re-compile (~8 s on 2 cores) into a load (~0.1 s).
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from grpo_jax import checkpointing, config as config_lib, metrics_io, models, train
from grpo_jax.generate import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_arithmetic.py")
# 20 steps, constant learning rate, no evaluation: a run's records do not depend on
# train.steps, so a 10-step run resumed to 20 and a 2-step sharded run are comparable.
RUN = {"train.steps": 20, "eval.num_problems": 0, "opt.schedule": "constant",
       "opt.warmup_steps": 0}
LR = 3e-3  # the tiny config's
TRAIN_KEYS = ["loss", "reward", "reward_std", "rewards/accuracy/mean", "rewards/tag_count/mean",
              "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
              "completions/clipped_ratio", "grad_norm", "learning_rate", "time/step_s",
              "time/sample_s", "time/update_s"]


def tiny_config(overrides):
  """configs/tiny_arithmetic.py with {"section.key": value} overrides (new keys allowed)."""
  cfg = config_lib.from_file(TINY)
  for key, value in overrides.items():
    *sections, leaf = key.split(".")
    node = cfg
    for section in sections:
      node = node[section]
    node[leaf] = value
  return cfg


def cli_args(workdir, overrides):
  return [f"--config={TINY}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def training_records(records):
  """Records of training steps without their wall-clock times (which never repeat)."""
  return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records
          if "loss" in r]


def saved_params(workdir, step=None) -> dict:
  """{name: array} of a checkpoint's params, read as saved (no target structure)."""
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    state, _ = ckpt.restore(step)
  return {name: np.asarray(leaf["value"]) for name, leaf in state["params"].items()}


def model_params(model) -> dict:
  return {name: np.asarray(x) for name, x in models.params_dict(model).items()}


def initial_params() -> dict:
  return model_params(models.load("tiny-random")[0])  # a fixed-seed init: the runs' start


def assert_params_equal(a, b):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module; restored to the previous one after."""
  path = str(tmp_path_factory.mktemp("compile_cache"))
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # the cache is set up once per process, at its first use
  yield path
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
  compilation_cache.reset_cache()


def subprocess_env(compile_cache, devices=1):
  return dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=compile_cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_cli(args, env, module="grpo_jax.main", timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


# -- two steps with a reference model and evaluation ------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("short"))
  cfg = tiny_config({"train.steps": 2, "rl.beta": 0.04, "eval.num_problems": 4,
                     "eval.prompts_per_batch": 4})
  t = time.perf_counter()
  records = train.train_and_evaluate(cfg, workdir)
  _SHORT_RUN_WALL_S.append(time.perf_counter() - t)
  return workdir, records


_SHORT_RUN_WALL_S = []


def test_step_times_do_not_count_overlapping_work_twice(short_run):
  # The update of step s runs while step s + 1 starts: the steps' times add up to no more
  # than the run's wall clock.
  _, records = short_run
  steps = [r["time/step_s"] for r in records if "time/step_s" in r]
  assert len(steps) == 2 and sum(steps) <= _SHORT_RUN_WALL_S[0]


def test_steps_change_every_param_by_adam_sized_updates(short_run):
  workdir, _ = short_run
  start, trained = initial_params(), saved_params(workdir)
  assert start.keys() == trained.keys()
  for name in start:
    change = np.abs(trained[name] - start[name]).max()
    # Two Adam steps move a weight by at most ~2 lr, and every weight gets a gradient.
    assert 0 < change <= 2.5 * LR, (name, change)


def test_metrics_jsonl_has_every_key_finite_and_consistent(short_run):
  workdir, records = short_run
  on_disk = metrics_io.read_metrics(workdir)
  assert on_disk == records
  assert [r["step"] for r in on_disk] == [0, 1, 2]
  first, second = training_records(on_disk)
  max_entropy = math.log(len(models.load("tiny-random")[1]))  # uniform over the vocabulary
  for rec in (on_disk[1], on_disk[2]):
    for key in TRAIN_KEYS:
      assert key in rec and math.isfinite(rec[key]), key
    assert rec["reward"] == pytest.approx(
        rec["rewards/accuracy/mean"] + rec["rewards/tag_count/mean"], abs=1e-6)
    assert rec["learning_rate"] == pytest.approx(LR)
    assert 1 <= rec["completions/mean_length"] <= 16  # rl.max_completion_length
    assert 0 <= rec["completions/clipped_ratio"] <= 1 and 0 <= rec["frac_reward_zero_std"] <= 1
    assert 0 < rec["entropy"] <= max_entropy
    assert rec["grad_norm"] > 0 and rec["reward_std"] >= 0
    # One update per rollout: the policy is the sampling policy, the ratio is 1, nothing clips.
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
      assert rec[key] == 0
    # The sampler's log-probs (KV-cache decoding) against the update's forward, every step:
    # the same fp32 policy, so only rounding apart.
    assert 0 <= rec["mismatch/mean_abs_log_ratio"] <= rec["mismatch/max_abs_log_ratio"] < 1e-3
    assert abs(rec["mismatch/kl"]) < 1e-6
    assert rec["time/step_s"] >= rec["time/sample_s"] + rec["time/update_s"] > 0
  # The reference is the initial policy: no KL at the first step, some after an update.
  assert abs(first["kl"]) < 1e-6 and second["kl"] > 1e-7
  for step in (0, 2):  # before the first step and after the last
    assert 0 <= on_disk[step]["eval/pass@1"] <= 1 and "eval/maj@2" in on_disk[step]
    assert on_disk[step]["eval/num_problems"] == 4


def test_load_workdir_gives_the_latest_checkpoint_params(short_run, tmp_path):
  workdir, _ = short_run
  assert models.resolve(workdir) == ("workdir", workdir)
  model, tokenizer = models.load(workdir)
  loaded = model_params(model)
  assert_params_equal(loaded, saved_params(workdir, step=2))
  assert any(not np.array_equal(loaded[k], v) for k, v in initial_params().items())
  assert len(tokenizer) == len(models.load("tiny-random")[1])
  # The compute dtype is the run's config.model.dtype unless the caller names one.
  shutil.copytree(workdir, tmp_path / "bf16")
  with open(tmp_path / "bf16" / "config.json") as f:
    run_config = json.load(f)
  run_config["model"]["dtype"] = "bfloat16"
  with open(tmp_path / "bf16" / "config.json", "w") as f:
    json.dump(run_config, f)
  assert models.load(str(tmp_path / "bf16"))[0].dtype == jnp.bfloat16
  assert models.load(str(tmp_path / "bf16"), dtype="float32")[0].dtype == jnp.float32
  assert model.dtype == jnp.float32


def test_generate_cli_on_a_workdir_prints_the_trained_models_text(short_run, compile_cache):
  workdir, _ = short_run
  prompt = "What is 3 + 4?"
  # --nochat: the run trained on the plain template (raw text); the CLI's default is chat.
  proc = run_cli([f"--model={workdir}", f"--prompt={prompt}", "--max_new_tokens=8", "--nochat"],
                 subprocess_env(compile_cache), module="grpo_jax.generate")
  assert proc.returncode == 0, proc.stderr[-3000:]
  expected = generate(*models.load(workdir), prompt, max_new_tokens=8)  # greedy
  assert proc.stdout == expected + "\n" and expected.strip()


# -- 20 steps: the reward rises; resume and preemption repeat them exactly ---------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  records = train.train_and_evaluate(tiny_config(RUN), workdir)
  return workdir, records


def test_reward_rises(full_run):
  _, records = full_run
  reward = [r["reward"] for r in records]
  assert len(reward) == 20
  # seed 0: ~0.14 -> ~0.35, from the tag_count reward (a random model gets no sums right)
  assert np.mean(reward[-5:]) > np.mean(reward[:5]) + 0.1, reward


@pytest.mark.slow
def test_restart_resumes_exactly(full_run, tmp_path):
  workdir = str(tmp_path)
  first = train.train_and_evaluate(tiny_config(dict(RUN, **{"train.steps": 10})), workdir)
  train.train_and_evaluate(tiny_config(RUN), workdir)
  records = metrics_io.read_metrics(workdir)
  # Resumed, not redone: the first run's records are kept as they were, times included.
  assert records[:10] == first
  assert training_records(records) == training_records(full_run[1])
  assert_params_equal(saved_params(workdir), saved_params(full_run[0]))


# The training CLI with ~0.3 s steps, so that a signal lands mid-run.
_SLOW_MAIN = textwrap.dedent("""
  import sys, time
  from absl import app
  from grpo_jax import main, runner

  write = runner.Log.write
  def slow_write(*args, **kwargs):
    recorded = write(*args, **kwargs)
    time.sleep(0.3)
    return recorded
  runner.Log.write = slow_write
  app.run(main.main, argv=sys.argv)
""")


def signal_mid_run(workdir, args, signum, tmp_path, compile_cache) -> tuple[int, str]:
  """Runs the slowed CLI with `args`, sends `signum` once two steps are logged; (rc, stderr)."""
  with open(tmp_path / "stderr.txt", "w") as stderr:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MAIN, *args],
                            env=subprocess_env(compile_cache), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 240
    while len(metrics_io.read_metrics(workdir)) < 2 and proc.poll() is None:
      assert time.time() < deadline, "no training steps within 240 s"
      time.sleep(0.05)
    proc.send_signal(signum)
    rc = proc.wait(timeout=120)
  return rc, (tmp_path / "stderr.txt").read_text()


@pytest.mark.slow
def test_sigterm_checkpoints_the_last_step_and_restart_finishes_exactly(full_run, tmp_path,
                                                                        compile_cache):
  workdir = str(tmp_path / "run")
  rc, log = signal_mid_run(workdir, cli_args(workdir, RUN), signal.SIGTERM, tmp_path,
                           compile_cache)
  assert rc == 128 + signal.SIGTERM, log[-3000:]  # 143: stopped by the signal, as a shell says
  last = metrics_io.read_metrics(workdir)[-1]["step"]
  assert 2 <= last < 20
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    assert ckpt.latest_step() == last
  assert f"checkpointed step {last}, stopping" in log

  train.train_and_evaluate(tiny_config(RUN), workdir)
  assert training_records(metrics_io.read_metrics(workdir)) == training_records(full_run[1])
  assert_params_equal(saved_params(workdir), saved_params(full_run[0]))


@pytest.mark.slow
def test_2x2x2_mesh_on_8_devices_matches_one_device(full_run, tmp_path, compile_cache):
  overrides = dict(RUN, **{"train.steps": 2, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  proc = run_cli(cli_args(tmp_path, overrides), subprocess_env(compile_cache, devices=8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  sharded = training_records(metrics_io.read_metrics(tmp_path))
  single = training_records(full_run[1])[:2]
  assert [r.keys() for r in sharded] == [r.keys() for r in single]
  for got, want in zip(sharded, single):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


# -- config errors, each with the message that says what to change -----------------------
@pytest.mark.parametrize("overrides, message", [
    ({"rl.num_generations": 1}, "num_generations=1: GRPO needs at least 2 completions"),
    ({"train.grad_accum_steps": 3},
     "prompts_per_step=4 must be divisible by config.train.grad_accum_steps=3"),
    ({"rewards": [("accuracy", 1.0), ("acuracy", 0.5)]}, "unknown reward 'acuracy'"),
    ({"task.name": "arithmetc"}, "config.task.name='arithmetc': unknown task"),
    ({"rl.betta": 0.1}, "unknown config key config.rl.betta; did you mean config.rl.beta?"),
])
def test_validate_rejects_with_message(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("?", r"\?")):
    config_lib.validate(tiny_config(overrides))


def test_train_rejects_a_bad_config_before_touching_the_workdir(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="num_generations"):
    train.train_and_evaluate(tiny_config({"rl.num_generations": 1}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_train_rejects_prompt_plus_completion_beyond_the_context(tmp_path):
  cfg = tiny_config({"rl.max_prompt_length": 1000, "rl.max_completion_length": 100})
  config_lib.validate(cfg)  # fine without the model
  with pytest.raises(config_lib.ConfigError, match="= 1100 is longer than the model's context "
                                                   "of 1024 tokens"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_mesh_that_does_not_multiply_to_the_devices():
  with pytest.raises(config_lib.ConfigError, match=r"they multiply to 3, not the 1 devices"):
    config_lib.make_mesh(tiny_config({"mesh.data": 3}))


def test_batch_not_divisible_by_the_batch_shards(tmp_path, compile_cache):
  # 8 devices, data=-1: 8 batch shards for 4 prompts.
  proc = run_cli(cli_args(tmp_path, {"mesh.data": -1}), subprocess_env(compile_cache, devices=8))
  assert proc.returncode != 0
  assert ("4 prompts per micro-batch is not divisible by the 8 batch shards "
          "(config.mesh.data x fsdp = 8 x 1)") in proc.stderr
  assert "loading model" not in proc.stderr


@pytest.mark.parametrize("flag, message", [
    ("--config.rl.num_generations=1", "num_generations=1: GRPO needs at least 2 completions"),
    ("--config.rl.betta=0.1", "unknown config key config.rl.betta; did you mean config.rl.beta?"),
])
def test_cli_rejects_a_bad_config_before_loading_a_model(flag, message, tmp_path, compile_cache):
  proc = run_cli([f"--config={TINY}", f"--workdir={tmp_path / 'run'}", flag],
                 subprocess_env(compile_cache))
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "run")


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two_processes(workdir, overrides, compile_cache):
  """The CLI as two processes (jax.distributed on 127.0.0.1, one CPU device each)."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "grpo_jax.main", *cli_args(workdir, overrides),
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"],
                            cwd=REPO, env=subprocess_env(compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  logs = []
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    logs.append(err)
  return logs


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices_and_resume(tmp_path,
                                                                          compile_cache):
  """Multi-host: two processes (the mesh's data axis across them, each sampling and scoring
  its own prompts) give the metrics and params of one process with two devices, through a
  checkpoint, a stop and a restart of both processes."""
  overrides = dict(RUN, **{"train.steps": 2, "eval.num_problems": 8})
  single = run_cli(cli_args(tmp_path / "one", overrides), subprocess_env(compile_cache, devices=2))
  assert single.returncode == 0, single.stderr[-3000:]
  _launch_two_processes(tmp_path / "two", dict(overrides, **{"train.steps": 1}), compile_cache)
  logs = _launch_two_processes(tmp_path / "two", overrides, compile_cache)
  assert "resumed from step 1" in logs[0] and "resumed from step 1" in logs[1]

  one = metrics_io.read_metrics(str(tmp_path / "one"))
  two = metrics_io.read_metrics(str(tmp_path / "two"))
  assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2]
  assert "eval/pass@1" in one[0] and "eval/pass@1" in one[2] and "reward" in one[1]
  for a, b in zip(one, two):
    for key, value in a.items():  # step 1 of the stopped run also has an eval: not compared
      if not key.startswith("time/"):
        assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  # Read back on this process's single device, whatever topology saved them.
  want = model_params(models.load(str(tmp_path / "one"))[0])
  got = model_params(models.load(str(tmp_path / "two"))[0])
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(tmp_path, compile_cache):
  """Multi-host preemption: SIGTERM reaches one host only (as a scheduler may send it); JAX's
  preemption service makes both agree on a step, both checkpoint it and stop."""
  workdir = tmp_path / "run"
  port = _free_port()
  logs = [open(tmp_path / f"stderr{i}.txt", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", _SLOW_MAIN, *cli_args(workdir, RUN),
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=REPO, env=subprocess_env(compile_cache),
                            stdout=subprocess.DEVNULL, stderr=logs[i]) for i in range(2)]
  try:
    deadline = time.time() + 240
    while len(metrics_io.read_metrics(str(workdir))) < 2 and procs[0].poll() is None:
      assert time.time() < deadline, "no training steps within 240 s"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
    for f in logs:
      f.close()
  texts = [(tmp_path / f"stderr{i}.txt").read_text() for i in range(2)]
  # Both stopped because of the signal, so both say so, though only one received it.
  assert codes == [143, 143], texts[0][-2000:] + texts[1][-2000:]
  stopped = [re.findall(r"checkpointed step (\d+), stopping", t) for t in texts]
  assert len(stopped[0]) == len(stopped[1]) == 1, stopped
  step = int(stopped[0][0])
  assert int(stopped[1][0]) == step and 2 <= step < RUN["train.steps"]
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    assert ckpt.latest_step() == step
  assert metrics_io.read_metrics(str(workdir))[-1]["step"] == step


def test_cli_stops_at_start_up_when_the_run_cannot_fit_in_device_memory(tmp_path, compile_cache):
  proc = run_cli(cli_args(tmp_path / "run", {"train.device_memory_gb": 0.001}),
                 subprocess_env(compile_cache))
  assert proc.returncode != 0
  # XLA's memory analysis of the compiled programs (CPU has one), not the estimate, decides.
  assert "XLA's memory analysis of the compiled program), more than the 0.00 GiB a device has" \
      in proc.stderr, proc.stderr[-3000:]
  assert "temporaries" in proc.stderr and "config.train.grad_accum_steps" in proc.stderr
  assert not os.path.exists(tmp_path / "run")  # nothing is written before the checks pass


@pytest.mark.parametrize("env, detected", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, False),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, True),  # a pod slice of 4 workers
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "16"}, True),
])
def test_plain_command_detects_a_multi_host_cluster(env, detected):
  """No flags: jax.distributed.initialize() (auto-detecting) runs only on a TPU slice of
  several workers or a Slurm job of several tasks."""
  from grpo_jax import main

  assert main._cluster_detected(env) == detected


def test_policy_as_judge_reward_ranks_each_group(tmp_path):
  """config.rewards with "judge": the policy ranks its own G answers; rank rewards average
  exactly 0.5 in every group whatever the scores, and the run trains on them."""
  cfg = tiny_config(dict(RUN, **{"train.steps": 2, "rewards": [("accuracy", 1.0), ("judge", 1.0)],
                                 "judge.template": "plain"}))
  records = train.train_and_evaluate(cfg, str(tmp_path))
  steps = training_records(records)
  assert len(steps) == 2
  for rec in steps:
    assert rec["rewards/judge/mean"] == pytest.approx(0.5, abs=1e-6)
    assert rec["reward"] == pytest.approx(rec["rewards/accuracy/mean"] + 0.5, abs=1e-6)


def test_unknown_judge_template_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="config.judge.template='html'"):
    config_lib.validate(tiny_config({"judge.template": "html"}))
