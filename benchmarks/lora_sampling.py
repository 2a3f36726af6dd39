"""Rollout time with LoRA adapters merged into the sampler's copy vs applied unmerged.

    PYTHONPATH=. .venv/bin/python benchmarks/lora_sampling.py --rank 16 --repeats 3

SmolLM2-135M with rank-`--rank` adapters on every projection (B drawn small, so the adapted
model is not the base), the default experiment's rollout shape (4 prompts x 8 completions,
`--tokens` new tokens, no stop token: every row decodes all of them). "merged": one jitted
program folds W + scale * A @ B into a copy (lora.rollout_copier, what a run does once per
rollout), then the sampler decodes the plain model; "unmerged": the sampler decodes the
adapted model, which adds scale * (y @ A) @ B to each projection at every token. Each is
compiled first (not timed), then timed `--repeats` times; prints the median and min-max of
each, the copy included in "merged".
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from grpo_jax import lora, models, sampling, sharding


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--tokens", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  model, _ = models.load("smollm2-135m-instruct")
  cfg = ml_collections.ConfigDict(dict(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0,
                                       targets=lora.DEFAULT_TARGETS, quantize_base="none"))
  graphdef, params = nnx.split(lora.attach(model, cfg))
  trainable, frozen = lora.split(params)
  trainable = {k: v.replace(1e-3 * jnp.ones_like(v[...])) if k.endswith("_lora_b") else v
               for k, v in trainable.items()}
  params = lora.join(trainable, frozen)
  base_graphdef, base = lora.base_of(graphdef, params)
  mesh = sharding.make_mesh(1, 1, 1)
  copier = lora.rollout_copier(graphdef, sharding.rollout_shardings(mesh, base), "float32")

  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(10, 1000, (4, 32)), jnp.int32)
  mask = jnp.ones_like(prompts)
  kw = dict(num_generations=8, max_new_tokens=args.tokens, stop_ids=(-1,), pad_id=0)
  key = jax.random.key(0)

  def merged():
    return sampling.sample_jit(base_graphdef, copier(params), prompts, mask, key, **kw)

  def unmerged():
    return sampling.sample_jit(graphdef, params, prompts, mask, key, **kw)

  results = {}
  for name, fn in (("merged", merged), ("unmerged", unmerged)):
    jax.block_until_ready(fn().tokens)  # compile
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn().tokens)
      times.append(time.perf_counter() - t)
    results[name] = times
  same = bool(np.array_equal(np.asarray(merged().tokens), np.asarray(unmerged().tokens)))
  print(f"rank {args.rank}, 32 rows x {args.tokens} tokens, {jax.devices()[0].platform}; "
        f"same tokens: {same}")
  for name, times in results.items():
    print(f"  {name:9s} median {statistics.median(times):6.2f} s  "
          f"(min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs)")


if __name__ == "__main__":
  main()
