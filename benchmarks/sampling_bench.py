"""Sampling throughput: grpo_jax vs transformers `generate`, same model, same run.

    .venv/bin/python benchmarks/sampling_bench.py [--rows=16,32] [--new_tokens=64] [--repeats=5] \
        [--json=out.json]

SmolLM2-135M-Instruct (the embedded GGUF, dequantised to fp32 for both), chat
prompts with 8 samples each (16 rows = 2 prompts x 8), temperature 1, every
row forced to exactly `new_tokens` tokens (no early stop) so both sides do the
same work. After one warm-up call each (compilation reported apart), the three
samplers (transformers, ours fp32, ours bf16) are timed in turn, `repeats` times
(interleaved, so that drift hits all alike): new tokens/s as median (min-max) over
the repeats, our / transformers tokens/s pair by pair as median (min-max), and the
machine's load during the repeats (noise.py). Also the compute
floor: 2 x params FLOPs per token at the matmul rate measured in this run (fp32,
and bf16 operands with fp32 accumulation).

It also times a decode step's weight matmuls alone (the 30 layers' seven
projections in their order, then the LM head, at M = rows, each layer's weights
a separate array; no attention, norms or sampling), in XLA and in PyTorch: no
sampler built on that library's matmul kernel can decode faster than that,
which turns into a ceiling in tokens/s (`matmul-only ceiling`; the fastest of 5 calls,
as a ceiling should be).
"""

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import noise  # noqa: E402  (benchmarks/noise.py, next to this script)
from grpo_jax import cli, models, sampling  # noqa: E402
from grpo_jax.data import batching  # noqa: E402

_ROWS = flags.DEFINE_list("rows", ["16", "32"], "batch sizes (rows = prompts x generations)")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "tokens each row samples")
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "timed calls of each sampler after its warm-up, interleaved; reported as "
    "median (min-max)", lower_bound=1)
_GENERATIONS = flags.DEFINE_integer("generations", 8, "samples per prompt")
_JSON = flags.DEFINE_string("json", None, "also write every repeat's timing and the load here")

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
  (compilation, warm-up)."""
  run(0)
  return min(noise.timed(lambda: run(r)) for r in range(1, repeats + 1))


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
  t_xla = best_of(lambda r: jax.block_until_ready(f(*args)), repeats)
  targs = (torch.from_numpy(x), [[torch.from_numpy(w) for w in ws] for ws in layers],
           torch.from_numpy(head))
  with torch.no_grad():
    t_torch = best_of(lambda r: step(torch.matmul, *targs), repeats)
  return t_xla, t_torch


def ours(model, prompts, mask, g, new_tokens):
  """run(r): one call of the jitted sampler with seed r."""
  graphdef, params = nnx.split(model)
  kw = dict(num_generations=g, max_new_tokens=new_tokens, stop_ids=(-1,), pad_id=0,
            temperature=1.0)

  def run(r):
    out = sampling.sample_jit(graphdef, params, prompts, mask, jax.random.key(r), **kw)
    assert int(jax.block_until_ready(out).lengths.min()) == new_tokens

  return run


def hf_generate(hf, ids, g, new_tokens):
  """run(r): one `transformers` `generate` call with seed r."""

  def run(r):
    torch.manual_seed(r)
    with torch.no_grad():
      out = hf.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        num_return_sequences=g, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)
    assert out.shape[1] - ids["input_ids"].shape[1] == new_tokens

  return run


def measure(runs, repeats):
  """Each run(0) once (warm-up, compilation), then run(1..repeats) interleaved: -> (seconds
  of each first call, seconds of each repeat, the machine's load during the repeats)."""
  first = {name: noise.timed(lambda: run(0)) for name, run in runs.items()}
  with noise.Load() as load:
    times = noise.interleaved(
        {name: (lambda r, run=run: noise.timed(lambda: run(r + 1))) for name, run in runs.items()},
        repeats)
  return first, times, load.result()


def main(argv):
  cli.no_arguments(argv)
  new_tokens, repeats = _NEW_TOKENS.value, _REPEATS.value
  torch.set_num_threads(os.cpu_count())
  whole = noise.Load().start()

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
  print(f"tokens/s: median (min-max) over {repeats} interleaved repeats; x transformers: "
        "per pair of repeats")
  print("| rows | transformers tok/s | ours fp32 tok/s | fp32 x transformers | ours bf16 tok/s | "
        "bf16 x transformers | bf16 % of floor | compile s | other CPU |")
  print("|---|---|---|---|---|---|---|---|---|")
  results = []
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
    first, times, load = measure({
        "transformers": hf_generate(hf, hf_in, g, new_tokens),
        "fp32": ours(model, prompts, mask, g, new_tokens),
        "bf16": ours(model_bf16, prompts, mask, g, new_tokens)}, repeats)
    tps = {name: [new / t for t in ts] for name, ts in times.items()}
    s = {name: noise.spread(v) for name, v in tps.items()}
    x32 = noise.ratio_spread(tps["fp32"], tps["transformers"])
    x16 = noise.ratio_spread(tps["bf16"], tps["transformers"])
    compile_s = {k: first[k] - statistics.median(times[k]) for k in ("fp32", "bf16")}
    share = load["other_cpu_share"]
    print(f"| {rows} | {noise.cell(s['transformers'], '.0f')} | {noise.cell(s['fp32'], '.0f')} | "
          f"{noise.cell(x32, '.2f', 'x')} | {noise.cell(s['bf16'], '.0f')} | "
          f"{noise.cell(x16, '.2f', 'x')} | "
          f"{100 * s['bf16']['median'] * flops_per_token / rate16:.0f}% | "
          f"{compile_s['fp32']:.1f} / {compile_s['bf16']:.1f} | "
          f"{'?' if share is None else f'{share:.0%}'} |", flush=True)
    print(f"  {rows} rows, during the repeats: {noise.describe(load)}", flush=True)
    mm_xla, mm_torch = matmul_only_step(model, rows)
    ceiling = rows / min(mm_xla, mm_torch)  # tok/s
    hf_tps, tps32 = s["transformers"]["median"], s["fp32"]["median"]
    print(f"  {rows} rows, one decode step's weight matmuls alone (fp32): XLA {1e3 * mm_xla:.0f} ms, "
          f"PyTorch {1e3 * mm_torch:.0f} ms -> matmul-only ceiling {ceiling:.0f} tok/s "
          f"({ceiling / hf_tps:.1f}x transformers' median); ours (median) {tps32 / ceiling:.0%} "
          "of it", flush=True)
    results.append({"rows": rows, "new_tokens": new, "first_call_s": first, "repeat_s": times,
                    "tokens_per_s": s, "fp32_x_transformers": x32, "bf16_x_transformers": x16,
                    "load": load, "matmul_only_s": {"xla": mm_xla, "torch": mm_torch}})
  load = whole.stop()
  print(f"whole run: {noise.describe(load)}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"repeats": repeats, "new_tokens": new_tokens, "generations": _GENERATIONS.value,
                 "matmul_flops": {"fp32": rate32, "bf16_fp32_acc": rate16},
                 "load_whole_run": load, "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
