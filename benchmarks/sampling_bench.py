"""Sampling throughput: grpo_jax vs transformers `generate`, same model, same run.

    .venv/bin/python benchmarks/sampling_bench.py [--rows=16,32] [--new_tokens=64] [--repeats=2]

SmolLM2-135M-Instruct (the embedded GGUF, dequantised to fp32 for both), chat
prompts with 8 samples each (16 rows = 2 prompts x 8), temperature 1, every
row forced to exactly `new_tokens` tokens (no early stop) so both sides do the
same work. Reports new tokens/s after warm-up (compilation reported apart), and
the compute floor: 2 x params FLOPs per token at the matmul rate measured in
this run (fp32, and bf16 operands with fp32 accumulation).

It also times a decode step's weight matmuls alone (the 30 layers' seven
projections in their order, then the LM head, at M = rows, each layer's weights
a separate array; no attention, norms or sampling), in XLA and in PyTorch: no
sampler built on that library's matmul kernel can decode faster than that,
which turns into a ceiling in tokens/s (`matmul-only ceiling`).
"""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax import cli, models, sampling  # noqa: E402
from grpo_jax.data import batching  # noqa: E402

_ROWS = flags.DEFINE_list("rows", ["16", "32"], "batch sizes (rows = prompts x generations)")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "tokens each row samples")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls after the warm-up; the best counts")
_GENERATIONS = flags.DEFINE_integer("generations", 8, "samples per prompt")

QUESTIONS = ["What is 17 * 23? Think step by step.", "Write a short poem about the sea.",
             "Explain what a prime number is.", "Name three colours and why you like them."]


def matmul_rate(dtype, accumulate=None, n=2048, reps=5):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=accumulate))
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def best_of(run, repeats):
  """Seconds of the fastest of `repeats` calls of run(r) (r = 1..repeats), after run(0)
  (compilation, warm-up), and the seconds of that first call."""
  t = time.perf_counter()
  run(0)
  first = time.perf_counter() - t
  times = []
  for r in range(1, repeats + 1):
    t = time.perf_counter()
    run(r)
    times.append(time.perf_counter() - t)
  return min(times), first


def matmul_only_step(model, rows, repeats=5):
  """Seconds for one decode step's weight matmuls at M = rows: (XLA, PyTorch)."""
  p = models.params_dict(model)
  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  layers = [[np.array(p[n][i], np.float32) for n in names]
            for i in range(model.cfg.num_layers)]
  head = np.array(np.asarray(p["embed"]).T, np.float32, order="C")
  x = np.random.default_rng(0).standard_normal((rows, model.cfg.hidden_size)).astype(np.float32)

  def step(mm, x, layers, head):  # the data flow of a decode step, minus everything but matmuls
    for q, k, v, o, gate, up, down in layers:
      attn = mm(x, q) + mm(x, k).sum() + mm(x, v).sum()  # k, v feed attention, q its output
      x = x + mm(attn, o)
      x = x + mm(mm(x, gate) * mm(x, up), down)
    return mm(x, head)

  f = jax.jit(lambda x, layers, head: step(jnp.matmul, x, layers, head))
  args = (jnp.asarray(x), jax.tree.map(jnp.asarray, layers), jnp.asarray(head))
  t_xla, _ = best_of(lambda r: jax.block_until_ready(f(*args)), repeats)
  targs = (torch.from_numpy(x), [[torch.from_numpy(w) for w in ws] for ws in layers],
           torch.from_numpy(head))
  with torch.no_grad():
    t_torch, _ = best_of(lambda r: step(torch.matmul, *targs), repeats)
  return t_xla, t_torch


def ours(model, prompts, mask, g, new_tokens, repeats):
  """(seconds of the first call, best seconds after it) of the jitted sampler."""
  graphdef, params = nnx.split(model)
  kw = dict(num_generations=g, max_new_tokens=new_tokens, stop_ids=(-1,), pad_id=0,
            temperature=1.0)

  def run(r):
    out = sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(r), **kw)
    assert int(jax.block_until_ready(out).lengths.min()) == new_tokens

  best, first = best_of(run, repeats)
  return first, best


def hf_generate(hf, ids, g, new_tokens, repeats):
  """Best seconds of `transformers` `generate` after one warm-up call."""

  def run(r):
    torch.manual_seed(r)
    with torch.no_grad():
      out = hf.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        num_return_sequences=g, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)
    assert out.shape[1] - ids["input_ids"].shape[1] == new_tokens

  return best_of(run, repeats)[0]


def main(argv):
  cli.no_arguments(argv)
  new_tokens, repeats = _NEW_TOKENS.value, _REPEATS.value
  torch.set_num_threads(os.cpu_count())

  model, tok = models.load("smollm2-135m-instruct")
  model_bf16 = models.model_from_params(model.cfg, models.params_dict(model), dtype=jnp.bfloat16)
  path = models.embedded_gguf_path("smollm2-135m-instruct")
  from transformers import AutoModelForCausalLM

  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  flops_per_token = 2 * model.cfg.num_params()
  rate32, rate16 = matmul_rate(jnp.float32), matmul_rate(jnp.bfloat16, jnp.float32)
  print(f"matmul 2048^3: fp32 {rate32 / 1e9:.0f} GFLOP/s, bf16 operands + fp32 acc "
        f"{rate16 / 1e9:.0f} GFLOP/s; {flops_per_token / 1e9:.2f} GFLOP per token")
  print(f"floor (2 x params FLOPs/token at that rate): fp32 {rate32 / flops_per_token:.0f} tok/s, "
        f"bf16 {rate16 / flops_per_token:.0f} tok/s")
  print("| rows | transformers tok/s | ours fp32 tok/s (x) | ours bf16 tok/s (x) | "
        "bf16 % of floor | compile s |")
  print("|---|---|---|---|---|---|")
  for rows in [int(r) for r in _ROWS.value]:
    g = _GENERATIONS.value
    qs = QUESTIONS[:rows // g]
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
           for q in qs]
    ids = [i if isinstance(i, list) else i["input_ids"] for i in ids]
    prompts, mask = batching.left_pad(ids, tok.pad_token_id)
    hf_in = dict(input_ids=torch.tensor(prompts, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long))
    new = rows * new_tokens
    t_hf = hf_generate(hf, hf_in, g, new_tokens, repeats)
    c32, t32 = ours(model, prompts, mask, g, new_tokens, repeats)
    c16, t16 = ours(model_bf16, prompts, mask, g, new_tokens, repeats)
    hf_tps, tps32, tps16 = new / t_hf, new / t32, new / t16
    print(f"| {rows} | {hf_tps:.0f} | {tps32:.0f} ({tps32 / hf_tps:.1f}x) | "
          f"{tps16:.0f} ({tps16 / hf_tps:.1f}x) | {100 * tps16 * flops_per_token / rate16:.0f}% | "
          f"{c32 - t32:.1f} / {c16 - t16:.1f} |", flush=True)
    mm_xla, mm_torch = matmul_only_step(model, rows)
    ceiling = rows / min(mm_xla, mm_torch)  # tok/s
    print(f"  {rows} rows, one decode step's weight matmuls alone (fp32): XLA {1e3 * mm_xla:.0f} ms, "
          f"PyTorch {1e3 * mm_torch:.0f} ms -> matmul-only ceiling {ceiling:.0f} tok/s "
          f"({ceiling / hf_tps:.1f}x transformers); ours {tps32 / ceiling:.0%} of it", flush=True)


if __name__ == "__main__":
  app.run(main)
