"""Where the GRPO update's time goes: forward vs backward of the trunk, the shared-prompt
log-prob pass, and the whole update step with and without the reference model.

    .venv/bin/python benchmarks/grpo_step/update_breakdown.py

The workload of bench.py (SmolLM2-135M, 2 prompts x 8 completions, 64 prompt and 64
completion tokens, random ids), each piece jitted apart, best of 3 after a warm-up.
A backward should cost about twice its forward; the ratio printed says how far off it is.
Ends with the machine's load while it ran (../noise.py): on a loaded machine the best of 3
is still the best of 3 slow calls.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax import cli, grpo, models, optim  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
import noise  # noqa: E402

B, G, P, T = 2, 8, 64, 64


def best_of(f, *args, reps=3):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv):
  cli.no_arguments(argv)
  load = noise.Load().start()
  model, _ = models.load("smollm2-135m-instruct")
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  batch = grpo.Batch(
      jnp.asarray(rng.integers(0, 1000, (B, P)), jnp.int32), jnp.ones((B, P), jnp.int32),
      jnp.asarray(rng.integers(0, 1000, (B * G, T)), jnp.int32), jnp.ones((B * G, T), jnp.int32),
      jnp.zeros((B * G, T)), jnp.asarray(rng.normal(size=B * G), jnp.float32))
  full = jnp.concatenate([jnp.repeat(batch.prompts, G, 0), batch.completions], 1)[:B * G // 2]

  def trunk(p):  # plain causal forward of 8 x 128 tokens, no cache
    return nnx.merge(graphdef, p).hidden_states(full, attention_mask_BxL=jnp.ones_like(full)).sum()

  def logps(p):  # the update's pass: prompt once per group, logits at completion positions
    return grpo.completion_logps(nnx.merge(graphdef, p), batch.prompts, batch.prompt_mask,
                                 batch.completions, batch.completion_mask,
                                 num_generations=G)[0].sum()

  rows = []
  for name, f in (("trunk 8x128", trunk), ("completion_logps 2x64 + 16x64", logps)):
    fwd = best_of(jax.jit(f), params)
    both = best_of(jax.jit(jax.grad(f)), params)
    rows.append((name, fwd, both))
  print(f"{'piece':32s} {'forward s':>10s} {'fwd+bwd s':>10s} {'bwd / fwd':>10s}")
  for name, fwd, both in rows:
    print(f"{name:32s} {fwd:10.2f} {both:10.2f} {(both - fwd) / fwd:10.1f}")
  optimizer, _ = optim.make_optimizer(1e-5, total_steps=10)
  opt_state = jax.jit(optimizer.init)(params)
  for beta in (0.04, 0.0):
    step = grpo.make_update_step(graphdef, optimizer, grpo.loss_config(G, beta=beta))
    ref = jax.tree.map(jnp.copy, params) if beta else None
    run = lambda: step(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state),  # noqa
                       ref, batch)[2]["loss"]
    print(f"update step, beta={beta}: {best_of(run):.2f} s (incl. copying params and state)")
  print(noise.describe(load.stop()))


if __name__ == "__main__":
  app.run(main)
