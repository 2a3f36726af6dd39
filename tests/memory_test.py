"""The start-up memory estimate against XLA's own memory analysis of the compiled programs,
and the error it gives when a run cannot fit."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from grpo_jax import config as config_lib, grpo, optim, memory, models, sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**rl):
  cfg = config_lib.from_file(os.path.join(REPO, "configs", "tiny_arithmetic.py"))
  cfg.rl.update(rl)
  return cfg


@pytest.fixture(scope="module")
def tiny():
  model, _ = models.load("tiny-random")
  return nnx.split(model), model.cfg


def param_bytes(params):
  return sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("beta, completion_length, remat",
                         [(0.04, 64, "none"), (0.0, 128, "none"), (0.0, 128, "full")])
def test_estimate_is_within_half_of_xlas_memory_analysis(tiny, beta, completion_length, remat):
  (graphdef, params), model_cfg = tiny
  cfg = tiny_config(beta=beta, max_prompt_length=32, max_completion_length=completion_length)
  cfg.model.remat = remat
  mesh = config_lib.make_mesh(cfg)
  est = memory.estimate(cfg, model_cfg, mesh, param_bytes=param_bytes(params))
  assert est.persistent["optimizer state"] == 2 * param_bytes(params)
  assert ("reference params" in est.persistent) == (beta != 0)

  b, g = cfg.train.prompts_per_step, cfg.rl.num_generations
  p, t = cfg.rl.max_prompt_length, completion_length
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  batch = grpo.Batch(ints(b, p), ints(b, p), ints(b * g, t), ints(b * g, t),
                     jax.ShapeDtypeStruct((b * g, t), jnp.float32),
                     jax.ShapeDtypeStruct((b * g,), jnp.float32))
  optimizer, _ = optim.make_optimizer(1e-3, total_steps=1)
  abstract = jax.eval_shape(lambda x: x, params)
  update = grpo.make_update_step(graphdef, optimizer, grpo.loss_config(g, beta=beta, remat=remat))
  xla = update.lower(abstract, jax.eval_shape(optimizer.init, params),
                     abstract if beta else None, batch).compile().memory_analysis()
  ratio = sum(est.update.values()) / xla.temp_size_in_bytes  # gradients and activations
  assert 0.5 < ratio < 1.5, (est.table(), xla)

  sample = jax.jit(lambda prm, tok, m: sampling.sample(
      graphdef, prm, tok, m, jax.random.key(0), num_generations=g, max_new_tokens=t,
      stop_ids=(-1,), pad_id=0))
  xla = sample.lower(abstract, ints(b, p), ints(b, p)).compile().memory_analysis()
  ratio = sum(est.sampling.values()) / xla.temp_size_in_bytes  # the KV cache and logits
  assert 0.5 < ratio < 1.5, (est.table(), xla)


def test_check_passes_under_the_limit_and_without_one(tiny):
  (_, params), model_cfg = tiny
  cfg = tiny_config()
  est = memory.estimate(cfg, model_cfg, config_lib.make_mesh(cfg), param_bytes=param_bytes(params))
  memory.check(est, None)  # a CPU reports no limit
  memory.check(est, est.peak)
  with pytest.raises(config_lib.ConfigError) as error:
    memory.check(est, est.peak - 1)
  message = str(error.value)
  assert "per device, more than the" in message
  for part in ("optimizer state", "KV cache", "activations", "config.train.grad_accum_steps",
               "config.mesh.fsdp"):
    assert part in message


def test_activations_shrink_with_gradient_accumulation_and_the_batch_split(tiny):
  (_, params), model_cfg = tiny
  cfg = tiny_config()
  mesh = config_lib.make_mesh(cfg)
  whole = memory.estimate(cfg, model_cfg, mesh, param_bytes=param_bytes(params))
  cfg.train.grad_accum_steps = 2
  half = memory.estimate(cfg, model_cfg, mesh, param_bytes=param_bytes(params))
  assert half.update["activations"] == whole.update["activations"] // 2
  assert half.sampling == whole.sampling  # sampling sees the whole batch either way


def test_device_memory_limit_from_the_config():
  cfg = tiny_config()
  cfg.train.device_memory_gb = 1.5
  assert memory.device_memory_limit(cfg) == int(1.5 * 2 ** 30)
  cfg.train.device_memory_gb = 0.0
  assert memory.device_memory_limit(cfg) is None  # CPU devices report no memory stats


def test_full_remat_lowers_the_compiled_updates_temporaries():
  """With config.model.remat=full the update keeps each layer's input only, not its attention
  scores and MLP activations: XLA's buffers for the update shrink (4 layers x 256 completion
  tokens: 147 MiB -> 44 MiB when measured). Through compiled.programs, as aot and the start-up
  check build it."""
  from grpo_jax import compiled

  cfg = tiny_config(max_completion_length=256, num_generations=4)
  cfg.train.prompts_per_step, cfg.eval.num_problems = 2, 0
  model_cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                 num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
  temp = {}
  for remat in ("none", "full"):
    cfg.model.remat = remat
    fn, args, _ = compiled.programs(cfg, model_cfg, None)["update"]
    temp[remat] = compiled.memory(compiled.compile_program(fn, args)[0])["temp_bytes"]
  assert temp["full"] < 0.5 * temp["none"], temp


def test_attention_block_lowers_the_compiled_updates_temporaries():
  """config.model.attention_block reaches the update that compiled.programs builds (aot, the
  start-up check): 511 completion queries in blocks of 64 hold one block's scores, not
  [511, 32 + 511] per row and head; XLA's buffers for the update shrink (measured 144 MiB ->
  29 MiB; the estimate: 126 MiB -> 37 MiB, one block counted)."""
  from grpo_jax import compiled

  cfg = tiny_config(max_completion_length=512, num_generations=4)
  cfg.train.prompts_per_step, cfg.eval.num_problems = 2, 0
  cfg.model.remat = "full"
  model_cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  temp, est = {}, {}
  for block in (0, 64):
    cfg.model.attention_block = block
    fn, args, _ = compiled.programs(cfg, model_cfg, None)["update"]
    temp[block] = compiled.memory(compiled.compile_program(fn, args)[0])["temp_bytes"]
    est[block] = memory.estimate(cfg, model_cfg, config_lib.make_mesh(cfg), param_bytes=0)
  assert temp[64] < 0.4 * temp[0], temp
  assert "attention (one block)" in est[64].update and "attention (one block)" not in est[0].update
  assert sum(est[64].update.values()) < 0.4 * sum(est[0].update.values())


def test_ppo_holds_a_critic_and_its_optimizer_state(tiny):
  """advantage_estimator="gae": the critic's params and AdamW moments are held all run (three
  times the policy's params more); GRPO holds none of it."""
  (_, params), model_cfg = tiny
  grpo_cfg, ppo_cfg = tiny_config(), tiny_config(advantage_estimator="gae")
  mesh = config_lib.make_mesh(grpo_cfg)
  n = param_bytes(params)
  grpo_est, ppo_est = (memory.estimate(c, model_cfg, mesh, param_bytes=n)
                       for c in (grpo_cfg, ppo_cfg))
  assert not any(k.startswith("critic") for k in grpo_est.persistent)
  assert ppo_est.persistent["critic params"] == n
  assert ppo_est.persistent["critic optimizer state"] == 2 * n
  assert ppo_est.peak - grpo_est.peak == 3 * n
  assert "critic optimizer state" in ppo_est.table()
