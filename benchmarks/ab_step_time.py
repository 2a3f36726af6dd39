"""Time per GRPO step of two versions of grpo_jax on the same experiment, interleaved.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/ab_step_time.py --before /tmp/before --after . \
        --config configs/smollm2_arithmetic.py --steps 5 --rounds 2

Each round runs the experiment for `--steps` steps with the "before" source tree, then with
the "after" one (same config, fresh workdirs, the same Python environment), so that a machine
that slows down or speeds up during the benchmark affects both alike. The first step of each
run compiles and is left out; the table gives the median and the spread (min-max) of
time/step_s, time/sample_s and time/update_s over the remaining steps of all rounds, the
ratio before / after of the medians, and that ratio round by round (median and min-max over
the rounds, the per-pair spread: noise.py), and the machine's load during each run and the
whole benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import noise  # benchmarks/noise.py, next to this script

KEYS = ("time/step_s", "time/sample_s", "time/update_s")


def run_once(tree: str, config: str, steps: int, workdir: str) -> tuple[list[dict], dict]:
  """-> (the records of steps 2.., the machine's load during the run)."""
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
  cmd = [sys.executable, "-m", "grpo_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.train.steps={steps}", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.eval.num_problems=0",
         "--config.train.checkpoint_every=0"]
  with noise.Load() as load:
    subprocess.run(cmd, env=env, cwd=os.path.abspath(tree), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r.get("step", 0) >= 2 and "time/step_s" in r], load.result()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--before", required=True, help="source tree of the old version")
  parser.add_argument("--after", required=True, help="source tree of the new version")
  parser.add_argument("--config", default="configs/smollm2_arithmetic.py")
  parser.add_argument("--steps", type=int, default=5, help="steps per run (the first compiles)")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args(argv)
  times: dict[str, dict[str, list[float]]] = {"before": {k: [] for k in KEYS},
                                               "after": {k: [] for k in KEYS}}
  medians: dict[str, list[float]] = {"before": [], "after": []}  # step_s of each run
  with tempfile.TemporaryDirectory() as tmp, noise.Load() as whole:
    for r in range(args.rounds):
      for name in ("before", "after"):
        tree = getattr(args, name)
        records, load = run_once(tree, args.config, args.steps, os.path.join(tmp, f"{name}{r}"))
        for k in KEYS:
          times[name][k] += [rec[k] for rec in records if k in rec]
        medians[name].append(statistics.median(x["time/step_s"] for x in records))
        print(f"round {r + 1}/{args.rounds} {name}: step_s "
              f"{[round(x['time/step_s'], 2) for x in records]}; {noise.describe(load)}",
              file=sys.stderr, flush=True)
  print(f"{'':16s} {'before median (min-max)':>26s} {'after median (min-max)':>26s} "
        f"{'before/after':>12s}")
  for k in KEYS:
    b, a = times["before"][k], times["after"][k]
    if not b or not a:
      continue
    cell = lambda x: noise.cell(noise.spread(x), ".2f")  # noqa: E731
    print(f"{k:16s} {cell(b):>26s} {cell(a):>26s} "
          f"{statistics.median(b) / statistics.median(a):12.2f}")
  print(f"steps timed per version: {len(times['before']['time/step_s'])} "
        f"({args.rounds} rounds x {args.steps - 1})")
  pairs = noise.ratio_spread(medians["before"], medians["after"])
  print(f"before / after of each round's median step_s: {noise.cell(pairs, '.2f', 'x')}, "
        f"{pairs['n']} rounds")
  print(f"whole benchmark: {noise.describe(whole.result())}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
