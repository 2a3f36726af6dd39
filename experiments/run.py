"""The R1 experiments as pipelines of CLI stages: R1-Zero, R1, and distillation vs direct RL.

    .venv/bin/python experiments/run.py r1_zero r1 distill    # all three, ~1 hour on 2 CPU cores
    .venv/bin/python experiments/run.py r1 --root=runs/experiments --dry_run   # print the commands
    .venv/bin/python experiments/run.py r1_zero_base   # Gemma 3 270M base, ~1.3 hours

Every stage is one command a user could type (`grpo_jax.main` for GRPO and SFT,
`grpo_jax.rejection` for rejection sampling and teacher traces,
`grpo_jax.evaluate` for held-out accuracy), printed before it runs. A stage
that finished is skipped when the script runs again, so an interrupted pipeline
resumes. Results: ROOT/results.json (one evaluation per model), read by
experiments/report.py for the tables and plots of experiments/README.md.

The setting: SmolLM2-135M-Instruct on one-digit addition and subtraction (the
default experiment's task, chat template with the R1 system prompt).
- r1_zero: GRPO straight from the instruct model (no SFT), 30 steps.
- r1: cold start (SFT on 183 R1-format traces, configs/data/arithmetic_sft.jsonl)
  -> GRPO 20 steps -> rejection sampling from that policy (correct, R1-formatted,
  one language) -> SFT of the instruct model on cold-start + rejection data
  (DeepSeek-R1 retrains from the base at this stage) -> GRPO 20 steps.
- distill: the R1 pipeline's final policy as teacher writes traces for the
  training problems, filtered like rejection sampling; the instruct model is
  SFT-ed on them. Compared with direct RL (r1_zero's result) from the same start.
- r1_zero_base: R1-Zero from a base model, DeepSeek-R1-Zero's own setting: Gemma 3
  270M (pretrained only) with the R1-Zero template, GRPO 30 steps on arithmetic
  and on Countdown (configs/gemma3_arithmetic.py), each evaluated before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLD_START = os.path.join(REPO, "configs", "data", "arithmetic_sft.jsonl")
TASK_KWARGS = {"min_digits": 1, "max_digits": 1, "operators": "+-"}
GRPO_CONFIG = os.path.join(REPO, "configs", "smollm2_arithmetic.py")
SFT_CONFIG = os.path.join(REPO, "configs", "smollm2_sft.py")
GEMMA_CONFIG = os.path.join(REPO, "configs", "gemma3_arithmetic.py")
EVAL = dict(num_problems=48, num_samples=4, temperature=1.0, max_new_tokens=48)
# What a model is evaluated on: the task, its kwargs, the template and the reward.
ARITHMETIC = dict(task="arithmetic", task_kwargs=TASK_KWARGS, template="chat",
                  reward="accuracy_lenient")
BASE_ARITHMETIC = dict(ARITHMETIC, template="r1_zero")
BASE_COUNTDOWN = dict(task="countdown", template="r1_zero", reward="countdown",
                      task_kwargs=dict(min_numbers=2, max_numbers=3, max_number=10, max_target=30))
EXPERIMENTS = ("r1_zero", "r1", "distill", "r1_zero_base")

_ROOT = flags.DEFINE_string("root", os.path.join(REPO, "runs", "experiments"),
                            "where the runs and results.json go")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")


def grpo(workdir, model, steps, config=GRPO_CONFIG):
  return [sys.executable, "-m", "grpo_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.model.name={model}", f"--config.train.steps={steps}",
          "--config.eval.num_problems=0", f"--config.train.checkpoint_every={steps}"]


def sft(workdir, model, data):
  return [sys.executable, "-m", "grpo_jax.main", f"--config={SFT_CONFIG}:{data}",
          f"--workdir={workdir}", f"--config.model.name={model}"]


def rejection(output, model, num_problems, start_index=0):
  return [sys.executable, "-m", "grpo_jax.rejection", f"--model={model}", "--task=arithmetic",
          f"--task_kwargs={json.dumps(TASK_KWARGS)}", f"--num_problems={num_problems}",
          "--num_samples=4", "--temperature=1.0", "--max_new_tokens=48", "--require_format",
          "--reward=accuracy", f"--start_index={start_index}", f"--output={output}"]


def evaluate(output, model, on=ARITHMETIC):
  flags_ = dict(on, task_kwargs=json.dumps(on["task_kwargs"]), **EVAL)
  return [sys.executable, "-m", "grpo_jax.evaluate", f"--model={model}", f"--output={output}",
          *(f"--{k}={v}" for k, v in flags_.items())]


def concatenate(output, *inputs):
  """A stage without a command: the union of JSONL datasets."""
  with open(output + ".tmp", "w") as out:
    for path in inputs:
      with open(path) as f:
        out.writelines(line if line.endswith("\n") else line + "\n" for line in f if line.strip())
  os.replace(output + ".tmp", output)


def stages(name, root):
  """(stage name, command or callable, the file or folder it makes, model to evaluate or None[,
  what to evaluate it on: ARITHMETIC unless given])."""
  d = lambda *p: os.path.join(root, name, *p)  # noqa: E731
  base = "smollm2-135m-instruct"
  if name == "r1_zero":
    return [("instruct", None, None, base),
            ("grpo", grpo(d("grpo"), base, 30), d("grpo"), d("grpo"))]
  if name == "r1":
    return [("cold_start_sft", sft(d("cold_start"), base, COLD_START), d("cold_start"),
             d("cold_start")),
            ("grpo_1", grpo(d("grpo_1"), d("cold_start"), 20), d("grpo_1"), d("grpo_1")),
            ("rejection_sampling", rejection(d("rs.jsonl"), d("grpo_1"), 183), d("rs.jsonl"), None),
            ("sft_data", lambda: concatenate(d("sft_2.jsonl"), COLD_START, d("rs.jsonl")),
             d("sft_2.jsonl"), None),
            ("sft_2", sft(d("sft_2"), base, d("sft_2.jsonl")), d("sft_2"), d("sft_2")),
            ("grpo_2", grpo(d("grpo_2"), d("sft_2"), 20), d("grpo_2"), d("grpo_2"))]
  if name == "distill":
    teacher = os.path.join(root, "r1", "grpo_2")
    return [("teacher_traces", rejection(d("traces.jsonl"), teacher, 183), d("traces.jsonl"),
             None),
            ("student_sft", sft(d("student"), base, d("traces.jsonl")), d("student"),
             d("student"))]
  if name == "r1_zero_base":
    gemma = "gemma3-270m"
    return [("base_arithmetic", None, None, gemma, BASE_ARITHMETIC),
            ("grpo_arithmetic", grpo(d("grpo_arithmetic"), gemma, 30, GEMMA_CONFIG),
             d("grpo_arithmetic"), d("grpo_arithmetic"), BASE_ARITHMETIC),
            ("base_countdown", None, None, gemma, BASE_COUNTDOWN),
            ("grpo_countdown", grpo(d("grpo_countdown"), gemma, 30, GEMMA_CONFIG + ":countdown"),
             d("grpo_countdown"), d("grpo_countdown"), BASE_COUNTDOWN)]
  raise ValueError(f"unknown experiment {name!r}; expected one of {list(EXPERIMENTS)}")


def run(name, root, dry_run=False):
  results_path = os.path.join(root, "results.json")
  results = json.load(open(results_path)) if os.path.exists(results_path) else {}
  for stage, command, product, model, *on in stages(name, root):
    key = f"{name}/{stage}"
    if command is not None and not os.path.exists(os.path.join(root, name, f".{stage}.done")):
      print(f"[{key}] " + (" ".join(command) if isinstance(command, list) else "(concatenate)"),
            file=sys.stderr, flush=True)
      if not dry_run:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        t = time.perf_counter()
        if callable(command):
          command()
        else:
          subprocess.run(command, cwd=REPO, check=True)
        results.setdefault(key, {})["stage_s"] = time.perf_counter() - t
        open(os.path.join(root, name, f".{stage}.done"), "w").close()
        stats = product and product.removesuffix(".jsonl") + ".stats.json"
        if stats and product.endswith(".jsonl") and os.path.exists(stats):
          results[key]["data"] = json.load(open(stats))
    if model is not None and "eval" not in results.get(key, {}):
      command = evaluate(os.path.join(root, name, f"eval_{stage}.jsonl"), model, *on)
      print(f"[{key}] " + " ".join(command), file=sys.stderr, flush=True)
      if not dry_run:
        out = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
        results.setdefault(key, {})["eval"] = json.loads(out.stdout.strip().splitlines()[-1])
    if not dry_run:
      with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
      os.replace(results_path + ".tmp", results_path)


def main(argv):
  names = argv[1:]  # the experiments, as positional arguments
  if not names or not set(names) <= set(EXPERIMENTS):
    raise app.UsageError(f"name one or more experiments of {list(EXPERIMENTS)}; got {names}")
  for name in names:
    run(name, _ROOT.value, _DRY_RUN.value)


if __name__ == "__main__":
  app.run(main)
