"""Sampler tests: exactness against transformers, known outputs, distributions, compilation."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from grpo_jax import models, sampling
from grpo_jax.data import batching
from grpo_jax.models.transformer import ModelConfig


class Bigram(nnx.Module):
  """Fake model for the sampler's protocol: next-token logits = table[current token]."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def init_cache(self, batch, max_len, prefix=None):
    seen = jnp.zeros((batch,), jnp.int32)
    if prefix is not None:
      seen = jnp.repeat(prefix["seen"], batch // prefix["seen"].shape[0])
    return dict(index=jnp.zeros((), jnp.int32), seen=seen)

  def prefill(self, tokens, attention_mask_BxL):
    return self.hidden_states(tokens, attention_mask_BxL, self.init_cache(tokens.shape[0], 0))

  def hidden_states(self, tokens, attention_mask_BxL=None, cache=None):
    v = self.table.shape[0]
    seen = cache["seen"] + jnp.sum(attention_mask_BxL, axis=1)
    return jax.nn.one_hot(tokens, v), dict(index=cache["index"] + tokens.shape[1], seen=seen)

  def logits(self, hidden):
    return hidden @ self.table[...]


def counting_table(v, margin=10.0):
  """Greedy continuation of token i is i + 1 (mod v)."""
  return margin * np.roll(np.eye(v), 1, axis=1)


def run(model, prompts, mask, key=0, **kw):
  graphdef, params = nnx.split(model)
  defaults = dict(num_generations=1, max_new_tokens=8, stop_ids=(0,), pad_id=0)
  defaults.update(kw)
  out = sampling.sample_jit(graphdef, params, jnp.asarray(prompts), jnp.asarray(mask),
                            jax.random.key(key), **defaults)
  return jax.tree.map(np.asarray, out)


# -- known outputs and stopping -----------------------------------------------------
def test_fake_model_gives_known_greedy_outputs_and_stops():
  v = 10
  prompts = np.array([[0, 3, 5], [2, 2, 8], [0, 0, 1]])
  mask = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
  out = run(Bigram(counting_table(v)), prompts, mask, temperature=0.0, max_new_tokens=12,
            stop_ids=(0,), pad_id=7, num_generations=2)
  # Prompt-major layout: rows 0,1 answer prompt 0; rows 2,3 prompt 1; rows 4,5 prompt 2.
  expect = {0: [6, 7, 8, 9, 0], 1: [9, 0], 2: [2, 3, 4, 5, 6, 7, 8, 9, 0]}
  for row in range(6):
    e = expect[row // 2]
    np.testing.assert_array_equal(out.tokens[row, :len(e)], e)
    np.testing.assert_array_equal(out.tokens[row, len(e):], 7)  # pad after the stop token
    np.testing.assert_array_equal(out.mask[row], np.arange(12) < len(e))
    assert out.lengths[row] == len(e) and not out.truncated[row]
    assert np.all(out.logps[row, len(e):] == 0)


def test_length_limit_truncates():
  out = run(Bigram(counting_table(10)), np.array([[1]]), np.array([[1]]), temperature=0.0,
            max_new_tokens=4, stop_ids=(0,))
  np.testing.assert_array_equal(out.tokens[0], [2, 3, 4, 5])
  assert out.lengths[0] == 4 and out.truncated[0] and out.mask.sum() == 4


def test_several_stop_ids():
  out = run(Bigram(counting_table(10)), np.array([[1], [6]]), np.array([[1], [1]]),
            temperature=0.0, max_new_tokens=9, stop_ids=(4, 8))
  np.testing.assert_array_equal(out.lengths, [3, 2])  # 2,3,4 | 7,8


# -- distributions --------------------------------------------------------------------
def reference_probs(logits, temperature, top_k, top_p):
  """float64 numpy: temperature, then top-k, then top-p over the renormalised rest."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.ones_like(z, bool)
  if top_k:
    keep[order[top_k:]] = False
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1:
    sorted_p = p[order]
    before = np.cumsum(sorted_p) - sorted_p
    drop = order[before >= top_p]
    p[drop] = 0.0
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.6), (1.3, 20, 0.9),
    (1.0, 100, 1.0),  # top_k beyond the candidate cap: exact full-sort path
    (1.0, 0, 0.97),  # nucleus wider than the candidates: exact full-sort path
])
def test_sampled_distribution_matches_truncated_softmax(temperature, top_k, top_p):
  v, n = 300, 40000  # v > 256: the two-level inverse CDF uses two blocks
  logits = np.random.default_rng(0).normal(0, 1.5, v).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), n)
  select = jax.jit(sampling.select_tokens)
  tokens, logps = select(jnp.broadcast_to(logits, (n, v)), keys, temperature, top_k, top_p)
  counts = np.bincount(np.asarray(tokens), minlength=v) / n
  p = reference_probs(logits, temperature, top_k, top_p)
  assert np.all(counts[p == 0] == 0), "sampled a token outside the top-k / top-p set"
  tv = 0.5 * np.abs(counts - p).sum()
  assert tv < 0.03, tv
  # logps: the tempered, untruncated distribution.
  z = logits.astype(np.float64) / temperature
  log_softmax = z - np.log(np.exp(z - z.max()).sum()) - z.max()
  np.testing.assert_allclose(np.asarray(logps), log_softmax[np.asarray(tokens)], atol=1e-4)


def test_sampler_logps_are_the_tempered_bigram_logprobs():
  v = 12
  table = np.random.default_rng(3).normal(0, 2, (v, v))
  prompts, mask = np.array([[4, 5], [0, 9]]), np.array([[1, 1], [0, 1]])
  out = run(Bigram(table), prompts, mask, temperature=0.8, num_generations=3, max_new_tokens=6,
            stop_ids=(11,), key=5)
  for row in range(6):
    prev = prompts[row // 3, -1]
    for t in range(out.lengths[row]):
      z = table[prev] / 0.8
      ref = z[out.tokens[row, t]] - np.log(np.exp(z).sum())
      assert abs(out.logps[row, t] - ref) < 1e-4
      prev = out.tokens[row, t]


def test_same_key_same_samples_and_independent_of_batch():
  model = Bigram(np.random.default_rng(4).normal(0, 1, (50, 50)))
  prompts, mask = np.array([[3, 4], [7, 8], [1, 2]]), np.ones((3, 2), np.int32)
  kw = dict(temperature=1.0, num_generations=4, max_new_tokens=10, stop_ids=(49,))
  a, b = run(model, prompts, mask, key=9, **kw), run(model, prompts, mask, key=9, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  small = run(model, prompts[:2], mask[:2], key=9, **kw)  # fewer prompts, same first rows
  np.testing.assert_array_equal(small.tokens, a.tokens[:8])
  other = run(model, prompts, mask, key=10, **kw)
  assert not np.array_equal(other.tokens, a.tokens)
  # The G answers of one prompt differ from each other.
  assert len({tuple(r) for r in a.tokens[:4]}) > 1


def test_changing_sampling_settings_does_not_recompile():
  model = Bigram(counting_table(10))
  graphdef, params = nnx.split(model)
  prompts, mask = jnp.array([[1, 2]]), jnp.ones((1, 2), jnp.int32)
  kw = dict(num_generations=2, max_new_tokens=5, stop_ids=(0,), pad_id=0)
  before = sampling.sample_jit._cache_size()
  for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 3, 0.9), (0.0, 0, 1.0), (2.0, 7, 0.3)]:
    sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(0), temperature=temperature,
                        top_k=top_k, top_p=top_p, **kw)
  assert sampling.sample_jit._cache_size() == before + 1


# -- a real transformer -------------------------------------------------------------------
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, tie_word_embeddings=True)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-4), (jnp.bfloat16, 0.1)])
def test_sampler_logps_match_a_full_forward_of_prompt_and_completion(dtype, atol):
  """Decoding with the shared prompt prefix gives the logits a plain forward gives."""
  model = models.init_model(TINY, seed=3, dtype=dtype)
  prompts, mask = batching.left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=0, length=6)
  out = run(model, prompts, mask, temperature=1.0, num_generations=3, max_new_tokens=7,
            stop_ids=(1,), key=2)
  forward = models.jit_forward(model)
  for row in range(9):
    p = prompts[row // 3][mask[row // 3] == 1]
    n = out.lengths[row]
    seq = np.concatenate([p, out.tokens[row, :n]])[None]
    logits = np.asarray(forward(seq))[0, len(p) - 1:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = logits[np.arange(n), out.tokens[row, :n]] - logz
    np.testing.assert_allclose(out.logps[row, :n], ref, atol=atol)


def test_rollout_copy_samples_exactly_what_the_params_sample():
  """bf16 compute from fp32 master weights: the copy with bf16 matmul weights gives the same
  tokens and bit-identical log-probs (every use of those weights casts them to bf16 anyway)."""
  graphdef, params = nnx.split(models.init_model(TINY, seed=4, dtype=jnp.bfloat16))
  shardings = jax.tree.map(lambda x: x.sharding, params)
  copy = sampling.rollout_copier(shardings, shardings, "bfloat16")(params)
  assert copy["q_proj"].dtype == jnp.bfloat16 and params["q_proj"].dtype == jnp.float32
  prompts, mask = batching.left_pad([[5, 6, 7], [8, 9]], pad_id=0, length=4)
  kw = dict(num_generations=3, max_new_tokens=8, stop_ids=(1,), pad_id=0, temperature=1.0)
  ref = sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(5), **kw)
  got = sampling.sample_jit(graphdef, copy, prompts, mask, jax.random.key(5), **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(got.logps), np.asarray(ref.logps))
  # fp32 compute on one device: the copy would equal the params, so none is made.
  graphdef, params = nnx.split(models.init_model(TINY, seed=4))
  assert sampling.rollout_copier(shardings, shardings, "float32")(params) is params


def test_sampling_in_parts_gives_the_same_completions_in_the_same_order():
  graphdef, params = nnx.split(models.init_model(TINY, seed=6))
  prompts, mask = batching.left_pad([[5, 6, 7], [8, 9], [10], [11, 12, 13, 14], [15, 16], [17]],
                                    pad_id=0, length=4)
  kw = dict(num_generations=2, max_new_tokens=9, stop_ids=(1,), pad_id=0, temperature=1.0)
  ref = sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(7), **kw)
  for parts, shards in ((3, 1), (2, 3), (6, 1)):
    got = sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(7), parts=parts,
                              shards=shards, **kw)
    for field in ("tokens", "mask", "lengths", "truncated"):
      np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                    np.asarray(getattr(ref, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(got.logps), np.asarray(ref.logps), atol=1e-6)
  assert len(set(map(tuple, np.asarray(ref.tokens).tolist()))) > 6  # rows differ: order matters
  with pytest.raises(ValueError, match="do not split"):
    sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(7), parts=4, **kw)


def test_greedy_equals_transformers_generate(smollm2, smollm2_torch):
  model, tokenizer = smollm2
  hf = smollm2_torch[0]
  questions = ["What is 12+7?", "Name a colour.", "Write one sentence about the sea.",
               "List three prime numbers."]
  ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
         for q in questions]
  ids = [i if isinstance(i, list) else i["input_ids"] for i in ids]
  prompts, mask = batching.left_pad(ids, tokenizer.pad_token_id)
  out = run(model, prompts, mask, temperature=0.0, max_new_tokens=24,
            stop_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
  for row, p in enumerate(ids):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
    assert out.tokens[row, :out.lengths[row]].tolist() == ref, questions[row]


def test_left_pad_and_buckets():
  tokens, mask = batching.left_pad([[1, 2, 3], [4]], pad_id=0)
  assert tokens.shape == (2, 32)
  np.testing.assert_array_equal(tokens[:, -3:], [[1, 2, 3], [0, 0, 4]])
  assert mask.sum() == 4 and batching.bucket_length(33) == 64
  with pytest.raises(ValueError, match="more than the length 2"):
    batching.left_pad([[1, 2, 3]], pad_id=0, length=2)


@pytest.mark.slow
def test_sharded_sampling_equals_single_device():
  """Batch over the "data" axis of an 8-device host mesh: same samples as on one device."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from grpo_jax import models, sampling
      from grpo_jax.data import batching
      from grpo_jax.models.transformer import ModelConfig
      assert jax.device_count() == 8
      cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8)
      graphdef, params = nnx.split(models.init_model(cfg, seed=1))
      prompts, mask = batching.left_pad([[i + 2, i + 3, 5] for i in range(8)], pad_id=0, length=4)
      kw = dict(num_generations=2, max_new_tokens=6, stop_ids=(1,), pad_id=0, temperature=1.0)
      ref = sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(0), **kw)
      mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
      batch = NamedSharding(mesh, P("data"))
      params = jax.device_put(params, NamedSharding(mesh, P()))
      out = sampling.sample_jit(graphdef, params, jax.device_put(prompts, batch),
                                jax.device_put(mask, batch), jax.random.key(0), **kw)
      assert len(out.tokens.sharding.device_set) == 8, out.tokens.sharding
      # Two parts, each taking one prompt from each of the 4 data shards: the same samples.
      parts = sampling.sample_jit(graphdef, params, jax.device_put(prompts, batch),
                                  jax.device_put(mask, batch), jax.random.key(0), parts=2,
                                  shards=4, **kw)
      np.testing.assert_array_equal(np.asarray(parts.tokens), np.asarray(ref.tokens))
      np.testing.assert_array_equal(np.asarray(parts.lengths), np.asarray(ref.lengths))
      np.testing.assert_allclose(np.asarray(parts.logps), np.asarray(ref.logps), atol=1e-5)
      np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
      np.testing.assert_allclose(np.asarray(out.logps), np.asarray(ref.logps), atol=1e-5)
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
