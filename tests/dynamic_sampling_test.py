"""DAPO's dynamic sampling (config.rl.dynamic_sampling): the batch-filling rule on small arrays,
and training runs of the tiny config with rewards that decide which groups are informative.

Rewards used here: "odd_only" scores an answer by its text (almost surely a spread) when the
problem's answer is odd, and 0 for every answer of an even one (a group whose rewards all agree);
"constant" gives every answer 1 (no group is informative); "text_hash" always spreads.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from grpo_jax import (advantages, checkpointing, config as config_lib, dynamic_sampling,
                      metrics_io, rewards, sampling, sharding, train)
from grpo_jax.data import format_prompt, get_task
from tests.train_test import (REPO, RUN, _free_port, assert_params_equal, cli_args,
                              compile_cache, saved_params, subprocess_env, tiny_config,
                              training_records)

compile_cache = compile_cache  # train_test's autouse fixture: this module's runs share a cache

B, G = 4, 8  # the tiny config's prompts_per_step and num_generations
SCORED_PROMPTS = []  # every prompt the rewards were asked about, one per group, in order


def _text_value(completion) -> float:
  return float(sum(map(ord, rewards.completion_text(completion))) % 97)


def odd_only(prompts, completions, answer, **unused):
  SCORED_PROMPTS.extend(prompts[::G])
  return [_text_value(c) if int(a) % 2 else 0.0 for c, a in zip(completions, answer)]


def constant(prompts, completions, **unused):
  SCORED_PROMPTS.extend(prompts[::G])
  return [1.0] * len(completions)


def text_hash(prompts, completions, **unused):
  return [_text_value(c) for c in completions]


@pytest.fixture(scope="module", autouse=True)
def test_rewards():
  added = {"odd_only": odd_only, "constant": constant, "text_hash": text_hash}
  rewards.REWARD_FUNCTIONS.update(added)
  yield
  for name in added:
    del rewards.REWARD_FUNCTIONS[name]


def data_position(workdir) -> int:
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    return ckpt.restore()[1]["data_position"]


def task_prompts(cfg, stop: int) -> list[str]:
  """The prompt texts of the task's examples [0, stop), as the training loop writes them."""
  task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  return [format_prompt(ex, cfg.task.template, None) for ex in task.train_batch(0, stop)]


# -- the rule, on small arrays --------------------------------------------------------------
def test_informative_is_the_complement_of_the_zero_advantage_groups():
  r_BxG = np.array([[1, 1, 1, 1], [0, 1, 0, 0], [np.nan, 2, 2, np.nan], [np.nan, 3, np.nan, np.nan],
                    [5, np.nan, 6, 5], [0, 0, 0, 0]], np.float32)
  got = dynamic_sampling.informative(r_BxG.reshape(-1), 4)
  np.testing.assert_array_equal(got, [False, True, False, False, True, False])
  adv = np.asarray(advantages.group_advantages(r_BxG.reshape(-1), 4)).reshape(r_BxG.shape)
  np.testing.assert_array_equal(got, (adv != 0).any(axis=1))
  frac = float(advantages.reward_metrics(r_BxG.reshape(-1), 4)["frac_reward_zero_std"])
  assert frac == pytest.approx(1 - got.mean())


def _rollout(batch_sh, rewards_BxG, first_position, tag):
  """A fake rollout: completion row i's tokens are tag * 1000 + i, its lengths i."""
  n, t = rewards_BxG.size, 3
  ids = tag * 1000 + np.arange(n, dtype=np.int32)
  out = sampling.Completions(
      tokens=np.repeat(ids[:, None], t, axis=1), mask=np.ones((n, t), np.int32),
      logps=np.repeat(ids[:, None], t, axis=1).astype(np.float32), lengths=ids,
      truncated=np.zeros(n, bool))
  out = jax.device_put(out, batch_sh)
  whole = {"scores": rewards_BxG.reshape(-1, 1), "lengths": ids, "truncated": np.zeros(n, bool),
           "errors": np.zeros((1, 1), np.int64)}
  return dynamic_sampling.Rollout(out, whole, rewards_BxG.reshape(-1).astype(np.float32),
                                  first_position + np.arange(len(rewards_BxG)))


@pytest.fixture(scope="module")
def batch_sh():
  return sharding.batch_sharding(sharding.make_mesh(1, 1, 1))


def test_refill_puts_new_informative_groups_in_the_empty_places_in_order(batch_sh):
  same, spread = [2, 2], [0, 1]
  kept = _rollout(batch_sh, np.array([same, spread, same, same], np.float32), 0, tag=1)
  new = _rollout(batch_sh, np.array([spread, same, [3, 4], [5, 6]], np.float32), 4, tag=2)
  got = dynamic_sampling.refill(kept, new, num_generations=2, sharding=batch_sh)
  # Places 0, 2 and 3 were uninformative; new groups 0, 2 and 3 are informative: in order.
  np.testing.assert_array_equal(got.positions, [4, 1, 6, 7])
  np.testing.assert_array_equal(got.reward, [0, 1, 0, 1, 3, 4, 5, 6])
  want_rows = [2000, 2001, 1002, 1003, 2004, 2005, 2006, 2007]
  np.testing.assert_array_equal(np.asarray(got.out.tokens)[:, 0], want_rows)
  np.testing.assert_array_equal(np.asarray(got.out.logps)[:, 2], want_rows)
  np.testing.assert_array_equal(np.asarray(got.out.lengths), want_rows)
  np.testing.assert_array_equal(got.whole["lengths"], want_rows)
  np.testing.assert_array_equal(got.whole["scores"][:, 0], got.reward)
  assert got.whole["errors"].shape == (2, 1)
  # Fewer new informative groups than places: the first places are filled, the rest stay.
  few = _rollout(batch_sh, np.array([same, same, same, [7, 8]], np.float32), 8, tag=3)
  again = dynamic_sampling.refill(kept, few, num_generations=2, sharding=batch_sh)
  np.testing.assert_array_equal(again.positions, [11, 1, 2, 3])
  np.testing.assert_array_equal(again.reward, [7, 8, 0, 1, 2, 2, 2, 2])


def test_fill_samples_until_full_or_the_cap(batch_sh):
  same, spread = [2, 2], [0, 1]
  first = _rollout(batch_sh, np.array([same, spread, same, same], np.float32), 0, tag=1)
  later = {1: [same, same, same, spread], 2: [spread, spread, same, same], 3: [spread] * 4}
  asked = []

  def sample(r):
    asked.append(r)
    return _rollout(batch_sh, np.array(later[r], np.float32), 4 * r, tag=1 + r)

  batch, metrics = dynamic_sampling.fill(first, sample, num_generations=2, max_rounds=5,
                                         sharding=batch_sh)
  assert asked == [1, 2]  # full after two more rollouts: the third is never sampled
  np.testing.assert_array_equal(batch.positions, [7, 1, 8, 9])
  assert metrics == {"dynamic_sampling/groups_sampled": 12,
                     "dynamic_sampling/groups_informative": 4, "dynamic_sampling/groups_kept": 4,
                     "dynamic_sampling/extra_rollouts": 2, "dynamic_sampling/cap_hit": 0}
  asked.clear()
  batch, metrics = dynamic_sampling.fill(first, sample, num_generations=2, max_rounds=1,
                                         sharding=batch_sh)
  assert asked == [1]
  np.testing.assert_array_equal(batch.positions, [7, 1, 2, 3])
  assert metrics["dynamic_sampling/groups_kept"] == 2 and metrics["dynamic_sampling/cap_hit"] == 1
  batch, metrics = dynamic_sampling.fill(first, sample, num_generations=2, max_rounds=0,
                                         sharding=batch_sh)
  assert batch is first and metrics["dynamic_sampling/extra_rollouts"] == 0


def test_validate_rejects_a_negative_cap():  # ConfigDict itself rejects values of other types
  with pytest.raises(config_lib.ConfigError, match="config.rl.max_dynamic_sampling_rounds=-1 "
                                                   "must be an integer >= 0"):
    config_lib.validate(tiny_config({"rl.max_dynamic_sampling_rounds": -1}))


# -- training runs ---------------------------------------------------------------------------
DYNAMIC = dict(RUN, **{"rl.dynamic_sampling": True, "rl.max_dynamic_sampling_rounds": 8,
                       "rewards": [("odd_only", 1.0)], "train.steps": 4,
                       "train.checkpoint_every": 2})


def run(overrides, workdir):
  SCORED_PROMPTS.clear()
  cfg = tiny_config(overrides)
  records = train.train_and_evaluate(cfg, str(workdir))
  return cfg, records, list(SCORED_PROMPTS)


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dynamic")
  return (str(workdir), *run(DYNAMIC, workdir))


def test_dynamic_sampling_trains_only_on_informative_groups(dynamic_run):
  workdir, cfg, records, scored = dynamic_run
  steps = training_records(records)
  assert len(steps) == 4 and all(r["time/dynamic_sampling_s"] > 0 for r in records)
  answers = [int(ex["answer"]) for ex in get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
             .train_batch(0, len(scored))]
  sampled = 0
  for rec in steps:
    n = int(rec["dynamic_sampling/groups_sampled"])
    assert n == B * (1 + rec["dynamic_sampling/extra_rollouts"])
    # The prompts the step consumed, with even answers (all-zero groups) left out.
    informative = sum(a % 2 for a in answers[sampled:sampled + n])
    assert rec["dynamic_sampling/groups_informative"] == informative >= B
    assert rec["dynamic_sampling/groups_kept"] == B and rec["dynamic_sampling/cap_hit"] == 0
    # The reward metrics are those of the kept batch: every group has a spread.
    assert rec["frac_reward_zero_std"] == 0 and rec["reward_std"] > 0
    sampled += n
  assert sum(r["dynamic_sampling/extra_rollouts"] for r in steps) >= 2  # the rule did work
  # Every prompt consumed was scored once, in the data stream's order; checkpoints keep the count.
  assert scored == task_prompts(cfg, sampled)
  assert data_position(workdir) == sampled
  # The logged group is one the update trained on: its rewards differ.
  with open(os.path.join(workdir, metrics_io.SAMPLES_FILE)) as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 4
  for sample in samples:
    assert len({c["reward"] for c in sample["completions"]}) > 1


def test_dynamic_sampling_run_resumes_exactly(dynamic_run, tmp_path):
  workdir, _, records, scored = dynamic_run
  first = run(dict(DYNAMIC, **{"train.steps": 2}), tmp_path)[2]
  assert 0 < data_position(str(tmp_path)) < data_position(workdir)
  _, _, rest = run(DYNAMIC, tmp_path)
  # The resumed run starts at the saved data position: together they scored what one run did.
  assert first + rest == scored
  assert training_records(metrics_io.read_metrics(str(tmp_path))) == training_records(records)
  assert_params_equal(saved_params(str(tmp_path)), saved_params(workdir))


def test_cap_is_respected_reported_and_warned_once(tmp_path, caplog):
  overrides = dict(DYNAMIC, **{"rewards": [("constant", 1.0)], "train.steps": 2,
                               "rl.max_dynamic_sampling_rounds": 2})
  with caplog.at_level(logging.WARNING, logger="grpo_jax"):
    cfg, records, scored = run(overrides, tmp_path)
  for rec in training_records(records):
    assert rec["dynamic_sampling/extra_rollouts"] == 2 and rec["dynamic_sampling/cap_hit"] == 1
    assert rec["dynamic_sampling/groups_sampled"] == 3 * B
    assert rec["dynamic_sampling/groups_kept"] == rec["dynamic_sampling/groups_informative"] == 0
    assert rec["frac_reward_zero_std"] == 1 and rec["reward"] == 1
  assert scored == task_prompts(cfg, 2 * 3 * B) and data_position(str(tmp_path)) == 2 * 3 * B
  warnings = [r.message for r in caplog.records if "dynamic sampling" in r.getMessage()]
  assert len(warnings) == 1
  assert ("step 1 has 0 informative groups of 4 after 2 more rollouts "
          "(rl.max_dynamic_sampling_rounds)") in caplog.text


def test_with_every_group_informative_it_changes_nothing_but_the_metrics(tmp_path):
  """text_hash gives every group a spread: the first rollout is kept whole, so the run is the
  one without dynamic sampling, plus its metrics; turned off, there are none of them."""
  base = dict(RUN, **{"rewards": [("text_hash", 1.0)], "train.steps": 2})
  _, off, _ = run(base, tmp_path / "off")
  _, on, _ = run(dict(base, **{"rl.dynamic_sampling": True}), tmp_path / "on")
  off, on = training_records(off), training_records(on)
  assert not any(k.startswith("dynamic_sampling/") for rec in off for k in rec)
  for rec in on:
    assert rec.pop("dynamic_sampling/groups_sampled") == B
    assert rec.pop("dynamic_sampling/groups_informative") == B
    assert rec.pop("dynamic_sampling/groups_kept") == B
    assert rec.pop("dynamic_sampling/extra_rollouts") == 0
    assert rec.pop("dynamic_sampling/cap_hit") == 0
  assert on == off
  assert_params_equal(saved_params(str(tmp_path / "on")), saved_params(str(tmp_path / "off")))
  assert data_position(str(tmp_path / "off")) == data_position(str(tmp_path / "on")) == 2 * B


# The training CLI with this module's rewards registered.
_MAIN = """
import sys
from absl import app
from grpo_jax import main, rewards
from tests import dynamic_sampling_test
rewards.REWARD_FUNCTIONS["odd_only"] = dynamic_sampling_test.odd_only
app.run(main.main, argv=sys.argv, flags_parser=main._parse_flags)
"""


@pytest.mark.slow
def test_two_processes_sample_dynamically_like_one(tmp_path, compile_cache):
  """Multi-host: each process scores its own rows of every rollout, and the groups that move
  into the batch may come from the other process's rows; the run is the one of a single
  process with two devices."""
  overrides = {"train.steps": 2, "eval.num_problems": 0, "rl.dynamic_sampling": True,
               "rewards": "odd_only:1"}
  single = subprocess.run([sys.executable, "-c", _MAIN, *cli_args(tmp_path / "one", overrides)],
                          env=subprocess_env(compile_cache, devices=2), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _MAIN, *cli_args(tmp_path / "two", overrides),
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=REPO, env=subprocess_env(compile_cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  one = training_records(metrics_io.read_metrics(str(tmp_path / "one")))
  two = training_records(metrics_io.read_metrics(str(tmp_path / "two")))
  assert sum(r["dynamic_sampling/extra_rollouts"] for r in one) >= 1  # groups did move
  assert [r.keys() for r in two] == [r.keys() for r in one]
  for a, b in zip(one, two):
    for key, value in a.items():
      assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
