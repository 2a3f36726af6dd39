"""Tables and plots of experiments/run.py's results, written into experiments/README.md.

    .venv/bin/python experiments/report.py [--root=runs/experiments]

Reads ROOT/results.json (one held-out evaluation per model), each evaluation's
per-problem JSONL (for the share of R1-formatted answers) and each GRPO run's
metrics.jsonl (reward and completion length per step). Writes
experiments/accuracy_per_stage.png, experiments/grpo_curves.png, and the
tables between the results markers of experiments/README.md.
"""

from __future__ import annotations

import json
import os

import matplotlib
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grpo_jax import cli, metrics_io, rewards  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- results: written by experiments/report.py -->", "<!-- /results -->"

_ROOT = flags.DEFINE_string("root", os.path.join(os.path.dirname(HERE), "runs", "experiments"),
                            "experiments/run.py's --root (holds results.json)")


def format_share(eval_jsonl: str) -> float:
  """Share of the evaluated completions with the strict R1 format (<think>..</think><answer>..)."""
  texts = []
  with open(eval_jsonl) as f:
    for line in f:
      texts.extend(json.loads(line)["completions"])
  return sum(rewards.format_reward(None, texts)) / max(len(texts), 1)


def tables(root: str, results: dict) -> str:
  k = next(r["eval"]["num_samples"] for r in results.values() if "eval" in r)
  lines = [f"| model (stage) | pass@1 | maj@{k} | pass@{k} | R1 format | mean tokens | stage time |",
           "|---|---|---|---|---|---|---|"]
  for key, r in results.items():
    if "eval" not in r:
      continue
    e = r["eval"]
    name, stage = key.split("/")
    share = format_share(os.path.join(root, name, f"eval_{stage}.jsonl"))
    minutes = f"{r['stage_s'] / 60:.1f} min" if "stage_s" in r else "-"
    lines.append(f"| {key} | {e['pass@1']:.3f} | {e[f'maj@{k}']:.3f} | {e[f'pass@{k}']:.3f} | "
                 f"{share:.2f} | {e['mean_length']:.1f} | {minutes} |")
  data = [(key, r["data"]) for key, r in results.items() if "data" in r]
  if data:
    lines += ["", "| dataset | problems | samples | kept | acceptance | problems with a kept answer |",
              "|---|---|---|---|---|---|"]
    for key, s in data:
      lines.append(f"| {key} | {s['problems']} | {s['samples']} | {s['kept']} | "
                   f"{s['acceptance_rate']:.2f} | {s['problems_with_kept']} |")
  return "\n".join(lines)


def plots(root: str, results: dict) -> None:
  evaluated = [(key, r["eval"]) for key, r in results.items() if "eval" in r]
  fig, ax = plt.subplots(figsize=(9, 3.5))
  ax.bar(range(len(evaluated)), [e["pass@1"] for _, e in evaluated], color="tab:blue")
  ax.set_xticks(range(len(evaluated)), [key for key, _ in evaluated], rotation=20, ha="right")
  ax.set_ylabel("held-out pass@1")
  ax.set_ylim(0, 1)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "accuracy_per_stage.png"), dpi=110)
  plt.close(fig)

  runs = [(key, os.path.join(root, *key.split("/")[:1], key.split("/")[1])) for key in results
          if key.split("/")[1].startswith("grpo")]
  runs = [(key, path) for key, path in runs if os.path.exists(os.path.join(path, "metrics.jsonl"))]
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
  fig.savefig(os.path.join(HERE, "grpo_curves.png"), dpi=110)
  plt.close(fig)


def main(argv):
  cli.no_arguments(argv)
  root = _ROOT.value
  with open(os.path.join(root, "results.json")) as f:
    results = json.load(f)
  text = tables(root, results)
  print(text)
  plots(root, results)
  readme = os.path.join(HERE, "README.md")
  with open(readme) as f:
    body = f.read()
  if BEGIN in body and END in body:
    head, rest = body.split(BEGIN, 1)
    body = head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1]
    with open(readme, "w") as f:
      f.write(body)


if __name__ == "__main__":
  app.run(main)
