"""One GRPO step, grpo_jax vs TRL's GRPOTrainer (PyTorch CPU), on the same workload.

    .venv/bin/python benchmarks/grpo_step/bench.py [--repeats=3] [--steps=3] [--warmup=1] \\
        [--only=both|ours|trl] [--threads=2] [--json=out.json] [--workdir=DIR]

The workload is benchmarks/grpo_step/config.py: SmolLM2-135M-Instruct (the
embedded GGUF, dequantised to fp32; TRL gets the same weights exported as a
Hugging Face folder), 2 arithmetic prompts x 8 generations a step, up to 64 new
tokens, beta 0.04 (a reference model), loss "grpo", one update per step. Both
sides train on the same prompts in the same order with the same reward
functions. A repeat runs each side for `warmup + steps` steps in its own process
(the first `warmup` not timed), grpo_jax first, then TRL; `repeats` such pairs run
one after the other (A, B, A, B, ...), so that a machine that slows down during the
benchmark slows both sides alike. Both sides are deterministic (the same completions
in every repeat), so repeats differ only in time. Prints per side, as median
(min-max) over the repeats: ms per completion token (the fair unit: the two sides
sample different completions), s/step and sampling s/step (over all timed steps),
the share of the compute floor (see `step_flops`); completion tokens/step and peak
RSS; the TRL / grpo_jax ratio pair by pair as median (min-max); and the machine's
load during each run (../noise.py).
"""

import importlib.metadata
import json
import os
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
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/, for noise.py
import noise  # noqa: E402

_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "runs of each system, interleaved (grpo_jax, TRL, grpo_jax, ...)",
    lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per system and repeat", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps first in each run (compilation)",
                               lower_bound=0)
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
  """Runs cmd to completion; -> (peak RSS bytes, wall s, the machine's load meanwhile:
  noise.Load's result, the child's CPU time counted as ours)."""
  load = noise.Load().start()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
  proc.returncode = os.waitstatus_to_exitcode(status)
  load = load.stop()
  wall = load["wall_s"]
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; log {log_path}:\n{tail}")
  return usage.ru_maxrss * 1024, wall, load


def run_ours(total_steps, workdir, env, repeat=0):
  from grpo_jax import metrics_io

  run_dir = os.path.join(workdir, f"ours{repeat}")
  shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
  cmd = [sys.executable, "-m", "grpo_jax.main", f"--config={CONFIG}", f"--workdir={run_dir}",
         f"--config.train.steps={total_steps}"]
  rss, wall, load = run_child(cmd, os.path.join(workdir, f"ours{repeat}.log"), env)
  records = [r for r in metrics_io.read_metrics(run_dir) if "time/step_s" in r]
  assert [r["step"] for r in records] == list(range(1, total_steps + 1)), "missing steps"
  return {"step_s": [r["time/step_s"] for r in records],
          "sample_s": [r["time/sample_s"] for r in records],
          "mean_length": [r["completions/mean_length"] for r in records],
          "reward": [r.get("reward") for r in records], "kl": [r.get("kl") for r in records],
          "peak_rss_bytes": rss, "wall_s": wall, "load": load}


def run_trl(cfg, rows, total_steps, hf_dir, workdir, threads, env, checkpointing=False,
            repeat=0):
  data_path = os.path.join(workdir, "trl_data.json")
  out_path = os.path.join(workdir, f"trl{repeat}.json")
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
  rss, wall, load = run_child(cmd, os.path.join(workdir, f"trl{repeat}.log"), env)
  with open(out_path) as f:
    result = json.load(f)
  return dict(result, peak_rss_bytes=rss, wall_s=wall, load=load)


def summarize(result, rows, cfg, params, rate, warmup):
  """Timing and floor figures over one run's measured (post-warm-up) steps."""
  b, g = cfg.train.prompts_per_step, cfg.rl.num_generations
  steps = range(warmup, len(result["step_s"]))
  times = [result["step_s"][s] for s in steps]
  completion = [result["mean_length"][s] * b * g for s in steps]
  prompt = [sum(len(r["prompt_ids"]) for r in rows[s * b:(s + 1) * b]) for s in steps]
  flops = [sum(step_flops(p, c, params).values()) for p, c in zip(prompt, completion)]
  return {
      "steps_measured": len(times),
      "step_s": times, "sample_s": [result["sample_s"][s] for s in steps],
      "step_s_median": statistics.median(times), "step_s_mean": statistics.mean(times),
      "sample_s_mean": statistics.mean(result["sample_s"][s] for s in steps),
      "completion_tokens_per_step": statistics.mean(completion),
      "prompt_tokens_per_step": statistics.mean(prompt),
      "ms_per_completion_token": 1e3 * sum(times) / sum(completion),
      "floor_s_per_step": statistics.mean(flops) / rate,
      "floor_share": sum(flops) / rate / sum(times),
      "peak_rss_gb": result["peak_rss_bytes"] / 1e9,
      "load": result["load"],
  }


def combine(runs):
  """One system's figures over its repeats (a summarize() each): per-repeat figures as
  noise.spread()s, step and sampling times pooled over every timed step of every repeat."""
  loads = [r["load"] for r in runs]
  shares = [x["other_cpu_share"] for x in loads if x["other_cpu_share"] is not None]
  return {
      "repeats": len(runs),
      "ms_per_completion_token": noise.spread([r["ms_per_completion_token"] for r in runs]),
      "floor_share": noise.spread([r["floor_share"] for r in runs]),
      "step_s": noise.spread([t for r in runs for t in r["step_s"]]),
      "sample_s": noise.spread([t for r in runs for t in r["sample_s"]]),
      "completion_tokens_per_step": noise.spread([r["completion_tokens_per_step"] for r in runs]),
      "floor_s_per_step": statistics.median(r["floor_s_per_step"] for r in runs),
      "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
      "loadavg_1min": noise.spread([x[k][0] for x in loads
                                    for k in ("loadavg_before", "loadavg_after")]),
      "other_cpu_share": noise.spread(shares) if shares else None,
  }


def print_table(runs, combined, rate_jax, rate_torch, params):
  """runs: {system: [summarize() per repeat]}; combined: {system: combine(runs[system])}."""
  print(f"\nfp32 matmul 2048^3: JAX {rate_jax / 1e9:.0f} GFLOP/s (the floor's rate), "
        f"torch {rate_torch / 1e9:.0f} GFLOP/s; params {params['total'] / 1e6:.1f}M "
        f"({params['embedding'] / 1e6:.1f}M tied embedding = LM head)")
  print("median (min-max) over repeats (ms/completion tok, share of floor) or over all timed "
        "steps (s/step, sampling s/step)")
  print("| system | repeats | ms/completion tok | s/step | sampling s/step | completion tok/step "
        "| peak RSS GB | floor s/step | share of floor | load 1-min | other CPU |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, c in combined.items():
    share = c["other_cpu_share"]
    print(f"| {name} | {c['repeats']} | {noise.cell(c['ms_per_completion_token'])} | "
          f"{noise.cell(c['step_s'], '.2f')} | {noise.cell(c['sample_s'], '.2f')} | "
          f"{c['completion_tokens_per_step']['median']:.0f} | {c['peak_rss_gb']:.2f} | "
          f"{c['floor_s_per_step']:.2f} | {noise.cell(c['floor_share'], '.0%')} | "
          f"{c['loadavg_1min']['min']:.1f}-{c['loadavg_1min']['max']:.1f} | "
          f"{'?' if share is None else format(share['max'], '.0%') + ' max'} |")
  for r in range(max(len(v) for v in runs.values())):
    parts = [f"{name} {v[r]['ms_per_completion_token']:.1f} ms/tok ("
             f"other CPU {_share(v[r]['load'])}, load {v[r]['load']['loadavg_before'][0]:.1f}"
             f"->{v[r]['load']['loadavg_after'][0]:.1f})" for name, v in runs.items()]
    print(f"  repeat {r + 1}: " + ", ".join(parts))
  ratio = trl_ratio(runs)
  if ratio is not None:
    print(f"TRL / grpo_jax time per completion token, pair by pair: "
          f"{noise.cell(ratio, '.2f', 'x')}, {ratio['n']} pairs")


def _share(load):
  return "?" if load["other_cpu_share"] is None else f"{load['other_cpu_share']:.0%}"


def trl_ratio(runs):
  """TRL / grpo_jax ms per completion token of each interleaved pair, as a noise.spread()."""
  if len(runs) != 2:
    return None
  return noise.ratio_spread([r["ms_per_completion_token"] for r in runs["TRL"]],
                            [r["ms_per_completion_token"] for r in runs["grpo_jax"]])


def versions():
  names = ["jax", "jaxlib", "flax", "torch", "transformers", "accelerate", "trl", "datasets"]
  out = {}
  for n in names:
    try:
      out[n] = importlib.metadata.version(n)
    except importlib.metadata.PackageNotFoundError:
      out[n] = None
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The flags as a namespace: one record of them goes into the JSON results.
  args = types.SimpleNamespace(**{h.name: h.value for h in (
      _REPEATS, _STEPS, _WARMUP, _ONLY, _THREADS, _TRL_GRADIENT_CHECKPOINTING, _JSON,
      _WORKDIR)})
  cpus = pin_threads(args.threads)  # before JAX starts its thread pool
  total = args.warmup + args.steps
  workdir = args.workdir or tempfile.mkdtemp(prefix="grpo_step_")
  os.makedirs(workdir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  whole = noise.Load().start()

  cfg = load_config()
  rows, params, hf_dir = prepare(cfg, total, workdir, export=args.only != "ours")
  rates = [matmul_rates()]
  calls = {}
  if args.only in ("both", "ours"):
    calls["grpo_jax"] = lambda r: run_ours(total, workdir, env, repeat=r)
  if args.only in ("both", "trl"):
    calls["TRL"] = lambda r: run_trl(cfg, rows, total, hf_dir, workdir, args.threads, env,
                                     args.trl_gradient_checkpointing, repeat=r)

  def announce(name, call):
    def run(r):
      print(f"repeat {r + 1}/{args.repeats}: {name}, {total} steps ({args.warmup} warm-up) ...",
            flush=True)
      return call(r)
    return run

  results = noise.interleaved({n: announce(n, c) for n, c in calls.items()}, args.repeats)
  rates.append(matmul_rates())  # again after the runs: the best of the two is the machine's rate
  rate_jax, rate_torch = max(r[0] for r in rates), max(r[1] for r in rates)
  runs = {name: [summarize(r, rows, cfg, params, rate_jax, args.warmup) for r in rs]
          for name, rs in results.items()}
  combined = {name: combine(rs) for name, rs in runs.items()}

  load = whole.stop()
  print(f"\n{cpus} CPUs used; whole benchmark: {noise.describe(load)}; logs in {workdir}")
  print_table(runs, combined, rate_jax, rate_torch, params)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "cpu": load["cpu"], "cpus": cpus, "versions": versions(),
                 "load": load, "loadavg_before": load["loadavg_before"],
                 "loadavg_after": load["loadavg_after"],
                 "matmul_flops_jax": rate_jax, "matmul_flops_torch": rate_torch,
                 "matmul_flops_measured": rates, "params": params,
                 "summary": combined, "trl_over_grpo_jax": trl_ratio(runs),
                 "per_repeat": runs, "per_step": results}, f, indent=1)
  if args.workdir is None:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
