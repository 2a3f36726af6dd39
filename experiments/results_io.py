"""results.json of experiments/run.py, read and written by run.py and report.py."""

from __future__ import annotations

import json
import os


def load_results(path: str) -> dict:
  """{"NAME/STAGE": {"seeds": {"S": {"stage_s", "eval", "workdir", "eval_path", ...}}}}; an
  entry of the earlier one-seed layout ({"stage_s", "eval"}, its runs in ROOT/NAME/STAGE and
  ROOT/NAME/eval_STAGE.jsonl) becomes seed 0."""
  results = json.load(open(path)) if os.path.exists(path) else {}
  root = os.path.dirname(os.path.abspath(path))
  for key, entry in results.items():
    if "seeds" not in entry:
      name, stage = key.split("/")
      entry = dict(entry, workdir=os.path.join(root, name, stage),
                   eval_path=os.path.join(root, name, f"eval_{stage}.jsonl"))
      results[key] = {"seeds": {"0": entry}}
  return results


def save_results(path: str, results: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)
