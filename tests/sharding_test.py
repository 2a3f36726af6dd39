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
