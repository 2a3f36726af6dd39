"""Metrics out of a run: WORKDIR/metrics.jsonl, TensorBoard, PNG plots, a progress line.

    writer = MetricsWriter(workdir, resume_step=restored_step)   # None: fresh run
    writer.write(step, {"loss": ..., "reward": ...})             # one JSON line, flushed
    write_plots(workdir, read_metrics(workdir))                  # reward.png, kl.png, ...
    progress = Progress(total_steps); progress.update(step, metrics)

Named metrics_io, not logging: `from grpo_jax import logging` would shadow the
standard library's module in the importing file, as would grpo_jax/ itself on
sys.path (running one of its files as a script).

metrics.jsonl holds one object per logged step, {"step": int, name: float, ...};
NaN and Infinity are written as JSON's common extensions (Python's json reads
them). A run resumed from a checkpoint at step S first drops the lines after S
(logged, then lost with the preemption), so the file of a resumed run equals
that of an uninterrupted one.
"""

from __future__ import annotations

import fnmatch
import json
import numbers
import os
import sys
from typing import Any, Iterable, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"

# file name -> (title, y label, key patterns)
PLOTS = {
    "reward.png": ("Reward", "mean reward", ("reward", "rewards/*/mean")),
    "accuracy.png": ("Evaluation", "accuracy", ("eval/accuracy", "eval/maj@*")),
    "length.png": ("Completion length", "tokens", ("completions/mean_length",)),
    "kl.png": ("KL to the reference policy", "kl", ("kl",)),
}


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


class MetricsWriter:
  """Appends metrics to WORKDIR/metrics.jsonl and to TensorBoard (WORKDIR/tb).

  Multi-host: create it on process 0 only.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
    """Args:
      workdir: run directory (created if missing).
      resume_step: the step of the checkpoint this run resumes from; records
        with a larger step are dropped. None keeps every complete record.
      tensorboard: also write TensorBoard scalars.
    """
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(self.path):  # rewritten also to drop a torn last line
      kept = [r for r in read_metrics(workdir) if resume_step is None or r["step"] <= resume_step]
      _atomic_write(self.path, lambda p: _write_records(p, kept))
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      # purge_step hides the lost steps' events that the killed run wrote.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                               purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> dict:
    """Appends {"step": step, **metrics} (flushed) and returns the record."""
    record = {"step": int(step)}
    record.update({k: _value(k, v) for k, v in metrics.items() if k != "step"})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, global_step=record["step"])
      self._tb.flush()
    return record

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(records: list[dict], patterns: Iterable[str]) -> dict[str, tuple[list, list]]:
  """{key: (steps, values)} for every key matching a pattern, in pattern order."""
  keys = list(dict.fromkeys(k for r in records for k in r))
  out = {}
  for pattern in patterns:
    for key in sorted(fnmatch.filter(keys, pattern)):
      pts = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
      if pts:
        out[key] = tuple(map(list, zip(*pts)))
  return out


def write_plots(workdir: str, records: list[dict], *, size=(6.4, 4.0), dpi: int = 100) -> list[str]:
  """Writes reward.png, accuracy.png, length.png, kl.png (those with data) in WORKDIR.

  Returns the paths written. Each PNG is `size` inches at `dpi`
  (640 x 400 pixels by default); ~0.1 s a plot.
  """
  from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

  written = []
  for filename, (title, ylabel, patterns) in PLOTS.items():
    series = _series(records, patterns)
    if not series:
      continue
    fig = Figure(figsize=size, dpi=dpi)
    ax = fig.add_subplot()
    for key, (steps, values) in series.items():
      ax.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend(fontsize="small")
    path = os.path.join(workdir, filename)
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    written.append(path)
  return written


class Progress:
  """A tqdm bar over the run's steps (stderr) with the last reward / loss and eval accuracy.

  tqdm's rate is a moving average, so the first step's compilation soon stops weighing on the
  ETA; the loops say in the log when a step compiles.
  """

  def __init__(self, total_steps: int, initial: int = 0, stream: TextIO | None = None):
    import tqdm

    self._eval_accuracy = None
    self._bar = tqdm.tqdm(total=total_steps, initial=initial, unit="step", smoothing=0.3,
                          file=sys.stderr if stream is None else stream, dynamic_ncols=True,
                          desc="train")

  def postfix(self, metrics: dict[str, Any]) -> str:
    if "eval/accuracy" in metrics:
      self._eval_accuracy = float(metrics["eval/accuracy"])
    parts = [f"{k} {float(metrics[k]):.3f}" for k in ("reward", "loss") if k in metrics]
    if self._eval_accuracy is not None:
      parts.append(f"eval acc {self._eval_accuracy:.3f}")
    return " | ".join(parts)

  def update(self, step: int, metrics: dict[str, Any]) -> str:
    """Moves the bar to `step` and shows the metrics; returns the postfix shown."""
    text = self.postfix(metrics)
    self._bar.set_postfix_str(text, refresh=False)
    self._bar.update(step - self._bar.n)
    return text

  def close(self) -> None:
    self._bar.close()
