"""Decoder-only transformer of the Llama family in Flax NNX.

Covers Llama 2/3 (RoPE with optional Llama-3 frequency scaling), SmolLM2,
Qwen2 (q/k/v bias) and Qwen3 (RMSNorm on each head of q and k): RMSNorm,
grouped-query attention, SwiGLU MLP, tied or untied embeddings.

Gemma 3 (text) is the same family with a few switches in ModelConfig: local
layers (sliding-window attention, their own RoPE base) interleaved with global
ones, q/k RMSNorm, RMSNorm scaling by (1 + weight) with zero-centred weights,
a norm on the attention's and the MLP's outputs as well ("sandwich"), a GeGLU
MLP (tanh-approximated GELU), embeddings scaled by sqrt(hidden_size) and query
scaling by query_pre_attn_scalar ** -0.5. What differs between a local and a
global layer (the window, 0 for global, and the RoPE inverse frequencies) goes
into the layer scan as per-layer inputs, so the layers still share one body.

The layers' params are stacked along a leading axis of size `num_layers` and
applied with `lax.scan`: a 30-layer model compiles as one layer does, which
matters for a sampler that jits a `while_loop` around the whole forward.

Numerics: params are stored in `param_dtype` (fp32 master weights by default);
matmul operands are cast to `dtype` with fp32 accumulation
(`preferred_element_type`); norms, residual stream, softmax and logits are fp32.

KV cache: a dict pytree, passed in and returned (never stored on the module):
    k, v:  [num_layers, B, num_kv_heads, S, head_dim]   in `dtype`
    mask:  [B, S] bool     slot holds a real (non-padding) token
    index: int32 scalar    next slot to write
    prefix (optional): a filled cache {k, v, mask} of B / G prompts, shared by
        each group of G consecutive rows (GRPO's G answers to one prompt): the
        prompt is prefilled once and its keys/values are read once per group,
        never copied G times.
The cache stays full length in every layer, local ones included (no ring
buffer of `sliding_window` slots): a local layer reads all its slots and masks
those out of its window. Positions of cached keys are not stored: a slot's
position is the count of real tokens before it (the prefix's first), the
default positions of `hidden_states`; the window is measured in those
positions, so padding never counts towards it.
A call's queries attend to the cached slots that hold real tokens and, causally,
to the call's own real tokens, so left-padded prompts and per-row stopping need
nothing more than `attention_mask`. The layer scan only reads the cache; the
call's keys/values are written once, after it, in place. (Writing inside the
scan, or concatenating cache and new keys, copies the whole cache every layer:
measured 2x slower decoding on CPU.) The [B, KV, S, D] layout makes both
attention products plain batched matmuls, with no transpose of the cache. A
call can also read a prefix with no cache (`hidden_states(prefix=...)`): the
update's completions attend to their prompt that way and write nothing.

Attention in blocks of queries (`attention_block`, config.model.attention_block):
a call of L tokens has fp32 scores [B, KV, G, L, S] against its S keys (its own
L, the cache's slots, the shared prefix), quadratic in L: 8192 completion
tokens are 256 MiB per row and head. A call of more than `attention_block`
queries runs them through `attention` in blocks of that many (the last one
padded), one block at a time in a `lax.scan`, each block against every key
with the causal mask at its queries' places, so only one block's scores
[B, KV, G, block, S] exist at a time. Each block is under `jax.checkpoint`
saving nothing: for the backward the scan keeps its blocks' queries (q itself,
padded to whole blocks) and the keys it shares, and recomputes a block's scores
and softmax before differentiating them: one more query-key product than
keeping them. Keys in a block's causal future are
masked, not skipped (the scan's blocks all have one shape). The layer's other
activations, and what `remat` keeps of the layer, are unchanged. Decoding
(L = 1) is never blocked; 0 turns blocking off.

Rematerialisation (`remat`, config.model.remat): the backward of the layer scan
normally keeps every layer's activations, the fp32 attention scores of an
unblocked call among them. With "full" (or "nothing_saveable") it keeps only
each layer's input (the residual stream) and runs the layer's forward again
during the backward, one layer at a time; with "dots_saveable" it keeps the
matmul outputs (an unblocked call's attention scores too: they are batched
matmuls) and recomputes the rest. Only the update asks for it: the sampler has
no backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import flop_count, sharding

Array = jax.Array
Cache = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (names follow Hugging Face's config.json)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # None, or Llama-3 scaling: dict(factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings).
  rope_scaling: tuple[tuple[str, float], ...] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = True
  attention_bias: bool = False  # Qwen2: bias on q, k, v projections
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k
  architecture: str = "llama"  # "llama" | "qwen2" | "qwen3" | "gemma3": for export
  # Gemma 3. sliding_window: a local layer's query at position i sees keys at
  # positions i - sliding_window < j <= i. layer_types: per layer,
  # "sliding_attention" (local) or "full_attention" (global); None: all global.
  sliding_window: int = 0
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None  # RoPE base of local layers (None: rope_theta)
  query_pre_attn_scalar: float | None = None  # scores times its ** -0.5 (None: head_dim)
  hidden_act: str = "silu"  # "silu": SwiGLU | "gelu_pytorch_tanh": GeGLU with tanh GELU
  norm_plus_one: bool = False  # RMSNorm scales by (1 + weight); weights start at 0
  sandwich_norm: bool = False  # RMSNorm also on the attention's and the MLP's outputs
  embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"hidden_act={self.hidden_act!r}; supported: {HIDDEN_ACTS}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                         f"{self.num_layers} layers")
      unknown = set(self.layer_types) - set(LAYER_TYPES)
      if unknown:
        raise ValueError(f"layer_types {sorted(unknown)}; supported: {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and self.sliding_window <= 0:
        raise ValueError("sliding_attention layers need sliding_window > 0")

  @property
  def has_local_layers(self) -> bool:
    return self.layer_types is not None and "sliding_attention" in self.layer_types

  def layer_windows(self) -> tuple[int, ...]:
    """Per layer: its sliding window, 0 for a global layer."""
    types = self.layer_types or ("full_attention",) * self.num_layers
    return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)

  @property
  def rope_scaling_dict(self) -> dict[str, float] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  def num_params(self) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    per_layer += (q + 2 * kv) if self.attention_bias else 0
    per_layer += 2 * self.head_dim if self.qk_norm else 0
    per_layer += 2 * d if self.sandwich_norm else 0
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + l * per_layer + d + head


HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_param_names(cfg: ModelConfig) -> list[str]:
  """Names of the per-layer (stacked) params of an architecture."""
  names = ["attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm",
           "gate_proj", "up_proj", "down_proj"]
  if cfg.attention_bias:
    names += ["q_bias", "k_bias", "v_bias"]
  if cfg.qk_norm:
    names += ["q_norm", "k_norm"]
  if cfg.sandwich_norm:
    names += ["post_attn_norm", "post_mlp_norm"]
  return names


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jnp.ndarray:
  """Inverse frequencies [head_dim // 2], with Llama-3 or linear scaling if configured.

  local: those of a local (sliding-window) layer: base rope_local_theta, never scaled.
  """
  d = cfg.head_dim
  theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  s = cfg.rope_scaling_dict
  if not s or local:
    return inv_freq
  if "low_freq_factor" not in s:  # linear: positions divided by `factor`
    return inv_freq / s["factor"]
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths are slowed down by `factor`, short ones kept, and the band
  # in between interpolated linearly in old_len / wavelen.
  smooth = jnp.clip((old_len / wavelen - lo) / (hi - lo), 0.0, 1.0)
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x_BxLxHxD: Array, positions_BxL: Array, inv_freq: Array) -> Array:
  """Rotary embedding, in the half-split layout of Hugging Face checkpoints."""
  angles = positions_BxL[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rms_norm(x: Array, scale: Array, eps: float, plus_one: bool = False) -> Array:
  """RMSNorm over the last axis, fp32; plus_one: scaled by (1 + scale) (Gemma)."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return x * (1.0 + scale.astype(jnp.float32) if plus_one else scale.astype(jnp.float32))


def matmul(x: Array, w: Array, dtype: Any) -> Array:
  """x[..., K] @ w[K, N] with operands in `dtype`, accumulated in fp32."""
  return jnp.einsum(
      "...k,kn->...n", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
  )


def _gelu_tanh(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=True)


_ACT = {"silu": jax.nn.silu, "gelu_pytorch_tanh": _gelu_tanh}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _swiglu(y: Array, w_gate: Array, w_up: Array, w_down: Array, dtype: Any,
            act_name: str = "silu") -> Array:
  gate = _ACT[act_name](matmul(y, w_gate, dtype))
  return matmul(gate * matmul(y, w_up, dtype), w_down, dtype)


def _swiglu_fwd(y, w_gate, w_up, w_down, dtype, act_name):
  gate, up = matmul(y, w_gate, dtype), matmul(y, w_up, dtype)
  out = matmul(_ACT[act_name](gate) * up, w_down, dtype)
  return out, (y, gate, up, w_gate, w_up, w_down)


def _swiglu_bwd(dtype, act_name, res, d_out):
  y, gate, up, w_gate, w_up, w_down = res
  d_hidden = matmul(d_out, w_down.T, dtype)
  if act_name == "silu":
    sig = jax.nn.sigmoid(gate)
    act = gate * sig
    d_gate = d_hidden * up * (sig * (1 + gate * (1 - sig)))
  else:  # elementwise: its derivative is a forward-mode product with ones
    act, slope = jax.jvp(_ACT[act_name], (gate,), (jnp.ones_like(gate),))
    d_gate = d_hidden * up * slope
  d_up = d_hidden * act

  def weight_grad(x, d, w):  # x^T d summed over all tokens, in w's dtype
    flat = lambda a: a.reshape(-1, a.shape[-1]).astype(dtype)  # noqa: E731
    return jnp.einsum("mk,mn->kn", flat(x), flat(d), preferred_element_type=jnp.float32).astype(w.dtype)

  d_y = matmul(d_gate, w_gate.T, dtype) + matmul(d_up, w_up.T, dtype)
  return (d_y.astype(y.dtype), weight_grad(y, d_gate, w_gate), weight_grad(y, d_up, w_up),
          weight_grad(act * up, d_out, w_down))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(y: Array, w_gate: Array, w_up: Array, w_down: Array, dtype: Any,
           act: str = "silu") -> Array:
  """(silu(y @ w_gate) * (y @ w_up)) @ w_down: operands in `dtype`, fp32 accumulation.

  act="gelu_pytorch_tanh": GeGLU, tanh-approximated GELU in place of silu (Gemma).

  The backward is written out because XLA:CPU, differentiating the plain
  expression, fuses silu's derivative into a transposing copy for the weight
  gradient: a strided loop that took ~30 ms a layer of SmolLM2 at 1024 tokens
  (the MLP's backward 1.6x slower than this one; tests/models_test.py checks
  the gradients against PyTorch autograd).
  """
  return _swiglu(y, w_gate, w_up, w_down, jnp.dtype(dtype), act)


# config.model.remat -> jax.checkpoint policy (None: save nothing). "none" is no checkpoint.
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}
REMAT = ("none", *REMAT_POLICIES)


def remat_layer(layer, remat: str = "none"):
  """`layer` under jax.checkpoint with the policy `remat` names ("none": unchanged)."""
  if remat == "none":
    return layer
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; expected one of {list(REMAT)}")
  # prevent_cse=False: inside a scan the recomputation cannot be merged with the forward
  # anyway, and the barrier it would add only slows the loop (jax.checkpoint's docs).
  return jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)


# (k, v [rows, KV, S, D], mask [rows, S]): keys and values held outside the call
Keys = tuple[Array, Array, Array]


def _dot(spec: str, x: Array, y: Array, dtype: Any) -> Array:
  """einsum of x and y with operands in `dtype`, accumulated in fp32."""
  return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Window:
  """A sliding window for `attention`: a query at position i sees keys at positions j with
  i - size < j (and the causal / padding masks); size 0 (or less) sees every key.

  size: int scalar (may be traced: one per layer in the layer scan).
  q_pos: [B, L] the queries' positions (in a block of queries: [B, Q], the block's).
  k_pos: [B, L] the call's keys' positions (None: q_pos; the call's queries are its keys).
  cache_pos: [B, S] the cache slots' positions, if a cache is read.
  prefix_pos: [P, Sp] the prefix's positions, if a prefix is read.
  """

  size: Array | int
  q_pos: Array
  k_pos: Array | None = None
  cache_pos: Array | None = None
  prefix_pos: Array | None = None


jax.tree_util.register_dataclass(
    Window, data_fields=["size", "q_pos", "k_pos", "cache_pos", "prefix_pos"], meta_fields=[])


def _in_window(size: Array | int, q_pos_XxQ: Array, k_pos_XxS: Array) -> Array:
  """[X, Q, S] bool: key within the window of the query (size <= 0: always)."""
  return (size <= 0) | (q_pos_XxQ[..., :, None] - k_pos_XxS[..., None, :] < size)


def _attend(q_BxKxGxQxD: Array, first: Array | int, k_BxKxLxD: Array, v_BxKxLxD: Array,
            mask_BxL: Array, cache: Keys | None, prefix: Keys | None, dtype: Any,
            scale: float | None = None, window: Window | None = None) -> Array:
  """Attention of the call's queries first .. first + Q - 1 over every key: [B, KV, G, Q, D].

  The scores of these Q queries over all keys (the call's L, the cache's S, the
  prefix's Sp) exist at once, fp32; nothing else does. `window.q_pos`: these Q
  queries' positions [B, Q]; `window.k_pos`: the call's L keys' [B, L].
  """
  b, kv, g, nq, hd = q_BxKxGxQxD.shape
  l = k_BxKxLxD.shape[2]
  q = q_BxKxGxQxD
  scale = 1.0 / math.sqrt(hd) if scale is None else scale
  f32 = jnp.float32
  if window is not None:
    q_pos_BxQ, new_pos_BxL = window.q_pos, window.k_pos
  # The call's keys: real ones, at or before the query's place in the call.
  causal_QxL = jnp.arange(l)[None, :] <= (first + jnp.arange(nq))[:, None]
  new_ok_BxQxL = causal_QxL[None] & mask_BxL[:, None, :]
  if window is not None:
    new_ok_BxQxL = new_ok_BxQxL & _in_window(window.size, q_pos_BxQ, new_pos_BxL)
  new_ok = new_ok_BxQxL[:, None, None]  # [B, 1, 1, Q, L]
  s_new = jnp.where(new_ok, _dot("bkgld,bksd->bkgls", q, k_BxKxLxD, dtype) * scale, -jnp.inf)
  m = jnp.max(s_new, axis=-1, keepdims=True)
  if cache is not None:  # the cache's real slots
    k_cache, v_cache, cache_mask_BxS = cache
    cache_ok = cache_mask_BxS[:, None, :]  # [B, 1 or Q, S]
    if window is not None:
      cache_ok = cache_ok & _in_window(window.size, q_pos_BxQ, window.cache_pos)
    s_cache = jnp.where(cache_ok[:, None, None],
                        _dot("bkgld,bksd->bkgls", q, k_cache, dtype) * scale, -jnp.inf)
    m = jnp.maximum(m, jnp.max(s_cache, axis=-1, keepdims=True))
  if prefix is not None:
    # Rows of a group share their prompt's keys. fp32 operands: XLA's CPU dot has
    # no bf16 x bf16 -> f32 kernel for this grouped product, and the prefix is
    # small (read once per group).
    k_prefix, v_prefix, prefix_mask_PxS = prefix
    n_prompts = prefix_mask_PxS.shape[0]
    group = b // n_prompts
    q_grouped = q.reshape(n_prompts, group, kv, g, nq, hd)
    prefix_ok = prefix_mask_PxS[:, None, None, :]  # [P, 1 or J, 1 or Q, Sp]
    if window is not None:
      prefix_ok = prefix_ok & _in_window(window.size, q_pos_BxQ.reshape(n_prompts, group, nq),
                                         window.prefix_pos[:, None, :])
    s_prefix = jnp.where(prefix_ok[:, :, None, None],
                         _dot("pjkgld,pksd->pjkgls", q_grouped, k_prefix, f32) * scale,
                         -jnp.inf).reshape(b, kv, g, nq, -1)
    m = jnp.maximum(m, jnp.max(s_prefix, axis=-1, keepdims=True))
  # Softmax is shift-invariant: no gradient through the shift. A padding query
  # sees no key: shift 0, denominator 1, output 0 (and no NaN gradient).
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p_new = jnp.exp(s_new - m)
  denom = jnp.sum(p_new, axis=-1, keepdims=True)
  out = _dot("bkgls,bksd->bkgld", p_new, v_BxKxLxD, dtype)
  if cache is not None:
    p_cache = jnp.exp(s_cache - m)
    denom = denom + jnp.sum(p_cache, axis=-1, keepdims=True)
    out = out + _dot("bkgls,bksd->bkgld", p_cache, v_cache, dtype)
  if prefix is not None:
    p_prefix = jnp.exp(s_prefix - m)
    denom = denom + jnp.sum(p_prefix, axis=-1, keepdims=True)
    p_grouped = p_prefix.reshape(n_prompts, group, kv, g, nq, -1)
    out = out + _dot("pjkgls,pksd->pjkgld", p_grouped, v_prefix, f32).reshape(b, kv, g, nq, hd)
  return out / jnp.where(denom > 0, denom, 1.0)


def attention(q_BxKxGxLxD: Array, k_BxKxLxD: Array, v_BxKxLxD: Array, mask_BxL: Array, *,
              cache: Keys | None = None, prefix: Keys | None = None, dtype: Any = jnp.float32,
              block: int = 0, scale: float | None = None, window: Window | None = None) -> Array:
  """Grouped-query attention of a call's L queries, fp32: [B, KV, G, L, D].

  Keys come from up to three places, each with its own mask:
  - the call's own k/v [B, KV, L, D]: causal by place in the call, real tokens
    only (`mask_BxL`, bool);
  - `cache` (k, v [B, KV, S, D], mask [B, S]): the slots that hold real tokens;
  - `prefix` (k, v [P, KV, Sp, D], mask [P, Sp]): row r reads prompt r // (B / P);
    each prompt's keys are read once per group of B / P rows, never copied.
  Query-key products run in `dtype` (the prefix's in fp32), accumulated in fp32.
  Scores are scaled by `scale` (None: head_dim ** -0.5). `window`: a sliding
  window by position over all three key sources (`Window`; None: none).

  block > 0 and L > block: the queries go through in blocks of `block` (the last
  one padded with zero queries whose outputs are dropped), one block at a time
  in a `lax.scan`, each under `jax.checkpoint`: only one block's scores
  [B, KV, G, block, L + S + Sp] exist at a time, and the backward recomputes a
  block's scores from its queries instead of keeping them (module doc). Each
  row's result is the same as unblocked (up to the order of fp32 sums).
  """
  b, kv, g, l, hd = q_BxKxGxLxD.shape
  keys = (k_BxKxLxD, v_BxKxLxD, mask_BxL, cache, prefix)
  if window is not None and window.k_pos is None:  # the call's keys are its queries
    window = dataclasses.replace(window, k_pos=window.q_pos)
  if block <= 0 or l <= block:
    return _attend(q_BxKxGxLxD, 0, *keys, dtype, scale, window)
  n_blocks = -(-l // block)
  q = jnp.pad(q_BxKxGxLxD, ((0, 0),) * 3 + ((0, n_blocks * block - l), (0, 0)))
  q_NxBxKxGxQxD = q.reshape(b, kv, g, n_blocks, block, hd).transpose(3, 0, 1, 2, 4, 5)
  # Each block's query positions (the padding queries' are never used).
  q_pos_NxBxQ = None
  if window is not None:
    q_pos_NxBxQ = jnp.pad(window.q_pos, ((0, 0), (0, n_blocks * block - l)))
    q_pos_NxBxQ = q_pos_NxBxQ.reshape(b, n_blocks, block).swapaxes(0, 1)
  # Saves nothing: the backward recomputes the block's scores from its inputs.
  one_block = jax.checkpoint(
      lambda q_blk, first, win, *key_args: _attend(q_blk, first, *key_args, dtype, scale, win),
      prevent_cse=False)

  def step(carry, xs):
    q_blk, first, q_pos_blk = xs
    win = None if window is None else dataclasses.replace(window, q_pos=q_pos_blk)
    return carry, one_block(q_blk, first, win, *keys)

  firsts = jnp.arange(n_blocks, dtype=jnp.int32) * block
  _, out = jax.lax.scan(step, None, (q_NxBxKxGxQxD, firsts, q_pos_NxBxQ),
                        unroll=flop_count.SCAN_UNROLL.get())
  return out.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, n_blocks * block, hd)[:, :, :, :l]


def positions_from_mask(mask_BxL: Array, offset_B: Array | int = 0) -> Array:
  """Position of each token = real tokens before it (padding does not count)."""
  return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=1) - 1, 0) + jnp.asarray(
      offset_B
  ).reshape(-1, 1)


# The per-layer matmul weights an adapter can target ([L, in, out] each), and the ends of
# an adapter's two params' names: q_proj_lora_a [L, in, r], q_proj_lora_b [L, r, out].
LORA_TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ENDS = ("_lora_a", "_lora_b")


class LoRA(nnx.Module):
  """Low-rank adapters of a Transformer's projections: W x becomes W x + (alpha / rank) B A x
  (here row vectors: y @ W + scale * (y @ A) @ B), stacked over layers like the weights.

  A starts as peft's (uniform in +-1 / sqrt(in)), B at zero: the adapted model starts as the
  base. `targets` (names in LORA_TARGETABLE), `rank` and `scale` are structure (the graphdef).
  """

  def __init__(self, cfg: ModelConfig, targets: tuple[str, ...], rank: int, alpha: float, *,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank={rank}; expected >= 1")
    unknown = sorted(set(targets) - set(LORA_TARGETABLE))
    if unknown or not targets:
      raise ValueError(f"LoRA targets {list(targets)}: expected some of {LORA_TARGETABLE}")
    self.targets, self.rank, self.scale = tuple(targets), int(rank), float(alpha) / rank
    shapes = projection_shapes(cfg)
    for name in self.targets:
      nl, d_in, d_out = shapes[name]
      bound = 1.0 / math.sqrt(d_in)
      setattr(self, f"{name}_lora_a", nnx.Param(jax.random.uniform(
          rngs.params(), (nl, d_in, rank), param_dtype, -bound, bound)))
      setattr(self, f"{name}_lora_b", nnx.Param(jnp.zeros((nl, rank, d_out), param_dtype)))


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
  """[num_layers, in, out] of each per-layer projection (LORA_TARGETABLE)."""
  d, f, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q_proj": (nl, d, q), "k_proj": (nl, d, kv), "v_proj": (nl, d, kv),
          "o_proj": (nl, q, d), "gate_proj": (nl, d, f), "up_proj": (nl, d, f),
          "down_proj": (nl, f, d)}


# config.model.attention_block's default: queries per attention block (0: never blocked).
ATTENTION_BLOCK = 512


class Transformer(nnx.Module):
  """Llama-family decoder. `model(tokens) -> logits [B, L, V]` in fp32.

  `attention_block`: a call of more queries than this computes attention in
  blocks of this many queries (`attention`; 0: all at once). Like `dtype`, part
  of the module's structure (its graphdef), not of its params.
  """

  def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, attention_block: int = ATTENTION_BLOCK,
               rngs: nnx.Rngs):
    self.lora = nnx.data(None)  # low-rank adapters (grpo_jax/lora.py attaches them; None: plain model)
    if attention_block < 0:
      raise ValueError(f"attention_block={attention_block}; expected >= 0 (0: never blocked)")
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.attention_block = int(attention_block)
    nl, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def normal(*shape, std=0.02):
      return nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))

    def ones(*shape):
      return nnx.Param(jnp.ones(shape, param_dtype))

    def zeros(*shape):
      return nnx.Param(jnp.zeros(shape, param_dtype))

    # A norm's weight is its scale, or (norm_plus_one) the scale's offset from 1.
    norm = zeros if cfg.norm_plus_one else ones
    self.embed = normal(cfg.vocab_size, d)
    # Per-layer weights, stacked: [num_layers, ...]; kernels are [in, out].
    self.attn_norm = norm(nl, d)
    self.q_proj = normal(nl, d, h * hd)
    self.k_proj = normal(nl, d, kv * hd)
    self.v_proj = normal(nl, d, kv * hd)
    self.o_proj = normal(nl, h * hd, d)
    if cfg.attention_bias:
      self.q_bias, self.k_bias, self.v_bias = zeros(nl, h * hd), zeros(nl, kv * hd), zeros(nl, kv * hd)
    if cfg.qk_norm:
      self.q_norm, self.k_norm = norm(nl, hd), norm(nl, hd)
    if cfg.sandwich_norm:
      self.post_attn_norm, self.post_mlp_norm = norm(nl, d), norm(nl, d)
    self.mlp_norm = norm(nl, d)
    self.gate_proj = normal(nl, d, f)
    self.up_proj = normal(nl, d, f)
    self.down_proj = normal(nl, f, d)
    self.final_norm = norm(d)
    if not cfg.tie_word_embeddings:
      self.lm_head = normal(d, cfg.vocab_size)

  # -- cache ------------------------------------------------------------------
  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None,
                 prefix: Cache | None = None) -> Cache:
    """An empty cache of `max_len` slots per row.

    With `prefix` (a filled cache of P prompts, P dividing batch_size), row r
    also attends to prompt r // (batch_size // P) of the prefix.
    """
    cfg = self.cfg
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or self.dtype
    zeros = lambda: sharding.constrain(jnp.zeros(shape, dtype), sharding.KV_CACHE)  # noqa: E731
    cache = dict(k=zeros(), v=zeros(),
                 mask=jnp.zeros((batch_size, max_len), bool), index=jnp.zeros((), jnp.int32))
    if prefix is not None:
      if batch_size % prefix["mask"].shape[0]:
        raise ValueError(f"batch_size={batch_size} is not a multiple of the prefix's "
                         f"{prefix['mask'].shape[0]} rows")
      cache["prefix"] = dict(k=prefix["k"], v=prefix["v"], mask=prefix["mask"])
    return cache

  # -- forward ----------------------------------------------------------------
  def _layer_params(self) -> dict[str, Array]:
    """The stacked per-layer params the layer scan reads, the adapters' (`LoRA`) among them."""
    params = {n: getattr(self, n)[...] for n in layer_param_names(self.cfg)}
    if self.lora is not None:
      params.update({f"{n}{end}": getattr(self.lora, f"{n}{end}")[...]
                     for n in self.lora.targets for end in LORA_ENDS})
    return params

  def prefill(self, tokens_BxL: Array, attention_mask_BxL: Array | None = None,
              max_len: int | None = None, remat: str = "none"):
    """Runs a prompt into a new cache of `max_len` slots: (hidden [B, L, D], cache).

    The same as `hidden_states(..., cache=init_cache(B, max_len))`, without
    attending to the empty slots (a constant XLA would fold at compile time).
    """
    return self.hidden_states(tokens_BxL, attention_mask_BxL=attention_mask_BxL,
                              new_cache_len=max_len or tokens_BxL.shape[1], remat=remat)

  def hidden_states(self, tokens_BxL: Array, positions_BxL: Array | None = None,
                    attention_mask_BxL: Array | None = None, cache: Cache | None = None,
                    new_cache_len: int | None = None, remat: str = "none",
                    attention_block: int | None = None, prefix: Cache | None = None):
    """Final-norm hidden states [B, L, D] (fp32), and the updated cache if given.

    Args:
      tokens_BxL: int token ids.
      positions_BxL: RoPE positions; default: count of real tokens before each
        one (including those already in the cache), so left padding is handled.
      attention_mask_BxL: 1 for real tokens, 0 for padding; default all 1.
      cache: from `init_cache`, or None for a plain causal forward.
      new_cache_len: with cache=None, also return a new cache of this many
        slots holding this call's keys/values (see `prefill`).
      remat: what the backward keeps of each layer, one of REMAT (module doc);
        "none" keeps everything. Only matters under differentiation.
      attention_block: queries per attention block (`attention`); None: the
        module's `attention_block`.
      prefix: with cache=None, a filled cache {k, v, mask} of P prompts (P
        dividing B) that each group of B / P rows attends to, as a cache's
        "prefix" is; nothing else is cached or returned. For a forward that
        reads a shared prompt but writes nothing (the update's log-probs).
    """
    cfg = self.cfg
    b, l = tokens_BxL.shape
    h, kv, hd, dt = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.dtype
    g = h // kv
    mask_BxL = (jnp.ones((b, l), bool) if attention_mask_BxL is None
                else attention_mask_BxL.astype(bool))
    if cache is not None:
      if prefix is not None:
        raise ValueError("give a cache's prefix inside it (init_cache(..., prefix=...))")
      prefix = cache.get("prefix")
    if positions_BxL is None:
      offset = 0 if cache is None else jnp.sum(cache["mask"], axis=1)
      if prefix is not None:
        offset = offset + jnp.repeat(jnp.sum(prefix["mask"], axis=1), b // prefix["mask"].shape[0])
      positions_BxL = positions_from_mask(mask_BxL, offset)
    block = self.attention_block if attention_block is None else attention_block
    cache_mask = None if cache is None else cache["mask"]
    prefix_mask = None if prefix is None else prefix["mask"]
    eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    # Local and global layers differ in their window and RoPE frequencies: scan inputs.
    if cfg.has_local_layers:
      inv_freq = None
      per_layer = (jnp.asarray(cfg.layer_windows(), jnp.int32),
                   jnp.stack([rope_inv_freq(cfg, local=w > 0) for w in cfg.layer_windows()]))
      window_pos = dict(q_pos=positions_BxL)
      if prefix is not None:
        window_pos["prefix_pos"] = positions_from_mask(prefix_mask)
      if cache is not None:
        window_pos["cache_pos"] = positions_from_mask(
            cache_mask, 0 if prefix is None else
            jnp.repeat(jnp.sum(prefix_mask, axis=1), b // prefix_mask.shape[0]))
    else:
      inv_freq, per_layer = rope_inv_freq(cfg), None

    lora_scale = None if self.lora is None else self.lora.scale

    def proj(y, p, name):
      """y @ p[name], plus the adapter's scale * (y @ A) @ B when `name` has one (unmerged: the
      frozen weight gets no gradient, the adapters' is rank-wide)."""
      out = matmul(y, p[name], dt)
      if f"{name}_lora_a" in p:
        low = matmul(y, p[f"{name}_lora_a"], dt)
        out = out + lora_scale * matmul(low, p[f"{name}_lora_b"], dt)
      return out

    def mlp(y, p):
      if not any(f"{n}_lora_a" in p for n in ("gate_proj", "up_proj", "down_proj")):
        return swiglu(y, p["gate_proj"], p["up_proj"], p["down_proj"], dt, cfg.hidden_act)
      # With adapters the plain expression: its backward needs no weight gradient of the
      # frozen MLP, the slow part that swiglu's hand-written backward avoids.
      gate = _ACT[cfg.hidden_act](proj(y, p, "gate_proj"))
      return proj(gate * proj(y, p, "up_proj"), p, "down_proj")

    def layer(x, inputs):
      p, k_cache, v_cache, k_prefix, v_prefix, layer_xs = inputs
      window, freqs = None, inv_freq
      if layer_xs is not None:
        window_size, freqs = layer_xs
        window = Window(size=window_size, **window_pos)
      y = rms_norm(x, p["attn_norm"], eps, plus_one)
      q, k, v = proj(y, p, "q_proj"), proj(y, p, "k_proj"), proj(y, p, "v_proj")
      if cfg.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
      q, k, v = q.reshape(b, l, h, hd), k.reshape(b, l, kv, hd), v.reshape(b, l, kv, hd)
      if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], eps, plus_one)
        k = rms_norm(k, p["k_norm"], eps, plus_one)
      q, k = apply_rope(q, positions_BxL, freqs), apply_rope(k, positions_BxL, freqs)
      # Grouped-query attention in the cache's layout: q [B, KV, G, L, hd], k/v [B, KV, L, hd].
      q = q.reshape(b, l, kv, g, hd).transpose(0, 2, 3, 1, 4)
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      attn = attention(q, k, v, mask_BxL,
                       cache=None if k_cache is None else (k_cache, v_cache, cache_mask),
                       prefix=None if k_prefix is None else (k_prefix, v_prefix, prefix_mask),
                       dtype=dt, block=block, scale=scale, window=window)
      attn = attn.transpose(0, 3, 1, 2, 4).reshape(b, l, h * hd)
      out = proj(attn, p, "o_proj")
      if cfg.sandwich_norm:
        out = rms_norm(out, p["post_attn_norm"], eps, plus_one)
      x = x + out
      y = rms_norm(x, p["mlp_norm"], eps, plus_one)
      out = mlp(y, p)
      if cfg.sandwich_norm:
        out = rms_norm(out, p["post_mlp_norm"], eps, plus_one)
      x = x + out
      x = sharding.constrain(x, sharding.ACTIVATIONS)
      return x, (k, v) if keep_kv else None

    keep_kv = cache is not None or new_cache_len is not None
    x = self.embed[...][tokens_BxL]
    if cfg.embed_scale:  # rounded to the compute dtype first, as Hugging Face's Gemma does
      x = x.astype(dt) * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
    x = sharding.constrain(x.astype(jnp.float32), sharding.ACTIVATIONS)
    caches = (None, None) if cache is None else (cache["k"], cache["v"])
    prefixes = (None, None) if prefix is None else (prefix["k"], prefix["v"])
    x, new_kv = jax.lax.scan(remat_layer(layer, remat), x,
                             (self._layer_params(), *caches, *prefixes, per_layer),
                             unroll=flop_count.SCAN_UNROLL.get())
    x = rms_norm(x, self.final_norm[...], eps, plus_one)
    if not keep_kv:
      return x
    if cache is None:
      cache = self.init_cache(b, new_cache_len)
    k_new, v_new = new_kv
    start = cache["index"]
    write = lambda old, new: sharding.constrain(jax.lax.dynamic_update_slice(  # noqa: E731
        old, new.astype(old.dtype), (0, 0, 0, start, 0)), sharding.KV_CACHE)
    new_cache = dict(k=write(cache["k"], k_new), v=write(cache["v"], v_new),
                     mask=jax.lax.dynamic_update_slice(cache["mask"], mask_BxL, (0, start)),
                     index=start + l)
    if prefix is not None:
      new_cache["prefix"] = prefix
    return x, new_cache

  def logits(self, hidden: Array) -> Array:
    """LM head: hidden [..., D] -> fp32 logits [..., V]."""
    if self.cfg.tie_word_embeddings:
      return matmul(hidden, self.embed[...].T, self.dtype)
    return matmul(hidden, self.lm_head[...], self.dtype)

  def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
               attention_mask_BxL: Array | None = None, cache: Cache | None = None):
    """Logits [B, L, V] (fp32); with a cache, (logits, updated cache)."""
    out = self.hidden_states(tokens_BxL, positions_BxL, attention_mask_BxL, cache)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache


def completion_hidden_states(model, prompts_BxP: Array, prompt_mask_BxP: Array,
                             completions_NxT: Array, completion_mask_NxT: Array, *,
                             num_generations: int, remat: str = "none") -> Array:
  """Final hidden states [N, T, D] at the positions that predict each completion token.

  Token 0 is predicted by the prompt's last position, token t > 0 by completion
  token t - 1. The prompt runs once (B rows) and its G completions attend to it
  as a shared prefix, without a cache (nothing is written, no empty slots are
  attended to). The policy's log-probs (grpo.completion_logps) and the critic's
  values (ppo.completion_values) both read these states.

  Args:
    model: a Transformer, or anything with its `prefill` / `hidden_states` (a ValueModel).
    prompts_BxP: [B, P] int32, left-padded; prompt_mask_BxP [B, P].
    completions_NxT: [N, T] int32, N = B * num_generations rows, prompt-major;
      completion_mask_NxT [N, T].
    remat: what the backward keeps of each layer (`REMAT`).
  """
  h_prompt, prefix = model.prefill(prompts_BxP, prompt_mask_BxP, remat=remat)
  first = jnp.repeat(h_prompt[:, -1:], num_generations, axis=0)  # [N, 1, D]
  if completions_NxT.shape[1] == 1:
    return first
  h_rest = model.hidden_states(completions_NxT[:, :-1],
                               attention_mask_BxL=completion_mask_NxT[:, :-1],
                               prefix=prefix, remat=remat)
  return jnp.concatenate([first, h_rest], axis=1)


def init_model(cfg: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               attention_block: int = ATTENTION_BLOCK, seed: int = 0) -> Transformer:
  """A randomly initialised model (for tests and from-scratch runs)."""
  return Transformer(cfg, dtype=dtype, param_dtype=param_dtype, attention_block=attention_block,
                     rngs=nnx.Rngs(seed))


def model_from_params(cfg: ModelConfig, params: dict[str, Any], *, dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32,
                      attention_block: int = ATTENTION_BLOCK) -> Transformer:
  """Builds the module around given arrays without a random init (no wasted memory)."""
  abstract = nnx.eval_shape(
      lambda: Transformer(cfg, dtype=dtype, param_dtype=param_dtype,
                          attention_block=attention_block, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = nnx.to_pure_dict(state)
  if set(expected) != set(params):
    raise ValueError(
        f"param names do not match the architecture: missing {sorted(set(expected) - set(params))}, "
        f"unexpected {sorted(set(params) - set(expected))}")
  arrays = {}
  for name, spec in expected.items():
    if tuple(params[name].shape) != tuple(spec.shape):
      raise ValueError(f"param {name!r} has shape {tuple(params[name].shape)}, expected {spec.shape}")
    arrays[name] = jnp.asarray(params[name], dtype=param_dtype)
  nnx.replace_by_pure_dict(state, arrays)
  return nnx.merge(graphdef, state)
