"""The experiments as pipelines of CLI stages, each over several seeds.

    .venv/bin/python experiments/run.py headline                  # 3 seeds, ~1 hour on 2 CPU cores
    .venv/bin/python experiments/run.py variants ppo --seeds=1    # one seed: indicative only
    .venv/bin/python experiments/run.py r1 --root=runs/experiments --dry_run   # print the commands
    .venv/bin/python experiments/run.py variants --seeds=2 --stages=grpo,dapo  # a seed for two

Every stage is one command a user could type (`grpo_jax.main` for GRPO and SFT,
`grpo_jax.rejection` for rejection sampling and teacher traces,
`grpo_jax.evaluate` for held-out accuracy), printed before it runs. Each seed
S = 0 .. --seeds - 1 runs the whole pipeline in ROOT/NAME/seedS/ with S as the
training seed (sampling) and the task seed (the order and draw of training
problems); its models are evaluated on the same held-out problems with
sampling seed S. A model no stage trained (the instruct or base model) is
evaluated once, with seed 0. A stage that finished is skipped when the script
runs again, so an interrupted pipeline resumes and more seeds can be added
later. Results: ROOT/results.json ({"NAME/STAGE": {"seeds": {S: {"stage_s",
"eval", "workdir", "eval_path"}}}}); each finished stage is also recorded in
--record (experiments/results/, committed: results.json with relative paths,
each run's metrics.jsonl and each evaluation's JSONL, not the checkpoints), so
that results outlive the checkout that ran them and a stage recorded there is
not run again unless a later stage needs its model. experiments/report.py reads
the record for the tables (mean +- standard deviation over seeds, and each evaluation's 95%
interval) and plots (bands over seeds) of experiments/README.md.

Held-out evaluation: the headline task's first 500 distinct held-out problems x
2 samples at temperature 1 (HEADLINE_EVAL), for every SmolLM2 experiment; the
Gemma base-model runs (r1_zero_base) keep the 1-digit task's 48 x 4 (EVAL), which
that task's split answers with its 17 distinct problems.

The experiments, all from SmolLM2-135M-Instruct (the GGUF's Q4_1 weights
dequantised to fp32) unless said:
- headline: GRPO 30 steps on 1-2 digit addition and subtraction
  (configs/smollm2_arithmetic.py:two_digit), the README's headline. It is also
  the R1-Zero arm of the R1 comparison: RL straight from the instruct model.
- variants: the GRPO family on the headline task, each with mu = 2 updates per
  rollout so that ratios and clipping act: GRPO, DAPO (clip-higher, token-level
  loss, dynamic sampling), Dr. GRPO, RLOO, CISPO, GMPO.
- ppo: PPO with a learned critic and GAE against GRPO, same task and budget.
- lora: GRPO with LoRA adapters (rank 16, lr 2e-4) against the headline's full fine-tuning.
- r1: on the headline task: cold start (SFT on 183 R1-format traces of 1-digit
  problems, configs/data/arithmetic_sft.jsonl: they teach the format) -> GRPO 20
  steps -> rejection sampling from that policy on 183 training problems (correct,
  R1-formatted, one language) -> SFT of the instruct model on cold-start +
  rejection data (DeepSeek-R1 retrains from the base at this stage) -> GRPO 20 steps.
- distill: the R1 pipeline's final policy (same seed) as teacher writes traces
  for 183 training problems, filtered like rejection sampling; the instruct
  model is SFT-ed on them. Compared with direct RL (headline) from the same start.
  It reads r1's policy of the same seed from ROOT, so run it in the checkout
  (and the run.py call) that ran r1: `run.py r1 distill`.
- r1_zero_base: R1-Zero from a base model, DeepSeek-R1-Zero's own setting: Gemma 3
  270M (pretrained only) with the R1-Zero template, GRPO 30 steps on 1-digit
  arithmetic and on Countdown (configs/gemma3_arithmetic.py), each evaluated
  before and after.
- korean: Gemma 3 270M (base) on the Korean sentence-correction task with the
  answer template, exact-match, ROUGE-1 and language rewards (configs/gemma3_korean.py),
  GRPO 30 steps; exact match on the 93 held-out sentences x 4 samples before and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import load_results, record, save_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLD_START = os.path.join(REPO, "configs", "data", "arithmetic_sft.jsonl")
TASK_KWARGS = {"min_digits": 1, "max_digits": 1, "operators": "+-"}
HEADLINE_TASK_KWARGS = {"min_digits": 1, "max_digits": 2, "operators": "+-"}
GRPO_CONFIG = os.path.join(REPO, "configs", "smollm2_arithmetic.py")
HEADLINE_CONFIG = GRPO_CONFIG + ":two_digit"
SFT_CONFIG = os.path.join(REPO, "configs", "smollm2_sft.py")
GEMMA_CONFIG = os.path.join(REPO, "configs", "gemma3_arithmetic.py")
KOREAN_CONFIG = os.path.join(REPO, "configs", "gemma3_korean.py")
EVAL = dict(num_problems=48, num_samples=4, temperature=1.0, max_new_tokens=48)
HEADLINE_EVAL = dict(num_problems=500, num_samples=2, temperature=1.0, max_new_tokens=48,
                     prompts_per_batch=64)
# What a model is evaluated on: the task, its kwargs, the template, the reward and EVAL's settings.
ARITHMETIC = dict(task="arithmetic", task_kwargs=TASK_KWARGS, template="chat",
                  reward="accuracy_lenient", **EVAL)
HEADLINE = dict(ARITHMETIC, task_kwargs=HEADLINE_TASK_KWARGS, **HEADLINE_EVAL)
BASE_ARITHMETIC = dict(ARITHMETIC, template="r1_zero")
BASE_COUNTDOWN = dict(BASE_ARITHMETIC, task="countdown", reward="countdown",
                      task_kwargs=dict(min_numbers=2, max_numbers=3, max_number=10, max_target=30))
# The GRPO family on the headline task (issue: the variants, compared): name -> config flags.
# mu = 2 updates per rollout for all, so that the ratio-based losses differ from plain REINFORCE.
VARIANTS = {
    "grpo": {},
    "dapo": {"rl.loss_type": "dapo", "rl.epsilon_high": 0.28, "rl.dynamic_sampling": True},
    "dr_grpo": {"rl.loss_type": "dr_grpo", "rl.scale_rewards": "none"},
    "rloo": {"rl.advantage_estimator": "rloo"},
    "cispo": {"rl.loss_type": "cispo"},
    "gmpo": {"rl.loss_type": "gmpo"},
}
VARIANT_COMMON = {"rl.num_iterations": 2}
# LoRA against the headline's full fine-tuning: rank 16, alpha 32, every projection; adapters
# take a larger step than full fine-tuning (the usual practice), 2e-4 here against 2e-5.
LORA = {"model.lora.rank": 16, "opt.learning_rate": 2e-4}
EXPERIMENTS = ("headline", "variants", "ppo", "lora", "r1", "distill", "r1_zero_base", "korean")
# Pipelines whose stages never read an earlier stage's product (distill reads r1's policy).
INDEPENDENT = ("headline", "variants", "ppo", "lora", "r1_zero_base", "korean")

_ROOT = flags.DEFINE_string("root", os.path.join(REPO, "runs", "experiments"),
                            "where the runs and results.json go")
_RECORD = flags.DEFINE_string(
    "record", os.path.join(REPO, "experiments", "results"),
    "where each finished stage's results.json entry, metrics.jsonl and evaluation JSONL are "
    "copied: a folder committed with the code, read by experiments/report.py ('' for none)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds 0 .. N-1 of each pipeline")
_STAGES = flags.DEFINE_list(
    "stages", [], "run only these stages (e.g. --stages=grpo,dapo,rloo of `variants`) and skip "
    "the rest; only for pipelines whose stages are independent (" + ", ".join(INDEPENDENT) + ")")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of a pipeline: `command` (argv, a callable, or None for a model no stage
  trains) makes `product` (a file or folder); `model` (or None) is then evaluated `on`."""
  name: str
  command: list | object | None
  product: str | None
  model: str | None
  on: dict = dataclasses.field(default_factory=lambda: ARITHMETIC)


def korean_eval() -> dict:
  """The Korean task's held-out evaluation, from its config: the whole held-out split (93
  sentences) x 4 samples, one line each (the config's stop string), scored by exact match of
  the corrected sentence read through the answer template (the config's exact_match
  keywords)."""
  from grpo_jax import config as config_lib

  c = config_lib.from_file(KOREAN_CONFIG, None)
  return dict(task="jsonl", task_kwargs=c.task.kwargs.to_dict(), template=c.task.template,
              reward="exact_match", reward_kwargs=c.reward_kwargs["exact_match"].to_dict(),
              num_problems=c.eval.num_problems, num_samples=c.eval.num_samples,
              temperature=c.eval.temperature, max_new_tokens=c.rl.max_completion_length,
              stop_strings=list(c.rl.stop_strings),
              prompts_per_batch=c.eval.prompts_per_batch)


def config_flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def grpo(workdir, model, steps, seed, config=GRPO_CONFIG, **overrides):
  return [sys.executable, "-m", "grpo_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.model.name={model}", f"--config.train.steps={steps}",
          "--config.eval.num_problems=0", f"--config.train.checkpoint_every={steps}",
          f"--config.train.seed={seed}", f"--config.task.kwargs.seed={seed}",
          *config_flags(overrides)]


def sft(workdir, model, data, seed):
  return [sys.executable, "-m", "grpo_jax.main", f"--config={SFT_CONFIG}:{data}",
          f"--workdir={workdir}", f"--config.model.name={model}", f"--config.train.seed={seed}"]


def rejection(output, model, num_problems, seed, start_index=0):
  """Correct, R1-formatted samples of `model` on the headline task's first training problems."""
  return [sys.executable, "-m", "grpo_jax.rejection", f"--model={model}", "--task=arithmetic",
          f"--task_kwargs={json.dumps(HEADLINE_TASK_KWARGS)}", f"--num_problems={num_problems}",
          "--num_samples=4", "--temperature=1.0", "--max_new_tokens=48", "--require_format",
          "--reward=accuracy", f"--start_index={start_index}", f"--seed={seed}",
          f"--output={output}"]


def evaluate(output, model, on=ARITHMETIC, seed=0):
  flags_ = dict({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
                 for k, v in on.items()},
                seed=seed)
  return [sys.executable, "-m", "grpo_jax.evaluate", f"--model={model}", f"--output={output}",
          *(f"--{k}={v}" for k, v in flags_.items())]


def concatenate(output, *inputs):
  """A stage without a command: the union of JSONL datasets."""
  with open(output + ".tmp", "w") as out:
    for path in inputs:
      with open(path) as f:
        out.writelines(line if line.endswith("\n") else line + "\n" for line in f if line.strip())
  os.replace(output + ".tmp", output)


def teacher(root, seed):
  """The distillation's teacher: the r1 pipeline's final policy of the same seed."""
  return os.path.join(root, "r1", f"seed{seed}", "grpo_2")


def stages(name, root, seed=0):
  """The pipeline `name` for one seed, its files in ROOT/NAME/seedS/."""
  d = lambda *p: os.path.join(root, name, f"seed{seed}", *p)  # noqa: E731
  base = "smollm2-135m-instruct"
  if name == "headline":
    return [Stage("instruct", None, None, base, HEADLINE),
            Stage("grpo", grpo(d("grpo"), base, 30, seed, HEADLINE_CONFIG), d("grpo"), d("grpo"),
                  HEADLINE)]
  if name == "variants":
    return [Stage(v, grpo(d(v), base, 30, seed, HEADLINE_CONFIG, **VARIANT_COMMON, **overrides),
                  d(v), d(v), HEADLINE) for v, overrides in VARIANTS.items()]
  if name == "ppo":
    return [Stage("ppo", grpo(d("ppo"), base, 30, seed, HEADLINE_CONFIG,
                              **{"rl.advantage_estimator": "gae"}), d("ppo"), d("ppo"), HEADLINE)]
  if name == "lora":
    return [Stage("lora_r16", grpo(d("lora_r16"), base, 30, seed, HEADLINE_CONFIG, **LORA),
                  d("lora_r16"), d("lora_r16"), HEADLINE)]
  if name == "r1":
    return [Stage("cold_start_sft", sft(d("cold_start"), base, COLD_START, seed), d("cold_start"),
                  d("cold_start"), HEADLINE),
            Stage("grpo_1", grpo(d("grpo_1"), d("cold_start"), 20, seed, HEADLINE_CONFIG),
                  d("grpo_1"), d("grpo_1"), HEADLINE),
            Stage("rejection_sampling", rejection(d("rs.jsonl"), d("grpo_1"), 183, seed),
                  d("rs.jsonl"), None),
            Stage("sft_data", lambda: concatenate(d("sft_2.jsonl"), COLD_START, d("rs.jsonl")),
                  d("sft_2.jsonl"), None),
            Stage("sft_2", sft(d("sft_2"), base, d("sft_2.jsonl"), seed), d("sft_2"), d("sft_2"),
                  HEADLINE),
            Stage("grpo_2", grpo(d("grpo_2"), d("sft_2"), 20, seed, HEADLINE_CONFIG), d("grpo_2"),
                  d("grpo_2"), HEADLINE)]
  if name == "distill":
    return [Stage("teacher_traces", rejection(d("traces.jsonl"), teacher(root, seed), 183, seed),
                  d("traces.jsonl"), None),
            Stage("student_sft", sft(d("student"), base, d("traces.jsonl"), seed), d("student"),
                  d("student"), HEADLINE)]
  if name == "r1_zero_base":
    gemma = "gemma3-270m"
    return [Stage("base_arithmetic", None, None, gemma, BASE_ARITHMETIC),
            Stage("grpo_arithmetic", grpo(d("grpo_arithmetic"), gemma, 30, seed, GEMMA_CONFIG),
                  d("grpo_arithmetic"), d("grpo_arithmetic"), BASE_ARITHMETIC),
            Stage("base_countdown", None, None, gemma, BASE_COUNTDOWN),
            Stage("grpo_countdown", grpo(d("grpo_countdown"), gemma, 30, seed,
                                         GEMMA_CONFIG + ":countdown"),
                  d("grpo_countdown"), d("grpo_countdown"), BASE_COUNTDOWN)]
  if name == "korean":
    gemma, on = "gemma3-270m", korean_eval()
    return [Stage("base", None, None, gemma, on),
            Stage("grpo", grpo(d("grpo"), gemma, 30, seed, KOREAN_CONFIG), d("grpo"), d("grpo"),
                  on)]
  raise ValueError(f"unknown experiment {name!r}; expected one of {list(EXPERIMENTS)}")


def _say(key, command):
  print(f"[{key}] " + (" ".join(command) if isinstance(command, list) else "(concatenate)"),
        file=sys.stderr, flush=True)


def _finished(entry: dict, st: Stage) -> bool:
  """Whether a seed's entry holds stage `st`'s result: its evaluation, or (a stage whose model
  is not evaluated, e.g. a dataset) its wall-clock time."""
  return "eval" in entry if st.model is not None else "stage_s" in entry


def get(table: dict, key: str, seed: int) -> dict:
  """Seed `seed`'s entry of stage `key` in a results table ({} if none)."""
  return table.get(key, {"seeds": {}})["seeds"].get(str(seed), {})


def check_only(name, only) -> None:
  """A clear error, before any work, unless `only` names stages of an independent pipeline."""
  if not only:
    return
  if name not in INDEPENDENT:
    raise ValueError(f"--stages={','.join(only)}: experiment {name}'s stages build on each "
                     f"other, so it runs whole; choose stages only of {list(INDEPENDENT)}")
  names = [st.name for st in stages(name, "", 0)]
  if not set(only) <= set(names):
    raise ValueError(f"--stages={','.join(only)}: experiment {name} has no stage "
                     f"{sorted(set(only) - set(names))}; its stages are {names}")


def run(name, root, seeds=3, dry_run=False, record_dir="", only=()):
  """Runs pipeline `name` for seeds 0 .. seeds - 1 (its stages named in `only`, if given)."""
  check_only(name, only)
  results_path = os.path.join(root, "results.json")
  results = load_results(results_path)
  recorded = load_results(os.path.join(record_dir, "results.json")) if record_dir else {}
  for seed in range(seeds):
    folder = os.path.join(root, name, f"seed{seed}")
    pipeline = [st for st in stages(name, root, seed) if (st.command is not None or seed == 0)
                and (not only or st.name in only)]
    # A pipeline whose stages build on each other is skipped a whole seed at a time: when the
    # record holds every stage of that seed and this root none (an earlier checkout ran it).
    whole_seed = name not in INDEPENDENT and all(
        _finished(get(recorded, f"{name}/{st.name}", seed), st)
        and not get(results, f"{name}/{st.name}", seed) for st in pipeline)
    if whole_seed:
      print(f"[{name}/seed{seed}] every stage recorded in {record_dir} (another checkout's run): "
            "skipped", file=sys.stderr, flush=True)
      continue
    if (name == "distill" and not dry_run and not os.path.isdir(teacher(root, seed))
        and not os.path.exists(os.path.join(folder, ".teacher_traces.done"))):
      raise FileNotFoundError(
          f"distill seed {seed} needs the r1 pipeline's final policy of the same seed in "
          f"{teacher(root, seed)}, which this root does not hold "
          f"(the record keeps results, not checkpoints). Run r1 for this seed here first: "
          f"`experiments/run.py r1 distill --seeds={seeds} --root={root}` with a --record "
          f"that does not hold r1/seed{seed} (e.g. --record='').")
    for st in pipeline:
      key, run_key = f"{name}/{st.name}", f"{name}/{st.name}/seed{seed}"
      done, ours = get(recorded, key, seed), get(results, key, seed)
      if _finished(done, st) and not ours and (name in INDEPENDENT or st.command is None):
        print(f"[{run_key}] recorded in {record_dir} (another checkout's run): skipped",
              file=sys.stderr, flush=True)
        continue
      entry = results.setdefault(key, {"seeds": {}})["seeds"].setdefault(str(seed), {})
      if st.command is not None and not os.path.exists(os.path.join(folder, f".{st.name}.done")):
        _say(run_key, st.command)
        if not dry_run:
          os.makedirs(folder, exist_ok=True)
          t = time.perf_counter()
          if callable(st.command):
            st.command()
          else:
            subprocess.run(st.command, cwd=REPO, check=True)
          entry["stage_s"] = time.perf_counter() - t
          open(os.path.join(folder, f".{st.name}.done"), "w").close()
          stats = st.product and st.product.removesuffix(".jsonl") + ".stats.json"
          if stats and st.product.endswith(".jsonl") and os.path.exists(stats):
            entry["data"] = json.load(open(stats))
      if st.product and os.path.isdir(st.product):
        entry["workdir"] = st.product
      if st.model is not None and "eval" not in entry:
        entry["eval_path"] = os.path.join(folder, f"eval_{st.name}.jsonl")
        command = evaluate(entry["eval_path"], st.model, st.on, seed)
        _say(run_key, command)
        if not dry_run:
          out = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
          entry["eval"] = json.loads(out.stdout.strip().splitlines()[-1])
      if not dry_run:
        save_results(results_path, results)
        if record_dir:  # this stage's entry only: the earlier ones are recorded already
          record({key: {"seeds": {str(seed): entry}}}, record_dir)


def main(argv):
  names = argv[1:]  # the experiments, as positional arguments
  if not names or not set(names) <= set(EXPERIMENTS):
    raise app.UsageError(f"name one or more experiments of {list(EXPERIMENTS)}; got {names}")
  if _SEEDS.value < 1:
    raise app.UsageError(f"--seeds={_SEEDS.value} must be >= 1")
  if _STAGES.value and len(names) != 1:
    raise app.UsageError(f"--stages={','.join(_STAGES.value)} names stages of one experiment; "
                         f"got {len(names)} experiments {names}: run them one at a time")
  try:  # run() checks again; here the error is a usage message, not a traceback
    check_only(names[0], _STAGES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for name in names:
    run(name, _ROOT.value, _SEEDS.value, _DRY_RUN.value, _RECORD.value, _STAGES.value)


if __name__ == "__main__":
  app.run(main)
