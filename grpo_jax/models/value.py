"""A value model (PPO's critic): the policy's transformer trunk with a scalar head.

    critic = ValueModel.from_policy(policy)          # trunk params copied, head at zero
    critic = value_model_from_params(cfg, params)    # or from a critic's saved params
    values = critic(tokens, attention_mask_BxL=mask)  # [B, L] fp32

The trunk is a `Transformer`, so the architecture is written once: the critic
runs the same `hidden_states` / `prefill` (left padding, shared prompt
prefix, remat, attention blocks) and only swaps the LM head for
`value_head` [D, 1] and `value_bias` [1] on the final-norm hidden state. A
position's value estimates the return of the completion from the state after
that position's token, so the value of completion token t sits where its
log-prob's logits sit: at the position before it (`ppo.completion_values`).

The trunk never has an LM head of its own: a policy with untied embeddings
(its `lm_head` [D, V]) gives a critic without it (its config says
tie_word_embeddings=True, which only means "no lm_head param" here; the critic
never computes logits), saving a D x V matrix and its optimizer moments.

Sharding: the trunk's params keep their names (`embed`, `q_proj`, ...) under
a `trunk` level, and `sharding.param_shardings` names a param by its last key,
so they are sharded exactly as the policy's are. `value_head` and
`value_bias` (D + 1 numbers) are replicated (their rule in
`sharding.DEFAULT_RULES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import sharding
from grpo_jax.models.transformer import ATTENTION_BLOCK, ModelConfig, Transformer

Array = jax.Array


def critic_config(cfg: ModelConfig) -> ModelConfig:
  """The trunk config of a policy's critic: the same architecture, without an lm_head."""
  return dataclasses.replace(cfg, tie_word_embeddings=True)


class ValueModel(nnx.Module):
  """Per-token scalar values: `value_model(tokens) -> [B, L]` fp32.

  Attributes:
    trunk: a `Transformer` (its `logits` is never used).
    value_head: [D, 1] param, zero-initialised (every value starts at exactly 0).
    value_bias: [1] param, zero-initialised.
  """

  def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, attention_block: int = ATTENTION_BLOCK,
               rngs: nnx.Rngs):
    self.trunk = Transformer(critic_config(cfg), dtype=dtype, param_dtype=param_dtype,
                             attention_block=attention_block, rngs=rngs)
    self.value_head = nnx.Param(jnp.zeros((cfg.hidden_size, 1), param_dtype))
    self.value_bias = nnx.Param(jnp.zeros((1,), param_dtype))

  @property
  def cfg(self) -> ModelConfig:
    return self.trunk.cfg

  @classmethod
  def from_policy(cls, policy: Transformer, *, head: Array | None = None,
                  bias: Array | None = None) -> "ValueModel":
    """A critic whose trunk is a copy of `policy`'s params (same dtypes, shardings; the
    head placed on the policy's mesh, if it has one, by `sharding.DEFAULT_RULES`).

    The copies are new buffers, so donating the policy's params in its update
    step never invalidates the critic's. `head` [D, 1] / `bias` [1]: initial
    head params (default zeros: every value is 0 until the critic trains).
    """
    cfg = policy.cfg
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=policy.dtype,
                                          param_dtype=policy.embed[...].dtype,
                                          attention_block=policy.attention_block,
                                          rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    src = nnx.to_pure_dict(nnx.state(policy, nnx.Param))
    dst = nnx.to_pure_dict(state)
    # jnp.copy keeps each array's sharding and gives it its own buffer.
    dst["trunk"] = {name: jnp.copy(src[name]) for name in dst["trunk"]}
    dt = src["embed"].dtype
    dst["value_head"] = (jnp.zeros((cfg.hidden_size, 1), dt) if head is None
                         else jnp.asarray(head, dt).reshape(cfg.hidden_size, 1))
    dst["value_bias"] = (jnp.zeros((1,), dt) if bias is None
                         else jnp.asarray(bias, dt).reshape(1))
    mesh = sharding.mesh_of(src)
    if mesh is not None:  # the head joins the trunk's mesh, laid out by its rule
      for name in ("value_head", "value_bias"):
        spec = sharding.spec_for(name, dst[name].shape, mesh)
        dst[name] = jax.device_put(dst[name], jax.sharding.NamedSharding(mesh, spec))
    nnx.replace_by_pure_dict(state, dst)
    return nnx.merge(graphdef, state)

  def prefill(self, *args, **kwargs):
    """`Transformer.prefill` of the trunk: (hidden [B, L, D], cache)."""
    return self.trunk.prefill(*args, **kwargs)

  def hidden_states(self, *args, **kwargs):
    """`Transformer.hidden_states` of the trunk: final-norm hidden [B, L, D] (and cache)."""
    return self.trunk.hidden_states(*args, **kwargs)

  def values(self, hidden: Array) -> Array:
    """Value head: hidden [..., D] -> values [...] fp32.

    A product and a sum in fp32, not a matmul: a [D, 1] head is too small to
    matter, and a TPU's default fp32 matmul would round its operands to bf16.
    """
    head = self.value_head[...].astype(jnp.float32)[:, 0]
    return (jnp.sum(hidden.astype(jnp.float32) * head, axis=-1)
            + self.value_bias[...].astype(jnp.float32)[0])

  def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
               attention_mask_BxL: Array | None = None) -> Array:
    """Values [B, L] fp32 of a plain causal forward (no cache)."""
    return self.values(self.trunk.hidden_states(tokens_BxL, positions_BxL, attention_mask_BxL))


def init_value_model(cfg: ModelConfig, *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, attention_block: int = ATTENTION_BLOCK,
                     seed: int = 0) -> ValueModel:
  """A critic with a randomly initialised trunk and a zero head (tests, from-scratch runs)."""
  return ValueModel(cfg, dtype=dtype, param_dtype=param_dtype, attention_block=attention_block,
                    rngs=nnx.Rngs(seed))


def value_model_from_params(cfg: ModelConfig, params: dict[str, Any], *,
                            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                            attention_block: int = ATTENTION_BLOCK) -> ValueModel:
  """A critic around given arrays, without a random init: `params` is
  {"trunk": {name: array}, "value_head": [D, 1], "value_bias": [1]} (`nnx.to_pure_dict` of a
  critic's params), e.g. a critic checkpoint. `cfg`: the policy's config or the critic's."""
  abstract = nnx.eval_shape(lambda: ValueModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                               attention_block=attention_block,
                                               rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = nnx.to_pure_dict(state)
  flat_expected = dict(nnx.traversals.flatten_mapping(expected))
  flat_params = dict(nnx.traversals.flatten_mapping(params))
  if set(flat_expected) != set(flat_params):
    names = lambda keys: sorted("/".join(map(str, k)) for k in keys)  # noqa: E731
    raise ValueError(
        "param names do not match a critic of this architecture: missing "
        f"{names(set(flat_expected) - set(flat_params))}, unexpected "
        f"{names(set(flat_params) - set(flat_expected))}")
  arrays = {}
  for key, spec in flat_expected.items():
    if tuple(flat_params[key].shape) != tuple(spec.shape):
      raise ValueError(f"param {'/'.join(key)!r} has shape {tuple(flat_params[key].shape)}, "
                       f"expected {spec.shape}")
    arrays[key] = jnp.asarray(flat_params[key], dtype=param_dtype)
  nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(arrays))
  return nnx.merge(graphdef, state)
