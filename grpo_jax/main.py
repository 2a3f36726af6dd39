"""Train with GRPO (or, with config.mode = "sft", supervised fine-tuning) from an ml-collections
config.

    python -m grpo_jax.main --config=configs/smollm2_arithmetic.py --workdir=runs/smollm2
    python -m grpo_jax.main --config=configs/tiny_arithmetic.py --workdir=/tmp/tiny \\
        --config.train.steps=20 --config.rl.beta=0
    python -m grpo_jax.main --config=configs/tiny_sft.py --workdir=/tmp/tiny_sft   # SFT
    python -m grpo_jax.main --config=configs/tiny_arithmetic.py --print_config  # every key

Every config key can be set with --config.KEY=VALUE, config.rewards as
--config.rewards=accuracy:1,format:0.5 and the task's settings as
--config.task.kwargs.KEY=VALUE (grpo_jax/config_cli.py; docs/config.md).

Writes WORKDIR/metrics.jsonl, WORKDIR/tb (TensorBoard), WORKDIR/*.png plots,
WORKDIR/samples.jsonl and WORKDIR/checkpoints; the same command on an existing
WORKDIR resumes from its last checkpoint.

Multi-host: run the same command on every host with --coordinator_address,
--num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables; flags win). On a
multi-host TPU slice or in a Slurm job of several tasks none are needed: JAX
detects the cluster.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file (FILE.py or FILE.py:ARG); override any key with "
    "--config.KEY=VALUE; --print_config lists them", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resumes if it has checkpoints)")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "print every config key with its value, default and meaning, then "
    "exit (no --workdir needed, no model loaded)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "folder of JAX's persistent compilation cache, so a resumed or "
    "repeated run does not compile again ('' = off; default $GRPO_JAX_COMPILATION_CACHE, else "
    "~/.cache/grpo_jax/xla)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume a workdir whose checkpoints were trained with another "
    "config (the changes are recorded in WORKDIR/config.json's history)")
flags.mark_flags_as_required(["config"])  # and --workdir, unless --print_config: _parse_flags


def _cluster_detected(env) -> bool:
  """A multi-host TPU slice (several worker hostnames) or a Slurm job of several tasks."""
  tpu_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(tpu_workers) > 1 or int(env.get("SLURM_NTASKS", "1") or 1) > 1


def initialize_distributed():
  """jax.distributed.initialize from the flags, else the JAX_* environment variables."""
  import jax

  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value or (int(os.environ["JAX_NUM_PROCESSES"])
                                 if "JAX_NUM_PROCESSES" in os.environ else None)
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else (
      int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
  if address is None and num is None and pid is None:
    if _cluster_detected(os.environ):  # TPU pod slice or Slurm: JAX finds the peers itself
      jax.distributed.initialize()
    return
  if None in (address, num, pid):
    raise app.UsageError("multi-host needs all of --coordinator_address, --num_processes and "
                         f"--process_id (got {address}, {num}, {pid})")
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def _parse_flags(argv):
  """absl's parse, with one-line errors for config overrides and the overrides it lacks
  (config_cli), before main()."""
  from grpo_jax import config_cli

  return config_cli.parse_flags(argv, _CONFIG, _PRINT_CONFIG, required=[_WORKDIR])


def _error(e: Exception) -> int:
  """A config that cannot run: its message (one line, or a line and a breakdown) and exit 2."""
  print(f"error: {e}", file=sys.stderr)
  return 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr)
  for noisy in ("absl", "tensorboardX", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  initialize_distributed()
  from grpo_jax import compilation, config as config_lib, sft_train, train

  compilation.enable_cache(_COMPILATION_CACHE.value)

  try:
    config_lib.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    return _error(e)
  run = sft_train.train_sft if _CONFIG.value.mode == "sft" else train.train_and_evaluate
  try:
    records = run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except config_lib.ConfigError as e:  # raised at start-up, before any step
    return _error(e)
  # Stopped by a signal after checkpointing: exit as a shell reports a process it killed
  # (130 for SIGINT, 143 for SIGTERM), so schedulers and scripts see the run did not finish.
  return 128 + records.signum if records.signum else 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
