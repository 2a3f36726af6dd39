"""Sampling G completions per prompt with a KV cache, all inside one jit.

    out = sample(graphdef, params, prompts_BxP, prompt_mask_BxP, key,
                 num_generations=G, max_new_tokens=T, stop_ids=(eos,), pad_id=pad,
                 temperature=1.0, top_k=0, top_p=1.0)
    out.tokens [B*G, T], out.mask [B*G, T] (1 up to and including the stop token),
    out.logps [B*G, T], out.lengths [B*G], out.truncated [B*G]

Prompts are left-padded to a common length (a bucket), so every row's last
prompt token sits in the same column. Each prompt is prefilled once, and its
KV cache is the shared prefix of its G rows (row i*G + j is answer j to prompt
i, the layout GRPO's advantages expect): read once per group at each step,
never copied G times. Decoding runs in a `lax.while_loop` that ends
when every row has produced a stop token or T tokens.

Sampling settings are traced values: a new temperature, top-k or top-p does not
compile a new program. Randomness: row r at decode step t draws from
fold_in(fold_in(key, r), t), so a row's sample depends only on the key, its
row index and its prompt, not on the batch size or on how the batch is sharded.

`logps` are the log-probabilities of the sampled tokens under the
temperature-scaled, untruncated distribution softmax(logits / temperature)
(under softmax(logits) when greedy): the sampling policy's log-probs that GRPO
uses as old_logps when the training step scales logits the same way.

A model is anything with the protocol of `models.Transformer`:
`init_cache(batch, max_len, prefix=None)`, `prefill(tokens, mask)`, `hidden_states(tokens,
attention_mask_BxL=..., cache=...) -> (hidden, cache)` and `logits(hidden)`;
tests plug in small fake models through the same protocol.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from grpo_jax import sharding

# Top-k / top-p look at this many best candidates (lax.top_k, cheap); only when
# they are not enough (top_k larger, or their mass below top_p) does a full sort
# over the vocabulary run (~0.7 s a step for 32 x 49k logits on a 2-core CPU).
TOP_CANDIDATES = 64
_BLOCK = 256  # vocabulary block of the two-level inverse-CDF sampler


@struct.dataclass
class Completions:
  """Sampled completions, N = B * G rows, prompt-major."""
  tokens: jax.Array  # [N, T] int32, pad_id after the stop token
  mask: jax.Array  # [N, T] int32, 1 for completion tokens up to and including the stop token
  logps: jax.Array  # [N, T] float32, 0 where mask is 0
  lengths: jax.Array  # [N] int32, number of completion tokens (= mask.sum(-1))
  truncated: jax.Array  # [N] bool, reached T tokens without a stop token


@struct.dataclass
class _LoopState:
  step: jax.Array
  tokens: jax.Array
  logps: jax.Array
  done: jax.Array
  lengths: jax.Array
  logits: jax.Array  # [N, V] logits for the next token
  cache: Any


# -- per-step token selection ----------------------------------------------------------
def _cutoff(best_NxC, logits_NxV, top_k, top_p):
  """Smallest logit to keep per row [N, 1], from the C best logits in order.

  Also returns whether C candidates were enough for an exact answer.
  """
  c, v = best_NxC.shape[-1], logits_NxV.shape[-1]
  use_k = top_k > 0
  ranked = jnp.where(~use_k | (jnp.arange(c) < top_k), best_NxC, -jnp.inf)
  # Normalise over the top-k survivors of the whole vocabulary (all of it without top-k).
  kth = jnp.where(use_k, best_NxC[:, jnp.clip(top_k, 1, c) - 1], -jnp.inf)[:, None]
  log_z = jax.nn.logsumexp(jnp.where(logits_NxV >= kth, logits_NxV, -jnp.inf), -1, keepdims=True)
  probs = jnp.exp(ranked - log_z)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = jnp.isfinite(ranked) & ((mass_before < top_p) | (top_p >= 1.0))
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  cut = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
  # Exact if the candidates hold all top-k survivors, or (top-p alone) the nucleus.
  enough = jnp.where(use_k, top_k <= c, (c == v) | jnp.all(jnp.sum(probs, -1) >= top_p))
  return cut, enough


def _truncate(logits_NxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets logits outside the top-k, then outside the top-p nucleus, to -inf.

  As in transformers: top-k first, then top-p over the renormalised survivors;
  the nucleus is the smallest set of best tokens whose mass reaches top_p.
  """
  cap = min(TOP_CANDIDATES, logits_NxV.shape[-1])
  cut, enough = _cutoff(jax.lax.top_k(logits_NxV, cap)[0], logits_NxV, top_k, top_p)
  cut = jax.lax.cond(enough, lambda: cut, lambda: _cutoff(
      -jnp.sort(-logits_NxV, axis=-1), logits_NxV, top_k, top_p)[0])
  return jnp.where(logits_NxV >= cut, logits_NxV, -jnp.inf)


def _inverse_cdf(logits_NxV: jax.Array, u_N: jax.Array) -> jax.Array:
  """Index drawn from softmax(logits) by inverse CDF, one uniform per row.

  Two levels (blocks of the vocabulary, then within the chosen block) so that no
  cumsum runs over the whole vocabulary: O(V) work, like one softmax.
  """
  n, v = logits_NxV.shape
  nb = -(-v // _BLOCK)
  padded = jnp.pad(logits_NxV, ((0, 0), (0, nb * _BLOCK - v)), constant_values=-jnp.inf)
  p = jnp.exp(padded - jnp.max(padded, axis=-1, keepdims=True)).reshape(n, nb, _BLOCK)
  block_mass = jnp.sum(p, axis=-1)  # [N, nb]
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = u_N * block_cdf[:, -1]
  # Last block with mass: rounding must never land on an empty tail.
  last_block = nb - 1 - jnp.argmax((block_mass > 0)[:, ::-1], axis=-1)
  b = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), last_block)
  within = jnp.take_along_axis(p, b[:, None, None], axis=1)[:, 0]  # [N, BLOCK]
  start = jnp.take_along_axis(block_cdf - block_mass, b[:, None], axis=-1)[:, 0]
  cdf = start[:, None] + jnp.cumsum(within, axis=-1)
  last = _BLOCK - 1 - jnp.argmax((within > 0)[:, ::-1], axis=-1)
  j = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), last)
  return (b * _BLOCK + j).astype(jnp.int32)


def select_tokens(logits_NxV, keys_N, temperature, top_k, top_p):
  """Next tokens [N] and their log-probs [N] under softmax(logits / temperature)."""
  logits = logits_NxV.astype(jnp.float32)
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)
  truncated = jax.lax.cond((top_k > 0) | (top_p < 1.0),
                           lambda: _truncate(scaled, top_k, top_p), lambda: scaled)
  u = jax.vmap(jax.random.uniform)(keys_N)
  tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), _inverse_cdf(truncated, u))
  logps = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens.astype(jnp.int32), logps


# -- the sampler --------------------------------------------------------------------
def start_decoding(model, prompts_BxP, prompt_mask_BxP, num_generations: int, max_new_tokens: int):
  """What the decode loop starts from: the first tokens' logits [B*G, V] and the cache.

  Each prompt is prefilled once; its G rows share that cache as their prefix.
  """
  hidden, prefix = model.prefill(prompts_BxP, prompt_mask_BxP)
  logits = jnp.repeat(model.logits(hidden[:, -1]), num_generations, axis=0)
  cache = model.init_cache(prompts_BxP.shape[0] * num_generations, max_new_tokens, prefix=prefix)
  return logits, cache


def sample(graphdef: nnx.GraphDef, params: Any, prompts_BxP: jax.Array, prompt_mask_BxP: jax.Array,
           key: jax.Array, *, num_generations: int, max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int, temperature=1.0, top_k=0, top_p=1.0,
           row_offset=0, prompt_ids=None) -> Completions:
  """Samples `num_generations` completions for each left-padded prompt.

  Jittable: `num_generations`, `max_new_tokens`, `stop_ids`, `pad_id` are static;
  `temperature` (0 = greedy), `top_k` (0 = off), `top_p` (1 = off) and `key` are
  traced. Row r (answer j to prompt i) draws from fold_in(key, r) with r = i * G + j +
  `row_offset`, or r = prompt_ids[i] * G + j when `prompt_ids` [B] (int) is given: the
  prompts' places in a larger batch, so that sampling it a part at a time draws the same.
  """
  if not stop_ids:
    raise ValueError("stop_ids is empty: give at least the tokenizer's eos_token_id")
  model = nnx.merge(graphdef, params)
  b, p = prompts_BxP.shape
  g, t_max = num_generations, max_new_tokens
  n = b * g
  stop = jnp.asarray(tuple(stop_ids), jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  row_ids = (row_offset + jnp.arange(n) if prompt_ids is None else
             (prompt_ids[:, None] * g + jnp.arange(g)).reshape(n))
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)

  logits, cache = start_decoding(model, prompts_BxP, prompt_mask_BxP, g, t_max)

  def cond(s: _LoopState):
    return (s.step < t_max) & ~jnp.all(s.done)

  def body(s: _LoopState):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, s.step)
    tok, logp = select_tokens(s.logits, keys, temperature, top_k, top_p)
    live = ~s.done
    tok = jnp.where(live, tok, pad_id)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    logps = jax.lax.dynamic_update_slice(s.logps, jnp.where(live, logp, 0.0)[:, None], (0, s.step))
    done = s.done | jnp.isin(tok, stop)
    hidden, cache = model.hidden_states(tok[:, None], attention_mask_BxL=live[:, None], cache=s.cache)
    return _LoopState(step=s.step + 1, tokens=tokens, logps=logps, done=done,
                      lengths=s.lengths + live.astype(jnp.int32),
                      logits=model.logits(hidden[:, 0]), cache=cache)

  init = _LoopState(step=jnp.zeros((), jnp.int32), tokens=jnp.full((n, t_max), pad_id, jnp.int32),
                    logps=jnp.zeros((n, t_max), jnp.float32), done=jnp.zeros((n,), bool),
                    lengths=jnp.zeros((n,), jnp.int32), logits=logits, cache=cache)
  final = jax.lax.while_loop(cond, body, init)
  mask = (jnp.arange(t_max)[None, :] < final.lengths[:, None]).astype(jnp.int32)
  return Completions(tokens=final.tokens, mask=mask, logps=final.logps, lengths=final.lengths,
                     truncated=~final.done)


# -- the sampler's copy of the weights -------------------------------------------------
# Weights whose every use is a matmul operand cast to the compute dtype: casting them once
# before a rollout changes no result. Norm scales, biases and the embedding table (its rows
# are looked up in fp32) keep their storage dtype.
MATMUL_WEIGHTS = re.compile(r".*_proj|lm_head")


def _is_matmul_weight(path) -> bool:
  return bool(MATMUL_WEIGHTS.fullmatch(sharding.param_name(path) or ""))


def cast_for_rollout(params, dtype):
  """params with the matmul weights (`MATMUL_WEIGHTS`) in `dtype`, the rest as they are."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if _is_matmul_weight(path) else x, params)


def rollout_copier(param_shardings, rollout_shardings, dtype) -> Callable[[Any], Any]:
  """params -> the sampler's own copy of them: matmul weights cast to the compute `dtype`
  (`MATMUL_WEIGHTS`), laid out as `rollout_shardings` (`sharding.rollout_shardings`: whole
  weights on each device but for the tensor split), made by one jitted program.

  The decode loop then reads half the bytes (bf16 from fp32 master weights) and gathers no
  FSDP shard at each token: the gather happens once per rollout. Sampling from the copy gives
  the same tokens and log-probs as from the params. When the copy would equal the params
  (same dtypes, same layout, e.g. fp32 on one CPU), the copier returns them: no copy. Drop the
  copy after the rollout, so that its memory is free for the update.
  """
  dtype = jnp.dtype(dtype)
  copy = jax.jit(functools.partial(cast_for_rollout, dtype=dtype), out_shardings=rollout_shardings)

  def rollout_params(params):
    same_dtype = all(x.dtype == dtype or not _is_matmul_weight(path)
                     for path, x in jax.tree_util.tree_leaves_with_path(params))
    same_layout = all(a.is_equivalent_to(b, x.ndim) for a, b, x in zip(
        jax.tree.leaves(param_shardings), jax.tree.leaves(rollout_shardings),
        jax.tree.leaves(params)))
    return params if same_dtype and same_layout else copy(params)

  return rollout_params


def sample_in_parts(graphdef, params, prompts_BxP, prompt_mask_BxP, key, *, parts: int,
                    shards: int = 1, num_generations: int, **kwargs) -> Completions:
  """`sample`, one part of the prompts after the other (`lax.map`): the KV cache and the
  decode state exist for B / parts prompts at a time. The same completions as one `sample`
  call (each row keeps its random stream), in the same order.

  Each part takes B / (shards * parts) prompts from each of the `shards` equal blocks of rows
  that the batch axes split the batch into (sharding.BATCH_AXES: data x fsdp), so every part
  is spread over all the devices and no row moves between devices.
  """
  b = prompts_BxP.shape[0]
  if parts == 1:
    return sample(graphdef, params, prompts_BxP, prompt_mask_BxP, key,
                  num_generations=num_generations, **kwargs)
  if b % (shards * parts):
    raise ValueError(f"{b} prompts do not split into {parts} parts over {shards} shards")
  m, g = b // (shards * parts), num_generations

  def split(x):  # [B, ...] -> [parts, shards * m, ...]: part i = rows i*m..(i+1)*m of each block
    rest = x.shape[1:]
    return x.reshape(shards, parts, m, *rest).swapaxes(0, 1).reshape(parts, shards * m, *rest)

  def merge(x):  # [parts, shards * m * G, ...] -> [B * G, ...] in the batch's row order
    rest = x.shape[2:]
    return x.reshape(parts, shards, m * g, *rest).swapaxes(0, 1).reshape(b * g, *rest)

  def part(args):
    prompts, mask, ids = args
    return sample(graphdef, params, prompts, mask, key, num_generations=g, prompt_ids=ids,
                  **kwargs)

  out = jax.lax.map(part, (split(prompts_BxP), split(prompt_mask_BxP), split(jnp.arange(b))))
  return jax.tree.map(merge, out)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_generations", "max_new_tokens",
                                             "stop_ids", "pad_id", "parts", "shards"))
def sample_jit(graphdef, params, prompts_BxP, prompt_mask_BxP, key, *, num_generations,
               max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0, parts=1,
               shards=1):
  """`sample` under jit (static: graphdef, G, T, stop ids, pad id); with parts > 1,
  `sample_in_parts` (static too: parts, shards)."""
  kw = dict(num_generations=num_generations, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
            pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p)
  if parts > 1:
    return sample_in_parts(graphdef, params, prompts_BxP, prompt_mask_BxP, key, parts=parts,
                           shards=shards, **kw)
  return sample(graphdef, params, prompts_BxP, prompt_mask_BxP, key, **kw)
