"""Metrics out of a run: WORKDIR/metrics.jsonl, TensorBoard, W&B, a progress line (plots.py
draws the PNGs).

    writer = MetricsWriter(workdir, resume_step=restored_step)   # None: keep what is there
    writer.write(step, {"loss": ..., "reward": ...})             # one JSON line, flushed
    progress = Progress(total_steps); progress.update(step, metrics)

Named metrics_io, not logging: `from grpo_jax import logging` would shadow the
standard library's module in the importing file, as would grpo_jax/ itself on
sys.path (running one of its files as a script).

metrics.jsonl holds one object per logged step, {"step": int, name: float, ...};
NaN and Infinity are written as JSON's common extensions (Python's json reads
them). A run resumed from a checkpoint at step S first drops what it logged
after S (lost with the preemption) from every per-step output: metrics.jsonl,
samples.jsonl and the TensorBoard event files. So each of them equals that of
an uninterrupted run; TensorBoard's own purge marker is not enough, since some
of its readers ignore it. S = 0 (no checkpoint yet) drops everything, step 0's
evaluation included, since the run redoes it.

One name per quantity: metrics.jsonl, TensorBoard tags (written as is, '@'
included, where tensorboardX would rename eval/maj@4 to eval/maj_4), W&B and
the plots use the same keys. DEPRECATED_ALIASES are extra copies under old
names, in metrics.jsonl only.
"""

from __future__ import annotations

import glob
import json
import numbers
import os
import socket
import struct
import sys
import time
from typing import Any, Iterable, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
# Files of one JSON object per logged step, each with its "step"; cut back on resume.
SAMPLES_FILE = "samples.jsonl"  # a group of completions per logged step (train.py)
STEP_FILES = (METRICS_FILE, SAMPLES_FILE)
TB_DIR = "tb"
# Old name -> its current name. Written to metrics.jsonl only (not TensorBoard, W&B, plots)
# so that scripts reading the old name keep working; to be removed in the release after 0.1.
DEPRECATED_ALIASES = {"eval/accuracy": "eval/pass@1"}


def _value(name: str, v: Any) -> float | str:
  """A metric as a JSON value: numbers (Python, numpy, 0-d jax arrays) -> float."""
  if isinstance(v, str):
    return v
  if isinstance(v, numbers.Number) or (hasattr(v, "dtype") and np.ndim(v) == 0):
    return float(v)
  raise TypeError(f"metric {name!r} must be a scalar or a string, got {type(v).__name__} "
                  f"of shape {np.shape(v)}")


def _parse_lines(text: str) -> list[dict]:
  # A kill during a write can leave a final line without its newline: not a record.
  lines = text.split("\n")[:-1]
  return [json.loads(line) for line in lines if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in file order ([] if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return _parse_lines(f.read())


def _atomic_write(path: str, write_fn) -> None:
  """Writes through a temporary file, so readers see the old file or the new one."""
  tmp = f"{path}.tmp{os.getpid()}"
  write_fn(tmp)
  os.replace(tmp, path)


def _write_records(path: str, records: Iterable[dict]) -> None:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


# -- resume: cut every per-step output back to the checkpoint --------------------------
def _read_tfrecords(data: bytes) -> tuple[list[bytes], int]:
  """The records of a TFRecord file (TensorBoard's event files) and the bytes they span; a
  torn tail (a kill during a write) is left out."""
  out, pos = [], 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    if pos + 12 + n + 4 > len(data):
      break
    out.append(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
  return out, pos


def _tfrecord(data: bytes) -> bytes:
  from tensorboardX.record_writer import masked_crc32c

  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _write_tfrecords(path: str, records: Iterable[bytes]) -> None:
  with open(path, "wb") as f:
    f.writelines(_tfrecord(r) for r in records)


class _EventFile:
  """A TensorBoard event file in TB_DIR, written and flushed at each step like metrics.jsonl.

  Not tensorboardX's writers: they queue events for a thread, whose flush() does not wait for
  the queue, so a kill loses steps already in metrics.jsonl; and add_scalar rewrites tags
  ('@' -> '_').
  """

  def __init__(self, tb_dir: str):
    from tensorboardX.proto import event_pb2, summary_pb2

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(tb_dir, exist_ok=True)
    # TensorBoard reads files in name order: the time first; the count keeps two files opened
    # within one second apart.
    n = len(glob.glob(os.path.join(tb_dir, "*tfevents*")))
    self.path = os.path.join(tb_dir, f"events.out.tfevents.{int(time.time()):010d}."
                                     f"{socket.gethostname()}.{os.getpid()}.{n:03d}")
    self._file = open(self.path, "ab")
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._file.write(_tfrecord(event.SerializeToString()))
    self._file.flush()

  def add_scalars(self, step: int, values: dict[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self._file.close()


def _truncate_events(tb_dir: str, keep) -> None:
  """Rewrites each event file with only its scalars of steps `keep` accepts (and its version
  header), without a torn tail; a file left without scalars is removed. Wall times are kept."""
  from tensorboardX.proto.event_pb2 import Event

  for path in sorted(glob.glob(os.path.join(tb_dir, "*tfevents*"))):
    with open(path, "rb") as f:
      data = f.read()
    records, end = _read_tfrecords(data)
    kept, scalars = [], 0
    for record in records:
      event = Event.FromString(record)
      what = event.WhichOneof("what")
      # Other events go too (tensorboardX's purge markers: they would hide the new steps).
      if what == "file_version" or (what == "summary" and keep(event.step)):
        kept.append(record)
        scalars += what == "summary"
    if not scalars:
      os.remove(path)
    elif len(kept) < len(records) or end < len(data):
      _atomic_write(path, lambda p: _write_tfrecords(p, kept))


def truncate_outputs(workdir: str, resume_step: int) -> None:
  """Drops from metrics.jsonl, samples.jsonl and WORKDIR/tb what was logged after step
  `resume_step` (all of it when 0: a run without a checkpoint starts over), and torn lines."""
  def keep(step):
    return 0 < resume_step and step <= resume_step

  for name in STEP_FILES:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        kept = [r for r in _parse_lines(f.read()) if keep(r["step"])]
      _atomic_write(path, lambda p: _write_records(p, kept))
  if os.path.isdir(os.path.join(workdir, TB_DIR)):
    _truncate_events(os.path.join(workdir, TB_DIR), keep)


# -- writing -------------------------------------------------------------------------
class MetricsWriter:
  """Appends metrics to WORKDIR/metrics.jsonl, TensorBoard (WORKDIR/tb) and, when configured,
  Weights & Biases.

  Multi-host: create it on process 0 only.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True,
               wandb_cfg=None, run_config: dict | None = None):
    """Args:
      workdir: run directory (created if missing).
      resume_step: the step of the checkpoint this run resumes from (0: none, a fresh start);
        what was logged after it is dropped from every output (`truncate_outputs`). None keeps
        every complete record.
      tensorboard: also write TensorBoard scalars.
      wandb_cfg: config.logging.wandb; a non-empty .project also logs to W&B.
      run_config: the run's config as a dict, shown by W&B.
    """
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None:
      truncate_outputs(workdir, resume_step)
    elif os.path.exists(self.path):  # rewritten to drop a torn last line
      kept = read_metrics(workdir)
      _atomic_write(self.path, lambda p: _write_records(p, kept))
    self._file = open(self.path, "a")
    self._tb = _EventFile(os.path.join(workdir, TB_DIR)) if tensorboard else None
    self._wandb = None
    if wandb_cfg is not None and wandb_cfg.project:
      self._wandb = _wandb_init(wandb_cfg, workdir, resume_step, run_config)

  def write(self, step: int, metrics: dict[str, Any]) -> dict:
    """Appends {"step": step, **metrics} (flushed) and returns the record as written to
    metrics.jsonl (with the DEPRECATED_ALIASES)."""
    record = {"step": int(step)}
    record.update({k: _value(k, v) for k, v in metrics.items() if k != "step"})
    current = dict(record)  # what TensorBoard and W&B get: no deprecated names
    for alias, name in DEPRECATED_ALIASES.items():
      if name in record and alias not in record:
        record[alias] = record[name]
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      scalars = {k: v for k, v in current.items() if k != "step" and isinstance(v, float)}
      if scalars:
        self._tb.add_scalars(record["step"], scalars)
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in current.items() if k != "step"}, step=record["step"])
    return record

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- Weights & Biases ----------------------------------------------------------------
WANDB_MODES = ("offline", "online", "disabled")


def check_wandb_config(wandb_cfg) -> None:
  """Raises ValueError when W&B logging is asked for (a .project) but cannot run: a bad mode,
  or the wandb package missing. Called by config.validate, before any work."""
  if not wandb_cfg.project:
    return
  if wandb_cfg.mode not in WANDB_MODES:
    raise ValueError(f"config.logging.wandb.mode={wandb_cfg.mode!r}; expected one of "
                     f"{list(WANDB_MODES)}")
  import importlib.util

  if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
    raise ValueError(f"config.logging.wandb.project={wandb_cfg.project!r} asks for Weights & "
                     "Biases logging, but the wandb package is not installed: "
                     "pip install -e '.[wandb]' (or leave config.logging.wandb.project empty)")


def _wandb_init(wandb_cfg, workdir: str, resume_step: int | None, run_config: dict | None):
  """A W&B run logging to WORKDIR/wandb (offline by default: no network, `wandb sync` later).

  W&B cannot take back steps it has logged, so a run resumed from step S > 0 is a new W&B run,
  named NAME-from-S, in the group NAME; the steps after S that the first one logged stay there.
  """
  import wandb

  name = wandb_cfg.name or run_name(workdir)
  resumed = bool(resume_step)
  return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity or None,
                    mode=wandb_cfg.mode, dir=workdir, group=name,
                    name=f"{name}-from-{resume_step}" if resumed else name,
                    config=run_config)


def run_name(workdir: str) -> str:
  """The run's name on plots and in W&B: the workdir's last component."""
  return os.path.basename(os.path.normpath(os.path.abspath(workdir)))


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class Progress:
  """A tqdm bar over the run's steps (stderr) with the last reward (GRPO) or loss (SFT) and the
  last held-out pass@1.

  The bar starts after the run's first step: that step compiles the programs (the loops say so
  in the log), and timing from it would put minutes of compilation into every ETA. Later
  compilations (a new completion bucket) weigh less and less in tqdm's moving average.
  """

  def __init__(self, total_steps: int, initial: int = 0, stream: TextIO | None = None):
    self._total, self._initial = total_steps, initial
    self._stream = sys.stderr if stream is None else stream
    self._eval = {}
    self._bar = None

  def postfix(self, metrics: dict[str, Any]) -> str:
    # Evaluations are rarer than steps: their last values stay on the line until the next.
    self._eval.update({k: float(metrics[k]) for k in ("eval/pass@1", "eval/loss") if k in metrics})
    parts = [f"{k} {float(metrics[k]):.3f}" for k in ("reward", "loss") if k in metrics]
    parts += [f"{k} {v:.3f}" for k, v in self._eval.items()]
    return " | ".join(parts)

  def update(self, step: int, metrics: dict[str, Any]) -> str:
    """Moves the bar to `step` and shows the metrics; returns the postfix shown."""
    import tqdm

    text = self.postfix(metrics)
    if self._bar is None:
      if step <= self._initial:  # the starting evaluation: nothing trained yet
        return text
      self._bar = tqdm.tqdm(total=self._total, initial=step, unit="step", smoothing=0.3,
                            file=self._stream, dynamic_ncols=True, desc="train")
    self._bar.set_postfix_str(text, refresh=False)
    self._bar.update(step - self._bar.n)
    return text

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
