"""PNG plots of a run's metrics: reward.png, accuracy.png, loss.png, length.png, kl.png.

    plots.write_plots(workdir, metrics_io.read_metrics(workdir))

Each plot is titled with the run's name (the workdir's) and its last step; the
headline series (the total reward) is drawn on top of its components.
"""

from __future__ import annotations

import fnmatch
import math
import os
from typing import Iterable, NamedTuple

import numpy as np

from grpo_jax.metrics_io import _atomic_write, _is_number, run_name


class Plot(NamedTuple):
  title: str
  ylabel: str
  patterns: tuple[str, ...]  # keys, fnmatch patterns; the first one's line is drawn on top
  ylim: tuple[float, float] | None = None  # fixed y range (fractions)
  exp_axis: str | None = None  # a key logged as exp(y) (perplexity): if present, a right axis


PLOTS = {
    "reward.png": Plot("Reward", "mean reward", ("reward", "rewards/*/mean")),
    "accuracy.png": Plot("Held-out evaluation", "fraction of problems",
                         ("eval/pass@1", "eval/maj@*", "eval/pass@*"), ylim=(0.0, 1.0)),
    # GRPO: the policy loss. SFT: the training and held-out NLL, perplexity on the right.
    "loss.png": Plot("Loss", "loss", ("loss", "eval/loss"), exp_axis="perplexity"),
    "length.png": Plot("Completion length", "tokens", ("completions/mean_length",)),
    "kl.png": Plot("KL to the reference policy", "kl", ("kl",)),
}


def _series(records: list[dict], patterns: Iterable[str]) -> dict[str, tuple[list, list]]:
  """{key: (steps, values)} for every key matching a pattern, in pattern order."""
  keys = list(dict.fromkeys(k for r in records for k in r))
  out = {}
  for pattern in patterns:
    for key in sorted(fnmatch.filter(keys, pattern)):
      pts = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
      if pts and key not in out:
        out[key] = tuple(map(list, zip(*pts)))
  return out


_LOW, _HIGH = "_ci95_low", "_ci95_high"  # an interval's bounds, logged beside its metric


def _bands(series: dict) -> dict[str, tuple[list, list, list]]:
  """Pops each metric's 95% interval bounds (KEY_ci95_low, KEY_ci95_high) out of `series`:
  {KEY: (steps, lows, highs)}, at the steps that logged both bounds."""
  bands = {}
  for key in [k for k in series if k.endswith(_LOW)]:
    base = key[:-len(_LOW)]
    if base + _HIGH in series:
      (lo_steps, lows), (hi_steps, highs) = series.pop(key), series.pop(base + _HIGH)
      high_at = dict(zip(hi_steps, highs))
      pts = [(s, lo, high_at[s]) for s, lo in zip(lo_steps, lows) if s in high_at]
      bands[base] = tuple(map(list, zip(*pts)))
  return bands


def _draw(ax, plot: Plot, series: dict) -> None:
  """The series as lines; a metric with its 95% interval logged gets the interval as a shaded
  band in its line's colour, and "(95% interval shaded)" in the legend."""
  series = dict(series)
  bands = _bands(series)
  # Identical series (maj@1 = pass@1 when k = 1) are one line with both names.
  groups = []  # [keys, (steps, values)]
  for key, data in series.items():
    same = next((g for g in groups if g[1] == data), None)
    if same is None:
      groups.append([[key], data])
    else:
      same[0].append(key)
  main = groups[0][0][0] == plot.patterns[0]  # the plot's headline (the total reward) is logged
  handles, labels = [], []
  for i, (keys, (steps, values)) in enumerate(groups):
    top = main and i == 0
    color = "black" if top and len(groups) > 1 else f"C{i}"
    # The headline is drawn last (on top of its components: rewards/tag_count/mean can equal
    # it), thicker, and black when it has company; first in the legend.
    handles.append(ax.plot(steps, values, marker="." if len(steps) < 50 else None, color=color,
                           linewidth=2.5 if top else 1.5, zorder=3 if top else 2,
                           clip_on=plot.ylim is None)[0])
    labels.append(" = ".join(keys))
    band = next((bands[k] for k in keys if k in bands), None)
    if band is not None:
      ax.fill_between(*band, color=color, alpha=0.15, linewidth=0, zorder=1)
      labels[-1] += " (95% interval shaded)"
  if len(series) > 1 or bands:
    ax.legend(handles, labels, fontsize="small")


def _exp_axis(ax, label: str) -> None:
  """A right axis reading the left one's y as exp(y), ticked at round values."""
  right = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.clip(p, 1e-9, None))))
  lo, hi = ax.get_ylim()
  round_values = [m * 10.0**e for e in range(-1, 6) for m in (1, 1.5, 2, 3, 5)]
  ticks = [v for v in round_values if lo <= math.log(v) <= hi]
  right.set_yticks(ticks, labels=[f"{v:g}" for v in ticks])
  right.set_ylabel(label)


def figure(name: str, plot: Plot, records: list[dict], *, size=(6.4, 4.0), dpi: int = 100):
  """The matplotlib Figure of `plot` over `records`, titled with the run's name and its last
  step; None when no record has its keys."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

  series = _series(records, plot.patterns)
  if not series:
    return None
  fig = Figure(figsize=size, dpi=dpi)
  ax = fig.add_subplot()
  _draw(ax, plot, series)
  last = max(s for steps, _ in series.values() for s in steps)
  ax.set_title(plot.title, loc="left")
  ax.set_title(f"{name}, step {last}", loc="right", fontsize="small", color="0.3")
  ax.set(xlabel="step", ylabel=plot.ylabel)
  if plot.ylim is not None:  # a fraction: 0 and 1 in view, a flat 0 not blown up to +-0.04
    ax.set_ylim(*plot.ylim)
  if plot.exp_axis and any(plot.exp_axis in r for r in records):
    _exp_axis(ax, plot.exp_axis)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def write_plots(workdir: str, records: list[dict], *, size=(6.4, 4.0), dpi: int = 100) -> list[str]:
  """Writes reward.png, accuracy.png, loss.png, length.png, kl.png (those with data) in
  WORKDIR (`figure` of each PLOTS entry, named after the workdir).

  Returns the paths written. Each PNG is `size` inches at `dpi`
  (640 x 400 pixels by default); ~0.1 s a plot.
  """
  written = []
  for filename, plot in PLOTS.items():
    fig = figure(run_name(workdir), plot, records, size=size, dpi=dpi)
    if fig is None:
      continue
    path = os.path.join(workdir, filename)
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    written.append(path)
  return written
