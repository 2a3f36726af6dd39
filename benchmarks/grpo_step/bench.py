"""One GRPO step, grpo_jax vs TRL's GRPOTrainer (PyTorch CPU), on the same workload.

    .venv/bin/python benchmarks/grpo_step/bench.py [--steps=8] [--warmup=2] \\
        [--only=both|ours|trl] [--threads=2] [--json=out.json] [--workdir=DIR]

The workload is benchmarks/grpo_step/config.py: SmolLM2-135M-Instruct (the
embedded GGUF, dequantised to fp32; TRL gets the same weights exported as a
Hugging Face folder), 2 arithmetic prompts x 8 generations a step, up to 64 new
tokens, beta 0.04 (a reference model), loss "grpo", one update per step. Both
sides train on the same prompts in the same order with the same reward
functions. Each side runs `warmup + steps` steps in its own process; the first
`warmup` are not timed. Prints s/step, completion tokens/step, ms per completion
token (the fair unit: the two sides sample different completions), peak RSS,
and the share of the compute floor (see `step_flops`).
"""

import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, "config.py")

_STEPS = flags.DEFINE_integer("steps", 8, "timed steps per system", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps first (compilation)", lower_bound=0)
_ONLY = flags.DEFINE_enum("only", "both", ["both", "ours", "trl"], "which systems to run")
_THREADS = flags.DEFINE_integer("threads", 2, "CPUs for each side (and torch threads)")
_TRL_GRADIENT_CHECKPOINTING = flags.DEFINE_bool(
    "trl_gradient_checkpointing", False,
    "TRL's default (recomputes the forward in the backward); off by default")
_JSON = flags.DEFINE_string("json", None, "also write the results here")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "keep run folders and logs here (else a temp dir, removed at the end)")


def load_config():
  from grpo_jax import config as config_lib

  return config_lib.from_file(CONFIG)


def pin_threads(threads):
  """Keeps this process and its children on `threads` CPUs (XLA sizes its pool from them)."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  return len(os.sched_getaffinity(0))


def matmul_rates(n=2048, reps=10):
  """fp32 FLOP/s of an n^3 matmul, best of `reps`: jitted JAX (the floor's) and torch."""
  import jax
  import jax.numpy as jnp
  import torch

  def best(fn):
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)

  a, x = jnp.ones((n, n), jnp.float32), torch.ones(n, n)
  f = jax.jit(jnp.matmul)
  return best(lambda: f(a, a).block_until_ready()), best(lambda: x @ x)


def prepare(cfg, total_steps, workdir, export):
  """Prompts (templated text and ids) of every step, param counts, and the HF export for TRL."""
  from grpo_jax import models
  from grpo_jax.data import format_prompt, get_task

  model, tok = models.load(cfg.model.name, dtype=cfg.model.dtype)
  b = cfg.train.prompts_per_step
  task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  rows = []
  for ex in task.train_batch(0, b * total_steps):  # step s trains on examples [s*b, (s+1)*b)
    text = format_prompt(ex, cfg.task.template, tok)
    rows.append(dict(ex, prompt=text, prompt_ids=tok(text, add_special_tokens=False)["input_ids"]))
  assert model.cfg.tie_word_embeddings
  embedding = model.cfg.vocab_size * model.cfg.hidden_size
  params = {"total": model.cfg.num_params(), "embedding": embedding,
            "body": model.cfg.num_params() - embedding}
  hf_dir = os.path.join(workdir, "hf_model")
  if export and not os.path.isdir(hf_dir):
    models.export(model, tok, hf_dir)
  return rows, params, hf_dir


def step_flops(prompt_tokens, completion_tokens, params):
  """The FLOPs a GRPO step cannot avoid: matmuls only, at the tokens that need them.

  prompt_tokens: the step's prompts, each counted once (its G rows share it);
  completion_tokens: summed over all rows (stop token included). The layers
  (params["body"]: all but the tied embedding) run on every such token; the LM
  head (the tied 49152 x 576 embedding) only where a completion token's
  log-prob is needed. Attention scores/values and norms are left out.
  One forward = 2 FLOPs per weight per token; the policy's forward+backward 3x that.
  """
  forward = (2 * params["body"] * (prompt_tokens + completion_tokens)
             + 2 * params["embedding"] * completion_tokens)
  return {"sample": forward, "reference": forward, "policy": 3 * forward}


def run_child(cmd, log_path, env):
  """Runs cmd to completion; -> (peak RSS bytes, wall s, 1-min load average before and after)."""
  load = os.getloadavg()[0]
  t = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; log {log_path}:\n{tail}")
  return usage.ru_maxrss * 1024, wall, (load, os.getloadavg()[0])


def run_ours(total_steps, workdir, env):
  from grpo_jax import metrics_io

  run_dir = os.path.join(workdir, "ours")
  shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
  cmd = [sys.executable, "-m", "grpo_jax.main", f"--config={CONFIG}", f"--workdir={run_dir}",
         f"--config.train.steps={total_steps}"]
  rss, wall, load = run_child(cmd, os.path.join(workdir, "ours.log"), env)
  records = [r for r in metrics_io.read_metrics(run_dir) if "time/step_s" in r]
  assert [r["step"] for r in records] == list(range(1, total_steps + 1)), "missing steps"
  return {"step_s": [r["time/step_s"] for r in records],
          "sample_s": [r["time/sample_s"] for r in records],
          "mean_length": [r["completions/mean_length"] for r in records],
          "reward": [r.get("reward") for r in records], "kl": [r.get("kl") for r in records],
          "peak_rss_bytes": rss, "wall_s": wall, "loadavg": load}


def run_trl(cfg, rows, total_steps, hf_dir, workdir, threads, env, checkpointing=False):
  data_path, out_path = os.path.join(workdir, "trl_data.json"), os.path.join(workdir, "trl.json")
  settings = {
      "prompts_per_step": cfg.train.prompts_per_step, "num_generations": cfg.rl.num_generations,
      "max_completion_length": cfg.rl.max_completion_length, "temperature": cfg.rl.temperature,
      "beta": cfg.rl.beta, "epsilon": cfg.rl.epsilon, "loss_type": cfg.rl.loss_type,
      "rewards": [list(r) for r in cfg.rewards], "learning_rate": cfg.opt.learning_rate,
      "max_grad_norm": cfg.opt.max_grad_norm}
  with open(data_path, "w") as f:
    json.dump({"rows": rows, "settings": settings}, f)
  cmd = [sys.executable, os.path.join(HERE, "trl_run.py"), f"--model={hf_dir}",
         f"--data={data_path}", f"--steps={total_steps}", f"--out={out_path}",
         f"--threads={threads}", f"--output_dir={os.path.join(workdir, 'trl_output')}"]
  cmd += ["--gradient_checkpointing"] if checkpointing else []
  rss, wall, load = run_child(cmd, os.path.join(workdir, "trl.log"), env)
  with open(out_path) as f:
    result = json.load(f)
  return dict(result, peak_rss_bytes=rss, wall_s=wall, loadavg=load)


def summarize(result, rows, cfg, params, rate, warmup):
  """Timing and floor figures over the measured (post-warm-up) steps."""
  b, g = cfg.train.prompts_per_step, cfg.rl.num_generations
  steps = range(warmup, len(result["step_s"]))
  times = [result["step_s"][s] for s in steps]
  completion = [result["mean_length"][s] * b * g for s in steps]
  prompt = [sum(len(r["prompt_ids"]) for r in rows[s * b:(s + 1) * b]) for s in steps]
  flops = [sum(step_flops(p, c, params).values()) for p, c in zip(prompt, completion)]
  return {
      "steps_measured": len(times),
      "step_s_median": statistics.median(times), "step_s_mean": statistics.mean(times),
      "sample_s_mean": statistics.mean(result["sample_s"][s] for s in steps),
      "completion_tokens_per_step": statistics.mean(completion),
      "prompt_tokens_per_step": statistics.mean(prompt),
      "ms_per_completion_token": 1e3 * sum(times) / sum(completion),
      "floor_s_per_step": statistics.mean(flops) / rate,
      "floor_share": sum(flops) / rate / sum(times),
      "peak_rss_gb": result["peak_rss_bytes"] / 1e9,
      "loadavg": result["loadavg"],
  }


def print_table(summary, rate_jax, rate_torch, params):
  print(f"\nfp32 matmul 2048^3: JAX {rate_jax / 1e9:.0f} GFLOP/s (the floor's rate), "
        f"torch {rate_torch / 1e9:.0f} GFLOP/s; params {params['total'] / 1e6:.1f}M "
        f"({params['embedding'] / 1e6:.1f}M tied embedding = LM head)")
  print("| system | s/step median | s/step mean | sampling s/step | completion tok/step | "
        "ms/completion tok | peak RSS GB | floor s/step | share of floor | load before/after |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, s in summary.items():
    print(f"| {name} | {s['step_s_median']:.2f} | {s['step_s_mean']:.2f} | "
          f"{s['sample_s_mean']:.2f} | {s['completion_tokens_per_step']:.0f} | "
          f"{s['ms_per_completion_token']:.1f} | {s['peak_rss_gb']:.2f} | "
          f"{s['floor_s_per_step']:.2f} | {100 * s['floor_share']:.0f}% | "
          f"{s['loadavg'][0]:.1f} / {s['loadavg'][1]:.1f} |")
  if len(summary) == 2:
    ratio = (summary["TRL"]["ms_per_completion_token"]
             / summary["grpo_jax"]["ms_per_completion_token"])
    print(f"TRL / grpo_jax time per completion token: {ratio:.2f}x")


def versions():
  names = ["jax", "jaxlib", "flax", "torch", "transformers", "accelerate", "trl", "datasets"]
  out = {}
  for n in names:
    try:
      out[n] = importlib.metadata.version(n)
    except importlib.metadata.PackageNotFoundError:
      out[n] = None
  return out


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The flags as a namespace: one record of them goes into the JSON results.
  args = types.SimpleNamespace(**{h.name: h.value for h in (
      _STEPS, _WARMUP, _ONLY, _THREADS, _TRL_GRADIENT_CHECKPOINTING, _JSON, _WORKDIR)})
  cpus = pin_threads(args.threads)  # before JAX starts its thread pool
  total = args.warmup + args.steps
  workdir = args.workdir or tempfile.mkdtemp(prefix="grpo_step_")
  os.makedirs(workdir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  load_before = os.getloadavg()

  cfg = load_config()
  rows, params, hf_dir = prepare(cfg, total, workdir, export=args.only != "ours")
  rates = [matmul_rates()]
  results = {}
  if args.only in ("both", "ours"):
    print(f"grpo_jax: {total} steps ({args.warmup} warm-up) ...", flush=True)
    results["grpo_jax"] = run_ours(total, workdir, env)
  if args.only in ("both", "trl"):
    print(f"TRL: {total} steps ({args.warmup} warm-up) ...", flush=True)
    results["TRL"] = run_trl(cfg, rows, total, hf_dir, workdir, args.threads, env,
                             args.trl_gradient_checkpointing)
  rates.append(matmul_rates())  # again after the runs: the best of the two is the machine's rate
  rate_jax, rate_torch = max(r[0] for r in rates), max(r[1] for r in rates)
  summary = {name: summarize(r, rows, cfg, params, rate_jax, args.warmup)
             for name, r in results.items()}

  load_after = os.getloadavg()
  print(f"\n{cpu_name()}, {cpus} CPUs used; load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f} (1 min); logs in {workdir}")
  print_table(summary, rate_jax, rate_torch, params)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "cpu": cpu_name(), "cpus": cpus, "versions": versions(),
                 "loadavg_before": load_before, "loadavg_after": load_after,
                 "matmul_flops_jax": rate_jax, "matmul_flops_torch": rate_torch,
                 "matmul_flops_measured": rates,
                 "params": params, "summary": summary, "per_step": results}, f, indent=1)
  if args.workdir is None:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
