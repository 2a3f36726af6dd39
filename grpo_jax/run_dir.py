"""What a run's workdir holds, and whether a run may start in it: the checks made before
anything is loaded or written.

    resume = run_dir.check(cfg, path, steps=S)     # ConfigError, or what there is to resume
    if resume.complete: ...                        # a finished run: nothing to train

A workdir with checkpoints is resumed only with the config it was trained with,
up to `RESUMABLE_KEYS`; the changes a run starts with go into config.json's
"history" (docs/config.md, "Resuming a workdir").
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os

from grpo_jax import checkpointing, config as config_lib, models

log = logging.getLogger("grpo_jax")

CONFIG_FILE = "config.json"

# Keys a resumed run may change without --allow_config_change: how long to train, how often to
# log, evaluate and save, how the evaluation samples, and how the run is laid out on the devices
# (the same update on any mesh, any number of micro-batches and any attention block). Every other
# key changes what is trained. docs/config.md lists them too.
RESUMABLE_KEYS = frozenset({
    "train.steps", "sft.epochs", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.device_memory_gb",
    "train.grad_accum_steps", "model.attention_block", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "eval.num_problems", "eval.allow_repeats", "eval.num_samples", "eval.temperature",
    "eval.prompts_per_batch",
})
_ABSENT = "<absent>"


@dataclasses.dataclass(frozen=True)
class Resume:
  """What a workdir holds before the run loads anything."""
  step: int  # the latest checkpoint's step; 0: nothing to resume
  complete: bool  # the checkpoint is at (or past) the run's last step: nothing to train
  history: list  # config.json's "history", with this start's changes appended


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):  # an empty section (task.kwargs {}) has no keys
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _config_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_changes(old: dict, cfg) -> dict[str, tuple]:
  """{key: (old, new)} where `cfg` differs from a run's config.json `old`. A key the old file
  lacks (written before the key existed) counts as its default."""
  before = _flat(_config_json(config_lib.defaults()))
  before.update(_flat({k: v for k, v in old.items() if k != "history"}))
  after = _flat(_config_json(cfg))
  return {k: (before.get(k, _ABSENT), after.get(k, _ABSENT))
          for k in sorted(before.keys() | after.keys())
          if before.get(k, _ABSENT) != after.get(k, _ABSENT)}


def _checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoints' steps, from the directory names alone (orbax writes a step under
  a temporary name and renames it when complete), so no checkpoint manager is started."""
  path = os.path.join(workdir, checkpointing.RUN_DIR)
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path)
                if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def _check_model_names(cfg) -> None:
  """The policy (and a judge model) resolve to something loadable; the files are read later."""
  names = [("model.name", cfg.model.name)]
  if any(name == "judge" for name, _ in cfg.rewards) and cfg.judge.model != "policy":
    names.append(("judge.model", cfg.judge.model))
  for key, name in names:
    try:
      models.resolve(name)
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.ConfigError(f"config.{key}={name!r}: {e}") from None


def check(cfg, workdir: str, *, steps: int, allow_config_change: bool = False) -> Resume:
  """Start-up checks of the workdir and the model names, before anything is loaded or written.

  A workdir with checkpoints is resumed only with the config it was trained with, up to
  RESUMABLE_KEYS (changes of those are logged); other changes raise ConfigError with a diff
  unless `allow_config_change`. Either way they go into config.json's "history" once the run
  starts (`runner.setup` writes it).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file, not a directory; pass a new "
                                 "directory, or a run's directory to resume it")
  _check_model_names(cfg)
  done = _checkpoint_steps(workdir)
  step = done[-1] if done else 0
  history = []
  old_path = os.path.join(workdir, CONFIG_FILE)
  if step and os.path.isfile(old_path):
    with open(old_path) as f:
      old = json.load(f)
    history = list(old.get("history", []))
    changes = config_changes(old, cfg)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if refused and not allow_config_change:
      shown = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items()]
      more = f"; and {len(shown) - 8} more" if len(shown) > 8 else ""
      raise config_lib.ConfigError(
          f"--workdir={workdir} holds checkpoints of another config ({'; '.join(shown[:8])}"
          f"{more}); use a new --workdir, or pass --allow_config_change to resume with the new "
          f"values (recorded under \"history\" in {CONFIG_FILE})")
    if changes:
      (log.warning if refused else log.info)(
          "resuming step %d with config changes%s: %s", step,
          " (--allow_config_change)" if refused else "", diff)
      history.append({"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      "step": step, "changes": {k: list(v) for k, v in changes.items()},
                      "forced": sorted(refused)})
  complete = bool(step) and step >= steps
  if complete:
    extend = (f"a larger --config.sft.epochs (now {cfg.sft.epochs:g})"
              if cfg.mode == "sft" and cfg.sft.epochs else f"--config.train.steps={step + steps}")
    where = f"step {step} of {steps}" if step == steps else f"step {step}, past its {steps} steps"
    log.info("the run in %s is complete (%s); nothing to train. To train further, run the same "
             "command with %s", workdir, where, extend)
  return Resume(step, complete, history)
