"""Sharding tests. Multi-device checks run once, in a subprocess with 8 host CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding

# Runs with 8 devices; prints one JSON object of observations for the tests below.
_SCRIPT = textwrap.dedent(r"""
  import json
  import jax, jax.numpy as jnp, numpy as np, optax
  from flax import nnx
  from jax.sharding import PartitionSpec as P
  from grpo_jax import models, sharding
  from grpo_jax.models.transformer import ModelConfig

  out = {}
  spec = lambda s: [list(e) if isinstance(e, tuple) else e for e in s.spec]
  out["sizes"] = {
      "fsdp=-1": dict(sharding.make_mesh(fsdp=-1).shape),
      "data=2,tensor=-1": dict(sharding.make_mesh(data=2, tensor=-1).shape),
      "data=-1,fsdp=2,tensor=2": dict(sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape),
  }
  errors = {}
  for kw in (dict(data=3), dict(data=3, fsdp=-1), dict(data=2, fsdp=2)):
    try:
      sharding.make_mesh(**kw)
      errors[str(kw)] = None
    except ValueError as e:
      errors[str(kw)] = str(e)
  out["errors"] = errors

  mesh = sharding.make_mesh(2, 2, 2)
  # Every param kind: untied head, q/k/v bias, q/k norm. Dims divisible by 2.
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                    attention_bias=True, qk_norm=True)
  model = models.init_model(cfg, seed=0)
  # Non-zero biases so that their sharding matters for the forward pass.
  for name in ("q_bias", "k_bias", "v_bias"):
    p = getattr(model, name)
    p[...] = 0.1 * jax.random.normal(jax.random.key(1), p.shape)
  graphdef, state = nnx.split(model)
  shardings = sharding.param_shardings(mesh, state)
  flat = nnx.to_pure_dict(shardings)
  out["specs"] = {name: spec(s) for name, s in flat.items()}
  sharded = jax.device_put(state, shardings)
  out["shard_shapes"] = {name: list(x.addressable_shards[0].data.shape)
                         for name, x in nnx.to_pure_dict(sharded).items()}

  tokens = jax.random.randint(jax.random.key(2), (8, 12), 0, cfg.vocab_size)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  ref = np.asarray(forward(state, tokens))
  tokens_sh = jax.device_put(tokens, sharding.batch_sharding(mesh))
  got = forward(sharded, tokens_sh)
  out["forward_max_diff"] = float(np.max(np.abs(np.asarray(got) - ref)))
  out["forward_ref_scale"] = float(np.max(np.abs(ref)))
  out["tokens_shard_shape"] = list(tokens_sh.addressable_shards[0].data.shape)

  params = nnx.to_pure_dict(state)
  opt_state = optax.adamw(1e-3).init(params)
  opt_sh = sharding.param_shardings(mesh, opt_state)
  adam = opt_sh[0]
  param_sh = sharding.param_shardings(mesh, params)
  out["mu_matches"] = all(adam.mu[k].spec == param_sh[k].spec for k in params)
  out["nu_matches"] = all(adam.nu[k].spec == param_sh[k].spec for k in params)
  out["count_spec"] = spec(adam.count)
  placed = jax.device_put(opt_state, opt_sh)
  out["mu_q_proj_shard"] = list(placed[0].mu["q_proj"].addressable_shards[0].data.shape)
  # An update step under jit with these shardings keeps them.
  step = jax.jit(lambda g, s: optax.adamw(1e-3).update(g, s, params)[1],
                 in_shardings=(param_sh, opt_sh), out_shardings=opt_sh)
  grads = jax.tree.map(jnp.ones_like, params)
  new = step(jax.device_put(grads, param_sh), placed)
  out["updated_mu_down_spec"] = spec(new[0].mu["down_proj"].sharding)

  # The sampler's copy of the weights: no FSDP split, matmul weights in the compute dtype.
  from grpo_jax import compiled, sampling
  rollout_sh = sharding.rollout_shardings(mesh, state)
  out["rollout_specs"] = {name: spec(s) for name, s in nnx.to_pure_dict(rollout_sh).items()}
  copy = sampling.rollout_copier(shardings, rollout_sh, "bfloat16")(sharded)
  out["rollout_dtypes"] = {name: str(x.dtype) for name, x in nnx.to_pure_dict(copy).items()}
  # Decode-loop collectives on an FSDP mesh (data 2 x fsdp 4): from the training params, and
  # from the copy (the model computes in bf16, so that the copy is what a run makes).
  fsdp = sharding.make_mesh(2, 4, 1)
  bf16_graphdef, bf16_state = nnx.split(models.init_model(cfg, dtype=jnp.bfloat16, seed=0))
  fsdp_sh = sharding.param_shardings(fsdp, bf16_state)
  train_params = jax.device_put(bf16_state, fsdp_sh)
  copier = sampling.rollout_copier(fsdp_sh, sharding.rollout_shardings(fsdp, bf16_state),
                                   "bfloat16")
  prompts = jax.device_put(jnp.ones((8, 4), jnp.int32), sharding.batch_sharding(fsdp))
  def decode_all_gathers(params):
    fn = jax.jit(lambda p, t, m: sampling.sample(
        bf16_graphdef, p, t, m, jax.random.key(0), num_generations=2, max_new_tokens=4,
        stop_ids=(1,), pad_id=0))
    with jax.set_mesh(fsdp):
      hlo = fn.lower(params, prompts, prompts).compile().as_text()
    return compiled.loop_collectives(hlo)["all-gather"]
  out["decode_all_gathers"] = {"params": decode_all_gathers(train_params),
                               "copy": decode_all_gathers(copier(train_params))}

  # Activation constraints apply only under a mesh, and never fail.
  @jax.jit
  def constrained(x, y):
    return (sharding.constrain(x, (sharding.BATCH_AXES, None)),
            sharding.constrain(y, (sharding.BATCH_AXES, None)))
  x, y = jnp.ones((8, 3)), jnp.ones((3, 8))
  with jax.set_mesh(fsdp):
    cx, cy = constrained(x, y)
  out["constrained_specs"] = [spec(cx.sharding), spec(cy.sharding)]
  print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def observed():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                        text=True, timeout=120)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_make_mesh_resolves_minus_one(observed):
  assert observed["sizes"] == {
      "fsdp=-1": {"data": 1, "fsdp": 8, "tensor": 1},
      "data=2,tensor=-1": {"data": 2, "fsdp": 1, "tensor": 4},
      "data=-1,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
  }


def test_make_mesh_error_names_device_count_and_config_keys(observed):
  for kw, message in observed["errors"].items():
    assert message is not None, kw
    assert "8 devices" in message and "config.mesh.fsdp" in message, message


def test_make_mesh_rejects_two_free_axes():
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_specs_of_each_param_kind(observed):
  col, row = [None, "fsdp", "tensor"], [None, "tensor", "fsdp"]
  assert observed["specs"] == {
      "embed": ["tensor", "fsdp"], "lm_head": ["fsdp", "tensor"],
      "q_proj": col, "k_proj": col, "v_proj": col, "gate_proj": col, "up_proj": col,
      "o_proj": row, "down_proj": row,
      "q_bias": [None, "tensor"], "k_bias": [None, "tensor"], "v_bias": [None, "tensor"],
      "attn_norm": [], "mlp_norm": [], "q_norm": [], "k_norm": [], "final_norm": [],
  }
  # The arrays really are split: q_proj [2, 32, 32] -> [2, 16, 16] per device.
  assert observed["shard_shapes"]["q_proj"] == [2, 16, 16]
  assert observed["shard_shapes"]["down_proj"] == [2, 32, 16]
  assert observed["shard_shapes"]["attn_norm"] == [2, 32]


def test_indivisible_optional_dim_and_rank_mismatch_fall_back_to_replicated():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.AXES)
  assert sharding.spec_for("embed", (63, 32), mesh) == P(None, "fsdp")  # odd vocabulary
  assert sharding.spec_for("lm_head", (32, 63), mesh) == P("fsdp", None)
  assert sharding.spec_for("q_proj", (2, 32, 6), mesh) == P(None, "fsdp", "tensor")
  assert sharding.spec_for("k_proj", (2, 32, 3), mesh) == P(None, "fsdp", None)  # 3 kv dims
  assert sharding.spec_for("o_proj", (2, 3, 32), mesh) == P(None, None, "fsdp")
  assert sharding.spec_for("q_proj", (2, 32), mesh) == P()  # e.g. a factored statistic
  assert sharding.spec_for("unknown", (8, 8), mesh) == P()
  assert sharding.spec_for(None, (8, 8), mesh) == P()
  # Custom rules, as a config would give them: plain tuples, a multi-axis entry, which is
  # replicated only when all its axes are optional.
  rules = [("embed", (("fsdp", "tensor"), None), {"fsdp", "tensor"})]
  assert sharding.spec_for("embed", (64, 32), mesh, rules) == P(("fsdp", "tensor"), None)
  assert sharding.spec_for("embed", (6, 32), mesh, rules) == P(None, None)
  with pytest.raises(ValueError, match="'embed' of shape"):
    sharding.spec_for("embed", (6, 32), mesh, [("embed", (("fsdp", "tensor"), None), {"tensor"})])


@pytest.mark.parametrize("name, shape, axis, dim, rule", [
    # the hidden size: FSDP would shard nothing
    ("q_proj", (2, 31, 6), "fsdp", 31, "('(q|k|v)_proj', P(None, 'fsdp', 'tensor'))"),
    ("down_proj", (2, 7, 32), "tensor", 7, "('down_proj', P(None, 'tensor', 'fsdp'))"),  # MLP width
    ("embed", (64, 31), "fsdp", 31, "('embed', P('tensor', 'fsdp'))"),
])
def test_indivisible_required_dim_is_an_error_naming_param_rule_and_mesh(name, shape, axis, dim,
                                                                          rule):
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.AXES)
  with pytest.raises(ValueError) as e:
    sharding.spec_for(name, shape, mesh)
  message = str(e.value)
  for part in (f"param {name!r} of shape {shape}", f"rule {rule}",
               f"({dim}) over mesh axis {axis!r} of size 2", "'data': 2, 'fsdp': 2, 'tensor': 2",
               "config.mesh"):
    assert part in message, (part, message)


def test_sharded_forward_equals_unsharded(observed):
  assert observed["forward_ref_scale"] > 0.01
  assert observed["forward_max_diff"] < 1e-5
  assert observed["tokens_shard_shape"] == [2, 12]  # batch 8 over data x fsdp = 4


def test_optax_state_mirrors_params(observed):
  assert observed["mu_matches"] and observed["nu_matches"]
  assert observed["count_spec"] == []
  assert observed["mu_q_proj_shard"] == [2, 16, 16]
  assert observed["updated_mu_down_spec"] == [None, "tensor", "fsdp"]


def test_rollout_copy_drops_the_batch_axes_and_casts_matmul_weights(observed):
  specs, dtypes = observed["rollout_specs"], observed["rollout_dtypes"]
  assert specs["q_proj"] == [None, None, "tensor"]  # training: [None, "fsdp", "tensor"]
  assert specs["down_proj"] == [None, "tensor", None]
  assert specs["embed"] == ["tensor", None]
  assert dtypes["q_proj"] == dtypes["down_proj"] == dtypes["lm_head"] == "bfloat16"
  # Looked up in fp32 (embed) or applied in fp32 (norms, biases): kept as stored.
  assert dtypes["embed"] == dtypes["attn_norm"] == dtypes["q_bias"] == "float32"


def test_decoding_from_the_rollout_copy_gathers_no_weights(observed):
  gathers = observed["decode_all_gathers"]
  assert gathers["copy"] == 0
  assert gathers["params"] > 0  # the FSDP-sharded params are gathered at every token


def test_constrain_applies_under_a_mesh_and_leaves_indivisible_dims_free(observed):
  assert observed["constrained_specs"][0] == [["data", "fsdp"]]  # 8 rows over 2 x 4
  assert observed["constrained_specs"][1] != [["data", "fsdp"]]  # 3 rows: not forced
  x = jax.numpy.ones((4, 2))
  assert sharding.constrain(x, (sharding.BATCH_AXES, None)) is x  # no mesh: unchanged
