"""results.json of experiments/run.py, read and written by run.py and report.py."""

from __future__ import annotations

import json
import os
import shutil


def load_results(path: str) -> dict:
  """{"NAME/STAGE": {"seeds": {"S": {"stage_s", "eval", "workdir", "eval_path", ...}}}}; an
  entry of the earlier one-seed layout ({"stage_s", "eval"}, its runs in ROOT/NAME/STAGE and
  ROOT/NAME/eval_STAGE.jsonl) becomes seed 0."""
  results = json.load(open(path)) if os.path.exists(path) else {}
  root = os.path.dirname(os.path.abspath(path))
  for entry in results.values():  # paths relative to the file's folder (a record) made absolute
    for e in entry.get("seeds", {}).values():
      for field in ("workdir", "eval_path"):
        if field in e:
          e[field] = os.path.join(root, e[field])
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


def record(results: dict, folder: str) -> dict:
  """Copies what the report needs of each finished stage (its training metrics.jsonl and its
  per-problem evaluation JSONL, small files) into `folder`, a directory committed with the
  code, and merges their entries into folder/results.json with paths relative to it. Entries
  recorded earlier (another checkout, whose runs are gone) are kept unless replaced. Returns
  the record's results (paths absolute)."""
  path = os.path.join(folder, "results.json")
  recorded = json.load(open(path)) if os.path.exists(path) else {}  # its paths stay relative
  for key, entry in results.items():
    name, stage = key.split("/")
    for seed, e in entry["seeds"].items():
      if "eval" not in e and "data" not in e:
        continue  # nothing finished to record yet
      out = {k: v for k, v in e.items() if k not in ("workdir", "eval_path")}
      here = os.path.join(name, f"seed{seed}")
      metrics = os.path.join(e.get("workdir", ""), "metrics.jsonl")
      if e.get("workdir") and os.path.exists(metrics):
        out["workdir"] = os.path.join(here, stage)
        _copy(metrics, os.path.join(folder, out["workdir"], "metrics.jsonl"))
      if e.get("eval_path") and os.path.exists(e["eval_path"]):
        out["eval_path"] = os.path.join(here, f"eval_{stage}.jsonl")
        _copy(e["eval_path"], os.path.join(folder, out["eval_path"]))
      recorded.setdefault(key, {"seeds": {}})["seeds"][seed] = out
  os.makedirs(folder, exist_ok=True)
  save_results(path, recorded)
  return load_results(path)


def _copy(source: str, dest: str) -> None:
  if os.path.abspath(source) != os.path.abspath(dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(source, dest)
