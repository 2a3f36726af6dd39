"""benchmarks/noise.py: the spread of repeats, paired ratios and the machine-load readings."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("noise", os.path.join(ROOT, "benchmarks", "noise.py"))
noise = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(noise)

STAT = """cpu  {user} 10 {system} {idle} {iowait} 3 4 {steal} 50 0
cpu0 1 2 3 4 5 6 7 8 0 0
cpu1 1 2 3 4 5 6 7 8 0 0
intr 123 4 5
ctxt 999
btime 1700000000
"""


def stat(user, system, idle, iowait=0, steal=0):
  return STAT.format(user=user, system=system, idle=idle, iowait=iowait, steal=steal)


def test_spread_of_odd_and_even_lists():
  assert noise.spread([3.0, 1.0, 2.0]) == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0}
  assert noise.spread([19.1, 15.8, 28.3, 14.0]) == {
      "n": 4, "min": 14.0, "median": pytest.approx((15.8 + 19.1) / 2), "max": 28.3}
  with pytest.raises(ValueError):
    noise.spread([])


def test_ratio_spread_pairs_repeat_r_with_repeat_r():
  # The two runs: the peer slowed faster than we did, so the ratio moved.
  trl, ours = [19.2, 28.3, 21.0], [15.8, 19.1, 16.0]
  assert noise.ratios(trl, ours) == pytest.approx([19.2 / 15.8, 28.3 / 19.1, 21.0 / 16.0])
  s = noise.ratio_spread(trl, ours)
  assert s["n"] == 3
  assert s["min"] == pytest.approx(19.2 / 15.8)
  assert s["median"] == pytest.approx(21.0 / 16.0)
  assert s["max"] == pytest.approx(28.3 / 19.1)
  # Per pair, not a ratio of medians: sorted lists would pair differently.
  assert noise.ratio_spread([2.0, 4.0], [1.0, 4.0])["min"] == 1.0
  with pytest.raises(ValueError):
    noise.ratios([1.0, 2.0], [1.0])


def test_cell_formats_median_then_range():
  s = noise.spread([1.2, 1.5, 1.49])
  assert noise.cell(s, ".2f", "x") == "1.49x (1.20x-1.50x)"
  assert noise.cell(noise.spread([0.28, 0.34]), ".0%") == "31% (28%-34%)"


def test_interleaved_alternates_the_calls_within_each_repeat():
  order = []
  out = noise.interleaved({"a": lambda r: order.append(("a", r)) or 10 + r,
                           "b": lambda r: order.append(("b", r)) or 20 + r}, 3)
  assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
  assert out == {"a": [10, 11, 12], "b": [20, 21, 22]}


def test_parse_cpu_stat_counts_busy_idle_and_cpus():
  s = noise.parse_cpu_stat(stat(user=100, system=20, idle=500, iowait=7, steal=5))
  # busy: user + nice + system + irq + softirq + steal; guest (50) is inside user already
  assert s == noise.CpuStat(busy=100 + 10 + 20 + 3 + 4 + 5, total=142 + 500 + 7, cpus=2)
  with pytest.raises(ValueError):
    noise.parse_cpu_stat("intr 1 2\n")


def test_other_cpu_share_subtracts_our_own_time():
  before = noise.parse_cpu_stat(stat(user=1000, system=100, idle=5000))
  # 400 ticks pass on the machine (2 CPUs x 2 s at 100 ticks/s): 300 busy, 100 idle
  after = noise.parse_cpu_stat(stat(user=1250, system=150, idle=5100))
  assert after.total - before.total == 400
  # we used 2.0 CPU-s = 200 ticks of the 300 busy: others took 100 of 400
  assert noise.other_cpu_share(before, after, own_cpu_s=2.0, ticks_per_s=100) == 0.25
  assert noise.other_cpu_share(before, after, own_cpu_s=3.0, ticks_per_s=100) == 0.0
  # tick rounding can make ours exceed the busy ticks: clamped at 0, never negative
  assert noise.other_cpu_share(before, after, own_cpu_s=3.5, ticks_per_s=100) == 0.0
  assert noise.other_cpu_share(before, before, own_cpu_s=0.0, ticks_per_s=100) == 0.0


def test_cpu_model_from_cpuinfo_text():
  text = ("processor\t: 0\nvendor_id\t: GenuineIntel\n"
          "model name\t: Intel(R) Xeon(R) Platinum 8480C\nflags\t\t: avx512f\n")
  assert noise.cpu_model(text) == "Intel(R) Xeon(R) Platinum 8480C"


def test_load_reads_this_machine_and_describe_flags_a_busy_one():
  with noise.Load() as load:
    sum(i * i for i in range(20000))
  r = load.result()
  assert r["cores"] == os.cpu_count() and len(r["loadavg_before"]) == 3
  assert r["wall_s"] > 0 and r["own_cpu_s"] >= 0
  assert r["other_cpu_share"] is None or 0.0 <= r["other_cpu_share"] <= 1.0
  quiet = dict(r, other_cpu_share=0.02, wall_s=60.0)
  busy = dict(r, other_cpu_share=0.35, wall_s=60.0)
  assert "noise" not in noise.describe(quiet) and "2%" in noise.describe(quiet)
  assert "35%" in noise.describe(busy) and "noise" in noise.describe(busy)
