"""PPO training (config.rl.advantage_estimator="gae") on the tiny config: the critic trains and
is checkpointed with the run, value metrics are logged, a resumed run repeats an uninterrupted
one exactly (critic included), GRPO runs build no critic, and PPO's config errors.

The PPO run uses the InstructGPT KL in the reward (rl.kl_in_reward), two epochs per rollout
and two micro-batches, so each of those paths runs.
"""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import (advantages, checkpointing, compiled, config as config_lib, critic, grpo,
                      metrics_io, models, ppo, sharding, train)
from tests.train_test import (RUN, assert_params_equal, cli_args, compile_cache,
                              initial_params, model_params, run_cli, saved_params,
                              subprocess_env, tiny_config,
                              training_records)

compile_cache = compile_cache  # train_test's autouse fixture: this module's runs share a cache

PPO = dict(RUN, **{"train.steps": 4, "train.checkpoint_every": 2, "rl.advantage_estimator": "gae",
                   "rl.beta": 0.05, "rl.kl_in_reward": True, "rl.num_iterations": 2,
                   "train.grad_accum_steps": 2})
VALUE_KEYS = ("value/loss", "value/clip_fraction", "value/mean", "value/returns_mean",
              "value/explained_variance", "value/grad_norm", "value/advantages_mean")


def saved_state(workdir, step=None) -> dict:
  """The checkpoint's whole state tree, read as saved."""
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    state, _ = ckpt.restore(step)
  return state


def flat(tree) -> dict:
  """{"a/b/c": array} of a nested dict of arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in leaves}


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ppo"))
  return workdir, train.train_and_evaluate(tiny_config(PPO), workdir)


def test_ppo_trains_the_policy_and_the_critic(ppo_run):
  workdir, records = ppo_run
  state = saved_state(workdir)
  assert set(state) == {"params", "opt_state", "critic"}
  assert set(state["critic"]) == {"params", "opt_state"}
  start, policy = initial_params(), saved_params(workdir)
  assert any(not np.array_equal(policy[k], start[k]) for k in start)
  values = flat(state["critic"]["params"])
  head, embed = values["value_head/value"], values["trunk/embed/value"]
  assert head.shape == (embed.shape[1], 1)
  assert np.abs(head).max() > 0  # zero at the start: it trained
  # The trunk started as a copy of the initial policy and trained apart from it.
  assert embed.shape == start["embed"].shape
  assert not np.array_equal(embed, start["embed"]) and not np.array_equal(embed, policy["embed"])
  assert not any(k.startswith("trunk/lm_head") for k in values)  # no LM head in a critic


def test_ppo_logs_finite_value_metrics(ppo_run):
  _, records = ppo_run
  recs = training_records(records)
  assert len(recs) == 4
  for rec in recs:
    for key in (*VALUE_KEYS, "loss", "kl", "grad_norm"):
      assert key in rec and math.isfinite(rec[key]), (key, rec)
    assert rec["value/loss"] >= 0 and 0 <= rec["value/clip_fraction"] <= 1
    assert rec["value/grad_norm"] > 0
  # The critic's head starts at 0, so its values move off 0 only by training.
  assert any(abs(r["value/mean"]) > 1e-4 for r in recs)
  # KL in the reward: the sampler's policy against the reference, 0 before the first update.
  assert abs(recs[0]["kl"]) < 1e-6 and recs[-1]["kl"] > 1e-7
  assert metrics_io.read_metrics(ppo_run[0]) == records


def test_ppo_resume_repeats_the_uninterrupted_run_exactly(ppo_run, tmp_path):
  workdir = str(tmp_path)
  first = train.train_and_evaluate(tiny_config(dict(PPO, **{"train.steps": 2})), workdir)
  assert len(training_records(first)) == 2
  train.train_and_evaluate(tiny_config(PPO), workdir)
  records = metrics_io.read_metrics(workdir)
  assert training_records(records) == training_records(ppo_run[1])
  assert_params_equal(saved_params(workdir), saved_params(ppo_run[0]))
  resumed, straight = saved_state(workdir), saved_state(ppo_run[0])
  assert_params_equal(flat(resumed["critic"]), flat(straight["critic"]))  # params and Adam


def test_grpo_builds_and_saves_no_critic(tmp_path, monkeypatch):
  def no_critic(*args, **kwargs):
    raise AssertionError("a GRPO run built a critic")

  monkeypatch.setattr(critic, "make_critic", no_critic)
  train.train_and_evaluate(tiny_config(dict(RUN, **{"train.steps": 1})), str(tmp_path))
  assert set(saved_state(str(tmp_path))) == {"params", "opt_state"}


@pytest.mark.parametrize("overrides, message", [
    ({"rl.advantage_estimator": "ppo"}, r"expected one of \['grpo', .*'gae'\]"),
    ({"rl.kl_in_reward": True, "rl.beta": 0.05}, "kl_in_reward=True .* needs "
     "config.rl.advantage_estimator='gae'"),
    ({"rl.advantage_estimator": "gae", "rl.kl_in_reward": True, "rl.beta": 0.0},
     "beta is the penalty's coefficient"),
    ({"rl.advantage_estimator": "gae", "rl.dynamic_sampling": True}, "set dynamic_sampling=False"),
    ({"rl.advantage_estimator": "gae", "rl.lam": 1.5}, r"rl.lam=1.5 must be in \[0.0, 1.0\]"),
    ({"rl.advantage_estimator": "gae", "rl.gamma": -0.1}, r"rl.gamma=-0.1 must be in"),
    ({"rl.advantage_estimator": "gae", "rl.cliprange_value": 0.0}, "cliprange_value=0.0 must be"),
    ({"rl.advantage_estimator": "gae", "rl.vf_coef": -1.0}, "vf_coef=-1.0 must be > 0"),
    ({"rl.advantage_estimator": "gae", "rl.critic_learning_rate": 0.0},
     "critic_learning_rate=0.0 must be > 0"),
    ({"rl.advantage_estimator": "gae", "rl.num_generations": 0}, "num_generations=0 must be"),
    ({"rl.num_generations": 1}, "GRPO needs at least 2 completions"),
])
def test_ppo_config_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(tiny_config(overrides))


def test_ppo_needs_only_one_completion_per_prompt():
  config_lib.validate(tiny_config({"rl.advantage_estimator": "gae", "rl.num_generations": 1}))


def test_reward_metrics_of_one_completion_per_prompt():
  """PPO's batches may hold one completion per prompt: the reward metrics still work (no group
  has a spread), while the group estimators still refuse G = 1."""
  m = advantages.reward_metrics(jnp.array([1.0, 0.0, jnp.nan, 1.0]), 1)
  assert float(m["reward"]) == pytest.approx(2 / 3) and math.isnan(float(m["reward_std"]))
  assert float(m["frac_reward_zero_std"]) == 1 and float(m["frac_reward_missing"]) == 0.25
  with pytest.raises(ValueError, match="a group needs a baseline"):
    advantages.group_advantages(jnp.zeros(4), 1)


@pytest.mark.slow  # 35-55 s on 2 cores: the slow job runs it
def test_ppo_trains_with_one_completion_per_prompt(tmp_path):
  cfg = tiny_config(dict(RUN, **{"train.steps": 2, "rl.advantage_estimator": "gae",
                                 "rl.num_generations": 1}))
  recs = training_records(train.train_and_evaluate(cfg, str(tmp_path)))
  assert len(recs) == 2
  for rec in recs:
    for key in (*VALUE_KEYS, "loss", "grad_norm", "reward"):
      assert math.isfinite(rec[key]), key
  assert recs[-1]["value/grad_norm"] > 0


@pytest.mark.slow
def test_fsdp_and_tensor_mesh_on_4_devices_matches_one_device(ppo_run, tmp_path, compile_cache):
  """The critic is sharded by the policy's rules: a 1 x 2 x 2 mesh trains as one device."""
  overrides = dict(PPO, **{"train.steps": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  proc = run_cli(cli_args(tmp_path, overrides), subprocess_env(compile_cache, devices=4))
  assert proc.returncode == 0, proc.stderr[-3000:]
  sharded = training_records(metrics_io.read_metrics(tmp_path))
  single = training_records(ppo_run[1])[:2]
  assert [r.keys() for r in sharded] == [r.keys() for r in single]
  for got, want in zip(sharded, single):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
  want_tree = saved_state(ppo_run[0], step=2)["critic"]["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          want_tree)
  with checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints"), read_only=True) as ckpt:
    got_tree = ckpt.restore(2, {"critic": {"params": abstract}}, partial=True)[0]
  got, want = flat(got_tree["critic"]["params"]), flat(want_tree)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_rollout_pass_puts_the_kl_in_the_rewards_and_runs_gae(grad_accum_steps):
  """critic.make_advantages_fn against the ppo.py pieces called by hand: values of the critic
  (a non-zero head), r = R [last token] - beta * (log pi_old - log pi_ref) (k1), a missing
  reward as 0, GAE, whitening; the same a micro-batch at a time."""
  cfg = tiny_config({"rl.advantage_estimator": "gae", "rl.kl_in_reward": True, "rl.beta": 0.3,
                     "rl.kl_estimator": "k1", "rl.num_generations": 2, "rl.lam": 0.9,
                     "rl.gamma": 0.97, "train.grad_accum_steps": grad_accum_steps})
  model = models.load("tiny-random")[0]
  graphdef, params = nnx.split(model)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  run = types.SimpleNamespace(graphdef=graphdef, mesh=mesh, batch_sh=sharding.batch_sharding(mesh),
                              param_sh=sharding.param_shardings(mesh, params))
  the_critic, critic_params = critic.make_critic(cfg, run, params)
  rng = np.random.default_rng(0)
  critic_params = jax.tree_util.tree_map_with_path(  # a non-zero head: values that vary
      lambda path, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
      if "value_" in jax.tree_util.keystr(path) else x, critic_params)
  b, g, p, t = 2, 2, 5, 6
  mask = (np.arange(t)[None] < np.array([[6], [3], [1], [4]])).astype(np.int32)
  batch = grpo.Batch(
      prompts=jnp.asarray(rng.integers(1, 50, (b, p)), jnp.int32),
      prompt_mask=jnp.ones((b, p), jnp.int32),
      completions=jnp.asarray(rng.integers(1, 50, (b * g, t)), jnp.int32),
      completion_mask=jnp.asarray(mask),
      old_logps=jnp.asarray(rng.uniform(-4, -0.5, (b * g, t)), jnp.float32),
      advantages=jnp.zeros(b * g, jnp.float32))
  rewards_n = jnp.array([1.0, 0.0, jnp.nan, 0.5])
  out, old_values, returns, metrics = critic.make_advantages_fn(
      cfg, the_critic, graphdef, param_sh=run.param_sh, batch_sh=run.batch_sh, mesh=mesh)(
      critic_params, params, batch, rewards_n)

  args = (batch.prompts, batch.prompt_mask, batch.completions, batch.completion_mask)
  values = ppo.completion_values(nnx.merge(the_critic.graphdef, critic_params), *args,
                                 num_generations=g)
  ref_logps, _ = grpo.completion_logps(model, *args, num_generations=g)
  kl = batch.old_logps - ref_logps
  token_rewards = ppo.token_rewards(jnp.array([1.0, 0.0, 0.0, 0.5]), mask, kl=kl, kl_coef=0.3)
  adv, ret = ppo.gae(token_rewards, values, mask, gamma=0.97, lam=0.9)
  assert float(jnp.std(values)) > 1e-3
  np.testing.assert_allclose(old_values, values, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(returns, ret, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.advantages, ppo.whiten(adv, mask), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["kl"], ppo.masked_mean(kl, mask), rtol=1e-5)
  np.testing.assert_allclose(metrics["value/advantages_mean"], ppo.masked_mean(adv, mask),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.completions, batch.completions)


@pytest.mark.slow  # 35-55 s on 2 cores: the slow job runs it
def test_compiled_memory_check_counts_the_critic(tmp_path, monkeypatch):
  """On a device with a memory limit the compiled programs' peaks decide; PPO's critic, held
  through all of them, is added to each: a limit that fits GRPO's programs stops PPO's run."""
  seen = {}
  check = compiled.check_compiled

  def peak(overrides, name):
    monkeypatch.setattr(compiled, "check_compiled", lambda peaks, limit: seen.update({
        name: peaks["update"]["peak_bytes"]}))
    cfg = tiny_config({**RUN, "train.steps": 1, "train.device_memory_gb": 100.0, **overrides})
    train.train_and_evaluate(cfg, str(tmp_path / name))
    return seen[name]

  grpo_peak, ppo_peak = peak({}, "grpo"), peak({"rl.advantage_estimator": "gae"}, "ppo")
  assert ppo_peak > grpo_peak
  monkeypatch.setattr(compiled, "check_compiled", check)
  cfg = tiny_config({**RUN, "train.steps": 1, "rl.advantage_estimator": "gae",
                     "train.device_memory_gb": (grpo_peak + ppo_peak) / 2 / 2**30})
  with pytest.raises(config_lib.ConfigError, match=r"critic params \(held\)"):
    train.train_and_evaluate(cfg, str(tmp_path / "too_big"))


def test_critic_trunk_starts_from_config_critic_init(ppo_run):
  """rl.critic_init: the critic's trunk is that model's params (here a trained workdir's
  policy), not the policy's; "" keeps the policy's. A model of another shape is refused."""
  workdir, _ = ppo_run
  graphdef, params = nnx.split(models.load("tiny-random")[0])
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  trained = saved_params(workdir)
  for init, want in (("", initial_params()), (workdir, trained)):
    cfg = tiny_config(dict(PPO, **{"rl.critic_init": init}))
    source = critic.critic_source(cfg, graphdef, params, mesh)
    assert_params_equal(model_params(source), want)
    value_model = models.ValueModel.from_policy(source)
    trunk = nnx.to_pure_dict(nnx.state(value_model, nnx.Param))["trunk"]
    np.testing.assert_array_equal(np.asarray(trunk["embed"]), want["embed"])
  assert any(not np.array_equal(trained[k], v) for k, v in initial_params().items())
  cfg = tiny_config(dict(PPO, **{"rl.critic_init": "smollm2-135m-instruct"}))
  with pytest.raises(ValueError, match="architecture and vocabulary"):
    critic.critic_source(cfg, graphdef, params, mesh)


def test_critic_init_is_checked_at_start_up(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="needs config.rl.advantage_estimator='gae'"):
    config_lib.validate(tiny_config({"rl.critic_init": "tiny-random"}), data=False)
  with pytest.raises(config_lib.ConfigError, match="critic_init"):
    config_lib.validate(tiny_config(dict(PPO, **{"rl.critic_init": str(tmp_path / "nope")})),
                        data=False)
