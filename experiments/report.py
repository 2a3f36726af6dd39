"""Tables and plots of experiments/run.py's results, written into experiments/README.md.

    .venv/bin/python experiments/report.py [--root=experiments/results] [--blocks=variants,...]

Reads ROOT/results.json (each model's held-out evaluation, per seed; by default
experiments/run.py's record, committed with the code), each
evaluation's per-problem JSONL (the share of R1-formatted answers; the 95%
interval for evaluations made before `evaluate` reported one) and each training
run's metrics.jsonl (reward, accuracy, length and step time per step). For each
block of experiments/README.md (BLOCKS) with results it writes the table between
the block's markers and the block's plot; a block without results keeps its text.

A table row is one stage: pass@1 as the mean +- standard deviation over its
seeds (the sample standard deviation, n - 1), each seed's pass@1 with its 95%
interval over problems, maj@k, the R1-format share, mean completion tokens and
the stage's wall-clock time (mean over seeds). Plots draw each stage's mean over
seeds as a line and the seeds' range as a band. The Korean block adds what the
held-out answers are (`answer_kinds`): template matches, ROUGE-1 against the
reference answer, verbatim copies of the sentence to correct, bare corrections.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import numpy as np
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grpo_jax import cli, evaluate, metrics_io, rewards  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from results_io import load_results  # noqa: E402


def _markers(name):
  return (f"<!-- results {name}: written by experiments/report.py -->",
          f"<!-- /results {name} -->")


# Each block of README.md: (the experiments whose rows it shows, its plot, the plot's kind). A
# block is written once its first experiment has results; the others are its references (the
# headline's GRPO run is the R1 comparison's R1-Zero arm: RL straight from the instruct model).
BLOCKS = {
    "main": (("r1", "distill", "headline"), "grpo_curves.png", "curves"),
    "r1_zero_base": (("r1_zero_base",), "r1_zero_base.png", "base"),
    "headline": (("headline",), "headline.png", "curves"),
    "variants": (("variants",), "variants.png", "curves"),
    "ppo": (("ppo", "headline"), "ppo_vs_grpo.png", "wall_clock"),
    "lora": (("lora", "headline"), "lora_vs_full.png", "wall_clock"),
    "korean": (("korean",), "korean.png", "rewards"),
}
# The main block's markers predate the per-block ones.
MARKERS = dict({name: _markers(name) for name in BLOCKS},
               main=("<!-- results: written by experiments/report.py -->", "<!-- /results -->"))

_ROOT = flags.DEFINE_string("root", os.path.join(HERE, "results"),
                            "the folder holding results.json: experiments/run.py's --record "
                            "(default) or its --root")


def format_share(eval_jsonl: str) -> float:
  """Share of the evaluated completions with the strict R1 format (<think>..</think><answer>..)."""
  texts = []
  with open(eval_jsonl) as f:
    for line in f:
      texts.extend(json.loads(line)["completions"])
  return sum(rewards.format_reward(None, texts)) / max(len(texts), 1)


def select(results: dict, experiments) -> dict:
  """The results of the named experiments (keys "experiment/stage"), in their order: the first
  experiment's stages, then the others' (its references)."""
  chosen = {}
  for name in experiments:
    chosen.update({key: r for key, r in results.items() if key.split("/")[0] == name})
  return chosen


def pass1_interval(eval_jsonl: str) -> tuple[float, float]:
  """pass@1's 95% interval from an evaluation's per-problem JSONL (`evaluate.interval`: a
  bootstrap over its distinct problems), for evaluations made before the summary held it."""
  rows = [json.loads(line) for line in open(eval_jsonl)]
  return evaluate.interval([r["num_correct"] for r in rows], [len(r["completions"]) for r in rows],
                           [r["prompt"] for r in rows])


def _evals(entry: dict) -> list[tuple[str, dict]]:
  """(seed, seed entry) of a stage's evaluated seeds, in seed order."""
  return sorted(((s, e) for s, e in entry["seeds"].items() if "eval" in e), key=lambda x: int(x[0]))


def mean_sd(values) -> str:
  values = np.asarray(values, float)
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def tables(results: dict) -> str:
  # The untrained models (no stage time) first, then each experiment's stages in order.
  order = {name: i for i, name in enumerate(dict.fromkeys(key.split("/")[0] for key in results))}
  results = dict(sorted(results.items(), key=lambda kv: (any(
      "stage_s" in e for e in kv[1]["seeds"].values()), order[kv[0].split("/")[0]])))
  k = next(e["eval"]["num_samples"] for r in results.values() for _, e in _evals(r))
  lines = [f"| model (stage) | seeds | pass@1 (mean ± sd over seeds) | each seed: pass@1 [95% "
           f"interval] | maj@{k} | distinct problems x samples | R1 format | mean tokens | "
           "stage time |",
           "|---|---|---|---|---|---|---|---|---|"]
  for key, r in results.items():
    evals = _evals(r)
    if not evals:
      continue
    per_seed, shares = [], []
    for _, e in evals:
      low, high = e["eval"].get("pass@1_ci95") or pass1_interval(e["eval_path"])
      per_seed.append(f"{e['eval']['pass@1']:.3f} [{low:.2f}, {high:.2f}]")
      shares.append(format_share(e["eval_path"]) if os.path.exists(e["eval_path"]) else np.nan)
    ev = [e["eval"] for _, e in evals]
    distinct = ev[0].get("num_distinct_problems") or len(
        {json.loads(line)["prompt"] for line in open(evals[0][1]["eval_path"])})
    times = [e["stage_s"] for _, e in evals if "stage_s" in e]
    minutes = f"{np.mean(times) / 60:.1f} min" if times else "-"
    lines.append(
        f"| {key} | {len(evals)} | {mean_sd([e['pass@1'] for e in ev])} | {'; '.join(per_seed)} | "
        f"{mean_sd([e[f'maj@{k}'] for e in ev])} | {distinct} x {k} | {np.nanmean(shares):.2f} | "
        f"{np.mean([e['mean_length'] for e in ev]):.1f} | {minutes} |")
  data = [(f"{key} (seed {s})", e["data"]) for key, r in results.items()
          for s, e in sorted(r["seeds"].items()) if "data" in e]
  if data:
    lines += ["", "| dataset | problems | samples | kept | acceptance | problems with a kept answer |",
              "|---|---|---|---|---|---|"]
    for key, s in data:
      lines.append(f"| {key} | {s['problems']} | {s['samples']} | {s['kept']} | "
                   f"{s['acceptance_rate']:.2f} | {s['problems_with_kept']} |")
  return "\n".join(lines)


def _runs(results: dict) -> dict[str, list[list[dict]]]:
  """{stage key: [each seed's training records]} of the stages that trained with GRPO/PPO."""
  runs = {}
  for key, r in results.items():
    seeds = [e["workdir"] for _, e in sorted(r["seeds"].items())
             if os.path.exists(os.path.join(e.get("workdir", ""), "metrics.jsonl"))]
    records = [[x for x in metrics_io.read_metrics(w) if "reward" in x] for w in seeds]
    if records and all(records):
      runs[key] = records
  return runs


def task_reward(record: dict) -> str:
  """The task reward's key in a step record (the reward named first among the known ones)."""
  return next(f"rewards/{n}/mean" for n in ("accuracy_lenient", "countdown", "accuracy",
                                            "exact_match")
              if f"rewards/{n}/mean" in record)


SMOOTH = 5  # steps in the trailing mean of the plotted rewards (a step's batch is 4 problems)


def smooth(values, window: int = SMOOTH) -> list[float]:
  """Trailing mean over the last `window` values (fewer at the start)."""
  v = np.asarray(values, float)
  sums = np.cumsum(np.concatenate([[0.0], v]))
  idx = np.arange(1, len(v) + 1)
  start = np.maximum(idx - window, 0)
  return list((sums[idx] - sums[start]) / (idx - start))


def band(ax, x_S, y_S, label):
  """Mean over seeds as a line, the seeds' range as a band (x and y: one list per seed)."""
  n = min(len(y) for y in y_S)
  x = np.mean([np.asarray(v[:n], float) for v in x_S], 0)
  y = np.asarray([v[:n] for v in y_S], float)
  (line,) = ax.plot(x, y.mean(0), label=f"{label} ({len(y_S)} seed{'s' * (len(y_S) > 1)})")
  if len(y_S) > 1:
    ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)


def rewards_plot(runs: dict, path: str) -> None:
  """One panel per reward function (its batch mean, trailing mean of SMOOTH steps), then the
  completion length: what each reward does over training."""
  names = [k for k in next(iter(runs.values()))[0][0] if k.startswith("rewards/")
           and k.endswith("/mean")]
  fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.3))
  for key, seeds in runs.items():
    steps = [[x["step"] for x in recs] for recs in seeds]
    for ax, name in zip(axes, names):
      band(ax, steps, [smooth([x.get(name, np.nan) for x in recs]) for recs in seeds], key)
      ax.set(xlabel="step", title=name.split("/")[1], ylabel=f"batch mean (last {SMOOTH} steps)")
    band(axes[-1], steps, [[x["completions/mean_length"] for x in r] for r in seeds], key)
  axes[-1].set(xlabel="step", title="completion length", ylabel="mean tokens")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def curves_plot(results: dict, path: str, kind: str) -> None:
  runs = _runs(results)
  if not runs:
    return
  if kind == "rewards":
    return rewards_plot(runs, path)
  columns = {"curves": 3, "base": 3, "wall_clock": 3}[kind]
  fig, axes = plt.subplots(1, columns, figsize=(4.3 * columns, 3.5))
  for key, seeds in runs.items():
    steps = [[x["step"] for x in recs] for recs in seeds]
    accuracy = [smooth([x[task_reward(x)] for x in recs]) for recs in seeds]
    band(axes[0], steps, accuracy, key)
    if kind == "wall_clock":
      minutes = [list(np.cumsum([x.get("time/step_s", 0.0) for x in recs]) / 60)
                 for recs in seeds]
      band(axes[1], minutes, accuracy, key)
    elif kind == "base":
      band(axes[1], steps, [[x.get("rewards/format/mean", 0.0) for x in r] for r in seeds], key)
    else:
      band(axes[1], steps, [smooth([x["reward"] for x in recs]) for recs in seeds], key)
    band(axes[2], steps, [[x["completions/mean_length"] for x in r] for r in seeds], key)
  axes[0].set(xlabel="step", ylabel=f"task reward (step's samples; mean of last {SMOOTH})")
  axes[1].set(**{"wall_clock": dict(xlabel="wall-clock minutes (sum of step times)",
                                    ylabel=f"task reward (mean of last {SMOOTH} steps)"),
                 "base": dict(xlabel="step", ylabel="R1 format reward (batch mean)"),
                 "curves": dict(xlabel="step",
                                ylabel=f"total reward (mean of last {SMOOTH} steps)")}[kind])
  axes[2].set(xlabel="step", ylabel="mean completion length (tokens)")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_BLOCKS = flags.DEFINE_list("blocks", [], f"the blocks to rewrite (default: every block with "
                           f"results), of {list(BLOCKS)}")


def answer_kinds(eval_jsonl: str, pattern: str) -> dict[str, float]:
  """Shares of a Korean evaluation's answers (each stripped): those matching the answer
  template `pattern` whole; those whose words are the sentence to correct's (a copy, up to
  quotes, spacing and punctuation); those whose words are its correction's (no template); and
  their mean ROUGE-1 (Unicode words) against the reference answer."""
  from grpo_jax.rewards.functions import word_tokens

  rows = [json.loads(line) for line in open(eval_jsonl)]
  pairs = [(r, c.strip()) for r in rows for c in r["completions"]]
  texts, answers = [c for _, c in pairs], [r["answer"] for r, _ in pairs]
  return {"template": np.mean(rewards.regex_format_reward(None, texts, pattern=pattern)),
          "rouge1": np.mean(rewards.rouge1_reward(None, texts, answer=answers,
                                                  tokenizer="words")),
          "copy": np.mean([word_tokens(c) == word_tokens(r["sentence"]) for r, c in pairs]),
          "bare": np.mean([word_tokens(c) == word_tokens(r["corrected"]) for r, c in pairs])}


def korean_table(results: dict) -> str:
  """What the Korean evaluations' answers are (`answer_kinds`), mean ± sd over seeds."""
  from grpo_jax import config as config_lib

  config = config_lib.from_file(os.path.join(os.path.dirname(HERE), "configs",
                                             "gemma3_korean.py"), None)
  pattern = config.reward_kwargs["regex_format"]["pattern"]
  lines = ["| model (stage) | seeds | template (whole answer) | ROUGE-1 vs the reference | "
           "copies the sentence to correct (its words) | bare correction, no template |",
           "|---|---|---|---|---|---|"]
  for key, r in results.items():
    kinds = [answer_kinds(e["eval_path"], pattern) for _, e in _evals(r)]
    if kinds:
      lines.append(f"| {key} | {len(kinds)} | " + " | ".join(
          mean_sd([k[name] for k in kinds]) for name in ("template", "rouge1", "copy", "bare"))
          + " |")
  return "\n".join(lines)


def report(root: str, out: str = HERE, blocks=()) -> None:
  """Writes each block's plot into `out` and its table into out/README.md (only `blocks`, if
  given)."""
  unknown = set(blocks) - set(BLOCKS)
  if unknown:
    raise ValueError(f"unknown blocks {sorted(unknown)}; known: {list(BLOCKS)}")
  results = load_results(os.path.join(root, "results.json"))
  readme = os.path.join(out, "README.md")
  with open(readme) as f:
    body = f.read()
  for block, (experiments, plot, kind) in BLOCKS.items():
    if blocks and block not in blocks:
      continue
    chosen = select(results, experiments)
    if not any(_evals(r) for key, r in chosen.items() if key.split("/")[0] == experiments[0]):
      continue
    text = tables(chosen)
    if block == "korean":
      text += "\n\n" + korean_table(chosen)
    print(text)
    curves_plot(chosen, os.path.join(out, plot), kind)
    begin, end = MARKERS[block]
    if begin in body and end in body:
      head, rest = body.split(begin, 1)
      body = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
  with open(readme, "w") as f:
    f.write(body)


def main(argv):
  cli.no_arguments(argv)
  report(_ROOT.value, blocks=_BLOCKS.value)


if __name__ == "__main__":
  app.run(main)
