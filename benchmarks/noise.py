"""How noisy a benchmark's numbers are: the spread over repeats and the machine's load.

Every benchmark here times each side several times, interleaved (A, B, A, B, ...: see
`interleaved`), so that a machine that slows down during the run slows both sides alike,
and reports

- each side's repeats as median (min-max, n) (`spread`, `cell`);
- the ratio of the two sides pair by pair (repeat r of A against repeat r of B), again as
  median (min-max) (`ratio_spread`): a wide spread means the ratio is not known;
- the load while it ran (`Load`): the 1/5/15-min load averages before and after, the CPU
  model and core count, and the share of the machine's CPU time that other processes
  took (from /proc/stat, minus this process's and its reaped children's own CPU time).

A benchmark imports it as `noise` (sampling_bench.py sits next to it; grpo_step/bench.py
puts this folder on sys.path). Only the standard library.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, NamedTuple, Sequence

# Above this share of the machine's CPU time taken by other processes, a run is noise.
BUSY_SHARE = 0.10


def spread(xs: Sequence[float]) -> dict:
  """{"n", "min", "median", "max"} of the repeats `xs` (at least one)."""
  if not xs:
    raise ValueError("no repeats to summarise")
  return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
  """num[r] / den[r] for each pair r of interleaved repeats (the two lists as long)."""
  if len(num) != len(den):
    raise ValueError(f"unpaired repeats: {len(num)} vs {len(den)}")
  return [a / b for a, b in zip(num, den)]


def ratio_spread(num: Sequence[float], den: Sequence[float]) -> dict:
  """spread() of the per-pair ratios num[r] / den[r]."""
  return spread(ratios(num, den))


def cell(s: dict, fmt: str = ".1f", suffix: str = "") -> str:
  """'median (min-max)' of a spread() for a table cell, e.g. '1.5x (1.4x-1.6x)'."""
  return f"{s['median']:{fmt}}{suffix} ({s['min']:{fmt}}{suffix}-{s['max']:{fmt}}{suffix})"


def interleaved(calls: dict[str, Callable[[int], object]], repeats: int) -> dict[str, list]:
  """Calls each of `calls` with the repeat index r = 0..repeats-1, in turn within a repeat
  (A(0), B(0), A(1), B(1), ...); -> {name: [its results, one per repeat]}."""
  out = {name: [] for name in calls}
  for r in range(repeats):
    for name, call in calls.items():
      out[name].append(call(r))
  return out


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of fn."""
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


class CpuStat(NamedTuple):
  """The aggregate `cpu` line of /proc/stat, in clock ticks summed over all CPUs."""
  busy: int  # user, nice, system, irq, softirq and steal (another VM's time on our cores)
  total: int  # busy + idle + iowait
  cpus: int  # the cpuN lines


def parse_cpu_stat(text: str) -> CpuStat:
  """CpuStat of the text of /proc/stat (guest time is already inside user and nice)."""
  busy = total = None
  cpus = 0
  for line in text.splitlines():
    fields = line.split()
    if not fields:
      continue
    if fields[0] == "cpu":
      v = [int(x) for x in fields[1:9]] + [0] * (8 - len(fields[1:9]))
      user, nice, system, idle, iowait, irq, softirq, steal = v
      busy = user + nice + system + irq + softirq + steal
      total = busy + idle + iowait
    elif fields[0].startswith("cpu") and fields[0][3:].isdigit():
      cpus += 1
  if busy is None:
    raise ValueError("no aggregate 'cpu' line in /proc/stat text")
  return CpuStat(busy, total, cpus)


def other_cpu_share(before: CpuStat, after: CpuStat, own_cpu_s: float,
                    ticks_per_s: float) -> float:
  """The share of all CPUs' time between two /proc/stat readings that was busy but not
  ours: (busy ticks - our own CPU seconds in ticks) / all ticks, in [0, 1]."""
  total = after.total - before.total
  if total <= 0:
    return 0.0
  other = (after.busy - before.busy) - own_cpu_s * ticks_per_s
  return min(1.0, max(0.0, other / total))


def cpu_model(cpuinfo: str | None = None) -> str:
  """The CPU's model name from the text of /proc/cpuinfo (read here if not given)."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return platform.processor() or "unknown CPU"
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("model name", "Model", "cpu model"):
      return value.strip()
  return platform.processor() or "unknown CPU"


def _read_cpu_stat() -> CpuStat | None:
  try:
    with open("/proc/stat") as f:
      return parse_cpu_stat(f.read())
  except (OSError, ValueError):
    return None


def _own_cpu_s() -> float:
  """CPU seconds of this process (all its threads) and of its children it has waited for."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class Load:
  """The machine's load during a `with` block (or between start() and stop()).

  result(): {"cpu", "cores", "loadavg_before", "loadavg_after" (1, 5, 15 min), "wall_s",
  "own_cpu_s", "other_cpu_share"}; other_cpu_share is None where /proc/stat is missing.
  Children count as "own" only once waited for: stop() after they have exited.
  """

  def __init__(self):
    self._stat = self._after_stat = None
    self.loadavg_before = self.loadavg_after = None

  def start(self) -> "Load":
    self.loadavg_before = os.getloadavg()
    self._stat, self._own, self._t = _read_cpu_stat(), _own_cpu_s(), time.perf_counter()
    return self

  def stop(self) -> dict:
    self._wall = time.perf_counter() - self._t
    self._own = _own_cpu_s() - self._own
    self._after_stat = _read_cpu_stat()
    self.loadavg_after = os.getloadavg()
    return self.result()

  def __enter__(self) -> "Load":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def result(self) -> dict:
    share = None
    if self._stat is not None and self._after_stat is not None:
      share = other_cpu_share(self._stat, self._after_stat, self._own,
                              os.sysconf("SC_CLK_TCK"))
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "loadavg_before": list(self.loadavg_before),
            "loadavg_after": list(self.loadavg_after),
            "wall_s": self._wall, "own_cpu_s": self._own, "other_cpu_share": share}


def describe(load: dict) -> str:
  """One line about a Load result, ending in a warning when other processes took more than
  BUSY_SHARE of the machine."""
  share = load["other_cpu_share"]
  text = (f"{load['cpu']}, {load['cores']} cores; load average (1 min) "
          f"{load['loadavg_before'][0]:.1f} before, {load['loadavg_after'][0]:.1f} after; "
          f"other processes took "
          + ("? (no /proc/stat)" if share is None else f"{share:.0%}")
          + f" of the CPU time over {load['wall_s']:.0f} s")
  if share is not None and share > BUSY_SHARE:
    text += f" -- over {BUSY_SHARE:.0%}: a loaded machine, these timings are noise"
  return text
