"""Tables and plots of experiments/run.py's results, written into experiments/README.md.

    .venv/bin/python experiments/report.py [--root=runs/experiments]

Reads ROOT/results.json (one held-out evaluation per model), each evaluation's
per-problem JSONL (for the share of R1-formatted answers and pass@1's bootstrap
interval) and each GRPO run's
metrics.jsonl (reward and completion length per step). Writes
experiments/accuracy_per_stage.png and experiments/grpo_curves.png (r1_zero, r1,
distill), experiments/r1_zero_base.png (Gemma 3 base runs beside SmolLM2's
r1_zero), and the tables between each block's results markers of
experiments/README.md; a block without results keeps its text.
"""

from __future__ import annotations

import json
import os

import matplotlib
import numpy as np
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grpo_jax import cli, metrics_io, rewards  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Each block of README.md: (its experiments, begin marker, end marker).
BLOCKS = {
    "main": (("r1_zero", "r1", "distill"), "<!-- results: written by experiments/report.py -->",
             "<!-- /results -->"),
    "r1_zero_base": (("r1_zero_base",),
                     "<!-- results r1_zero_base: written by experiments/report.py -->",
                     "<!-- /results r1_zero_base -->"),
}

_ROOT = flags.DEFINE_string("root", os.path.join(os.path.dirname(HERE), "runs", "experiments"),
                            "experiments/run.py's --root (holds results.json)")


def format_share(eval_jsonl: str) -> float:
  """Share of the evaluated completions with the strict R1 format (<think>..</think><answer>..)."""
  texts = []
  with open(eval_jsonl) as f:
    for line in f:
      texts.extend(json.loads(line)["completions"])
  return sum(rewards.format_reward(None, texts)) / max(len(texts), 1)


def select(results: dict, experiments) -> dict:
  """The results of the named experiments (keys "experiment/stage"), in their order."""
  return {key: r for key, r in results.items() if key.split("/")[0] in experiments}


def pass1_interval(eval_jsonl: str, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
  """95% interval of pass@1 by a cluster bootstrap over the distinct problems: problems are
  drawn with replacement, each with all its evaluated rows (a problem the evaluation repeats
  is one cluster), and pass@1 is recomputed as right samples / samples."""
  right, total = {}, {}
  with open(eval_jsonl) as f:
    for line in f:
      row = json.loads(line)
      right[row["prompt"]] = right.get(row["prompt"], 0) + row["num_correct"]
      total[row["prompt"]] = total.get(row["prompt"], 0) + len(row["completions"])
  right_P, total_P = np.array(list(right.values())), np.array(list(total.values()))
  draws = np.random.default_rng(seed).integers(0, len(right_P), (resamples, len(right_P)))
  stats = right_P[draws].sum(1) / total_P[draws].sum(1)
  return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def tables(root: str, results: dict) -> str:
  k = next(r["eval"]["num_samples"] for r in results.values() if "eval" in r)
  lines = [f"| model (stage) | pass@1 | 95% interval | maj@{k} | pass@{k} | R1 format | "
           "mean tokens | stage time |",
           "|---|---|---|---|---|---|---|---|"]
  for key, r in results.items():
    if "eval" not in r:
      continue
    e = r["eval"]
    name, stage = key.split("/")
    path = os.path.join(root, name, f"eval_{stage}.jsonl")
    share, (low, high) = format_share(path), pass1_interval(path)
    minutes = f"{r['stage_s'] / 60:.1f} min" if "stage_s" in r else "-"
    lines.append(f"| {key} | {e['pass@1']:.3f} | [{low:.2f}, {high:.2f}] | {e[f'maj@{k}']:.3f} | "
                 f"{e[f'pass@{k}']:.3f} | {share:.2f} | {e['mean_length']:.1f} | {minutes} |")
  data = [(key, r["data"]) for key, r in results.items() if "data" in r]
  if data:
    lines += ["", "| dataset | problems | samples | kept | acceptance | problems with a kept answer |",
              "|---|---|---|---|---|---|"]
    for key, s in data:
      lines.append(f"| {key} | {s['problems']} | {s['samples']} | {s['kept']} | "
                   f"{s['acceptance_rate']:.2f} | {s['problems_with_kept']} |")
  return "\n".join(lines)


def _grpo_runs(root: str, results: dict) -> list[tuple[str, str]]:
  """(key, workdir) of the GRPO stages that wrote metrics.jsonl."""
  runs = [(key, os.path.join(root, *key.split("/"))) for key in results
          if key.split("/")[1].startswith("grpo")]
  return [(key, path) for key, path in runs if os.path.exists(os.path.join(path, "metrics.jsonl"))]


def plots(root: str, results: dict, out: str = HERE) -> None:
  evaluated = [(key, r["eval"]) for key, r in results.items() if "eval" in r]
  fig, ax = plt.subplots(figsize=(9, 3.5))
  ax.bar(range(len(evaluated)), [e["pass@1"] for _, e in evaluated], color="tab:blue")
  ax.set_xticks(range(len(evaluated)), [key for key, _ in evaluated], rotation=20, ha="right")
  ax.set_ylabel("held-out pass@1")
  ax.set_ylim(0, 1)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "accuracy_per_stage.png"), dpi=110)
  plt.close(fig)

  runs = _grpo_runs(root, results)
  if not runs:
    return
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
  for key, path in runs:
    records = [r for r in metrics_io.read_metrics(path) if "reward" in r]
    steps = [r["step"] for r in records]
    left.plot(steps, [r["reward"] for r in records], label=key)
    right.plot(steps, [r["completions/mean_length"] for r in records], label=key)
  left.set(xlabel="GRPO step", ylabel="mean reward (accuracy + 0.5 format)")
  right.set(xlabel="GRPO step", ylabel="mean completion length (tokens)")
  left.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "grpo_curves.png"), dpi=110)
  plt.close(fig)


def base_model_plot(root: str, results: dict, out: str = HERE) -> None:
  """Task reward, format reward and completion length per step of each R1-Zero run: the
  Gemma 3 base runs and, when present, SmolLM2-Instruct's r1_zero/grpo."""
  runs = _grpo_runs(root, results)
  if not runs:
    return
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  for key, path in runs:
    records = [r for r in metrics_io.read_metrics(path) if "reward" in r]
    steps = [r["step"] for r in records]
    task = next(name for name in ("accuracy_lenient", "countdown", "accuracy")
                if f"rewards/{name}/mean" in records[0])
    label = f"{key} ({task})"
    axes[0].plot(steps, [r[f"rewards/{task}/mean"] for r in records], label=label)
    axes[1].plot(steps, [r["rewards/format/mean"] for r in records], label=label)
    axes[2].plot(steps, [r["completions/mean_length"] for r in records], label=label)
  axes[0].set(xlabel="GRPO step", ylabel="task reward (batch mean)")
  axes[1].set(xlabel="GRPO step", ylabel="R1 format reward (batch mean)")
  axes[2].set(xlabel="GRPO step", ylabel="mean completion length (tokens)")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "r1_zero_base.png"), dpi=110)
  plt.close(fig)


def report(root: str, out: str = HERE) -> None:
  """Writes the plots into `out` and the tables into out/README.md's blocks."""
  with open(os.path.join(root, "results.json")) as f:
    results = json.load(f)
  readme = os.path.join(out, "README.md")
  with open(readme) as f:
    body = f.read()
  for block, (experiments, begin, end) in BLOCKS.items():
    chosen = select(results, experiments)
    if not any("eval" in r for r in chosen.values()):
      continue
    text = tables(root, chosen)
    print(text)
    if block == "main":
      plots(root, chosen, out)
    else:
      base_model_plot(root, {**select(results, ("r1_zero",)), **chosen}, out)
    if begin in body and end in body:
      head, rest = body.split(begin, 1)
      body = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
  with open(readme, "w") as f:
    f.write(body)


def main(argv):
  cli.no_arguments(argv)
  report(_ROOT.value)


if __name__ == "__main__":
  app.run(main)
