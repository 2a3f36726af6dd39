"""Checkpoints (orbax) of the training state, and the layout of a run's checkpoints.

    ckpt = Checkpointer(f"{workdir}/checkpoints", max_to_keep=3)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract_state=jax.eval_shape(...) with shardings)
    for step in ...:
      ...
      if step % every == 0:
        ckpt.save(step, state, meta={"data_position": ..., "config": ...})
    ckpt.wait(); ckpt.close()

A checkpoint is one directory per step holding two items: `state` (any pytree
of arrays: params, optimizer state, typed PRNG keys, step) and `meta` (a JSON
dict). Saves are asynchronous: `save` returns once the arrays are copied off
the devices and the files are written in a background thread; `wait` blocks
until they are on disk.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and
renames it to `<step>` only when every file is written (on GCS, which has no
atomic rename, a commit_success file marks a finished step instead), so a
process killed mid-save leaves the earlier steps intact: `latest_step` never
sees the unfinished one, and the next Checkpointer on the directory deletes it.
Deleting the steps beyond `max_to_keep` is not atomic: a kill right after a
save can leave the oldest step half deleted but still listed. After a crash,
restore the latest step (the default), which is always complete.

PRNG keys: typed keys (`jax.random.key`, any impl) round-trip as they are,
provided the abstract state says so (`jax.eval_shape` of the state does);
no conversion to raw key data is needed.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Numbered checkpoints of (state pytree, JSON meta) in one directory; keeps the last few."""

  def __init__(self, directory: str, max_to_keep: int = 3, read_only: bool = False):
    """Args:
      directory: where the numbered steps live (created unless read_only).
      max_to_keep: older steps are deleted after each save.
      read_only: for readers of another process's run (e.g. loading a training
        workdir's params): never saves, deletes or cleans up its unfinished saves.
    """
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        # Leftovers of a save that was killed: never restorable, only disk usage.
        cleanup_tmp_directories=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict | None = None, force: bool = False) -> bool:
    """Starts saving `state` and `meta` as `step`; False if that step is already saved.

    Args:
      step: the step number (the directory name).
      state: pytree of jax/numpy arrays and scalars, sharded or not.
      meta: JSON-able dict (data position, config snapshot, ...).
      force: save even where orbax's save policy would skip this step.
    """
    # A run preempted right after a periodic save asks for the same step again.
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta or {})))
    return self._manager.save(step, args=args, force=force)

  def latest_step(self) -> int | None:
    """The newest completely written step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int | None = None, abstract_state: Any = None,
              partial: bool = False) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the latest).

    Args:
      step: which step; None for the latest.
      abstract_state: pytree of jax.ShapeDtypeStruct (or arrays) with the
        target dtypes and shardings: arrays are read straight into those
        shardings, each host reading only its shards. None restores the
        saved structure as it was saved (single host only).
      partial: abstract_state names a subset of the saved tree (e.g. only
        {"params": ...} of a {"params", "opt_state"} state); only that subset
        is read.
    Raises:
      FileNotFoundError: no such step (or no checkpoint at all).
    """
    self.wait()
    steps = self._manager.all_steps()
    step = self._manager.latest_step() if step is None else step
    if step is None or step not in steps:
      which = "" if step is None else f" of step {step}"
      raise FileNotFoundError(f"no checkpoint{which} in {self.directory}; "
                              f"saved steps: {sorted(steps)}")
    if partial:
      state_args = ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
          partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=state_args, meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- a training run's checkpoints ----------------------------------------------------
# WORKDIR/checkpoints/<step>/ holds state = {"params" (with LoRA: the adapters), "opt_state"}
# (with PPO's critic also
# "critic": {"params", "opt_state"}) and meta = {"step", "data_position", "seed"}. The run
# harness (runner.py) writes them; models.load(WORKDIR) reads the params back.
RUN_DIR = "checkpoints"


def run_checkpointer(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> Checkpointer:
  """The Checkpointer of a training run's WORKDIR/checkpoints."""
  return Checkpointer(os.path.join(workdir, RUN_DIR), max_to_keep, read_only=read_only)


def run_state(train_state) -> dict:
  """The saved tree of a run's train state (anything with .params and .opt_state): with PPO's
  critic (`.critic` not None) also {"critic": {"params", "opt_state"}}. With LoRA "params" are
  the adapters alone (`lora.trainable`): the frozen base is config.json's model.name."""
  from grpo_jax import lora  # lazy: keeps this module free of the model code

  state = {"params": lora.trainable(train_state.params), "opt_state": train_state.opt_state}
  critic = getattr(train_state, "critic", None)
  if critic is not None:
    state["critic"] = {"params": critic.params, "opt_state": critic.opt_state}
  return state


def read_run_params(workdir: str, abstract_params):
  """The params of a training workdir's latest checkpoint, read into `abstract_params`'
  shapes, dtypes and shardings (the optimizer state is not read)."""
  with run_checkpointer(workdir, read_only=True) as ckpt:
    state, _ = ckpt.restore(abstract_state={"params": abstract_params}, partial=True)
  return state["params"]
