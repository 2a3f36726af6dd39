"""metrics_io tests: jsonl round trip and resume, TensorBoard events, W&B, PNG plots, progress."""

import glob
import importlib.util
import io
import json
import math
import os
import struct
import sys
import time
import types

import jax.numpy as jnp
import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from grpo_jax import config as config_lib, metrics_io, plots


def _records(steps):
  return [{"loss": 0.5 / s, "reward": 0.1 * s, "rewards/accuracy/mean": 0.05 * s,
           "rewards/format/mean": 0.2, "kl": 0.01 * s, "completions/mean_length": 30.0 + s}
          for s in steps]


def _tb_events(workdir):
  """[(tag, step, value)] of every event file in name order, read with the TFRecord framing."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def _tb_scalars(workdir):
  """{(tag, step): value} from every event file."""
  return {(tag, step): v for tag, step, v in _tb_events(workdir)}


def test_jsonl_round_trip_with_numpy_jax_and_nan(tmp_path):
  with metrics_io.MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(1, {"loss": jnp.float32(0.25), "reward": np.float64(0.5), "kl": float("nan"),
                "grad_norm": jnp.asarray(2.0), "learning_rate": 3e-6, "eval/maj@8": 1})
    # Flushed per write: a reader sees it before close.
    assert len(metrics_io.read_metrics(str(tmp_path))) == 1
    w.write(2, {"loss": 0.125, "note": "text"})
  got = metrics_io.read_metrics(str(tmp_path))
  assert [r["step"] for r in got] == [1, 2]
  assert got[0]["loss"] == 0.25 and got[0]["reward"] == 0.5 and math.isnan(got[0]["kl"])
  assert got[0]["grad_norm"] == 2.0 and got[0]["eval/maj@8"] == 1.0
  assert isinstance(got[0]["eval/maj@8"], float) and got[1] == {"step": 2, "loss": 0.125, "note": "text"}
  with pytest.raises(TypeError, match="'v'"):
    metrics_io.MetricsWriter(str(tmp_path), tensorboard=False).write(3, {"v": np.zeros(2)})


def test_resume_drops_lost_steps_so_file_equals_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  with metrics_io.MetricsWriter(str(straight), tensorboard=False) as w:
    for s, r in zip(range(1, 9), _records(range(1, 9))):
      w.write(s, r)
  # First run: logs steps 1..6, checkpointed at 4, killed mid-write of step 7.
  with metrics_io.MetricsWriter(str(resumed), tensorboard=False) as w:
    for s, r in zip(range(1, 7), _records(range(1, 7))):
      w.write(s, r)
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 0.0')
  assert [r["step"] for r in metrics_io.read_metrics(str(resumed))] == list(range(1, 7))
  with metrics_io.MetricsWriter(str(resumed), resume_step=4, tensorboard=False) as w:
    assert [r["step"] for r in metrics_io.read_metrics(str(resumed))] == [1, 2, 3, 4]
    for s, r in zip(range(5, 9), _records(range(5, 9))):
      w.write(s, r)
  assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


def test_reopening_without_resume_step_keeps_records_and_drops_a_torn_line(tmp_path):
  with metrics_io.MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(1, {"loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "lo')
  with metrics_io.MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(2, {"loss": 0.5})
  assert metrics_io.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0},
                                                    {"step": 2, "loss": 0.5}]


def test_tensorboard_event_file_has_the_scalars(tmp_path):
  with metrics_io.MetricsWriter(str(tmp_path)) as w:
    w.write(3, {"reward": 0.75, "kl": 0.125, "note": "skipped"})
    w.write(4, {"reward": 0.5})
  scalars = _tb_scalars(str(tmp_path))
  assert scalars == {("reward", 3): 0.75, ("kl", 3): 0.125, ("reward", 4): 0.5}


def test_plots_are_valid_pngs_of_the_requested_size(tmp_path):
  records = [dict(step=s, **r) for s, r in zip(range(1, 21), _records(range(1, 21)))]
  records[9].update({"eval/pass@1": 0.3, "eval/maj@8": 0.4})
  records[19].update({"eval/pass@1": 0.5, "eval/maj@8": 0.6})
  written = plots.write_plots(str(tmp_path), records, size=(5, 3), dpi=80)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["accuracy.png", "kl.png", "length.png", "loss.png", "reward.png"]
  for path in written:
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (240, 400)
    assert image[..., :3].std() > 0.01  # something is drawn on the white canvas
  assert not glob.glob(str(tmp_path / "*.tmp*"))


def test_plots_skip_absent_keys(tmp_path):
  written = plots.write_plots(str(tmp_path), [{"step": 1, "grad_norm": 1.0, "kl": 0.1},
                                                   {"step": 2, "grad_norm": 0.5, "kl": 0.2}])
  assert [os.path.basename(p) for p in written] == ["kl.png"]
  assert sorted(os.listdir(tmp_path)) == ["kl.png"]


def test_series_matches_reward_components_in_order():
  records = [dict(step=s, **r) for s, r in zip([1, 2], _records([1, 2]))]
  series = plots._series(records, plots.PLOTS["reward.png"].patterns)
  assert list(series) == ["reward", "rewards/accuracy/mean", "rewards/format/mean"]
  assert series["reward"] == ([1, 2], [0.1, 0.2])


def test_progress_bar_shows_steps_reward_and_the_last_eval_pass_at_1():
  stream = io.StringIO()
  bar = metrics_io.Progress(100, initial=10, stream=stream)
  assert bar.update(20, {"reward": 0.5, "eval/pass@1": 0.4}) == "reward 0.500 | eval/pass@1 0.400"
  # The last evaluation stays until the next one.
  assert bar.update(30, {"reward": 0.75}) == "reward 0.750 | eval/pass@1 0.400"
  bar.close()
  out = stream.getvalue()
  assert "30/100" in out and "reward 0.750 | eval/pass@1 0.400" in out


def test_progress_bar_clock_starts_after_the_first_compiling_step(monkeypatch):
  """The ETA counts training steps only: the first step (compilation) is not timed."""
  import tqdm.std

  now = [0.0]
  monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the clock a bar reads
  stream = io.StringIO()
  bar = metrics_io.Progress(11, stream=stream)
  bar.update(0, {"eval/pass@1": 0.1})  # the starting evaluation: no bar yet
  now[0] = 60.0  # step 1 compiled for a minute
  bar.update(1, {"reward": 0.1})
  for step in range(2, 7):  # then 2 s a step
    now[0] += 2.0
    bar.update(step, {"reward": 0.2})
  assert bar._bar.format_dict["elapsed"] == 10.0
  assert bar._bar.format_dict["rate"] == pytest.approx(0.5)  # steps/s: 5 steps in 10 s
  bar.close()


def test_progress_bar_of_sft_shows_the_loss_and_the_held_out_loss():
  bar = metrics_io.Progress(10, stream=io.StringIO())
  assert bar.update(0, {"eval/pass@1": 0.0, "eval/loss": 4.5}) == (
      "eval/pass@1 0.000 | eval/loss 4.500")
  assert bar.update(1, {"loss": 4.25, "perplexity": 70.1}) == (
      "loss 4.250 | eval/pass@1 0.000 | eval/loss 4.500")
  bar.close()


# -- resume: every per-step output equals the checkpoint's history ----------------------
def _killed_run(workdir, steps):
  """Logs `steps` (and a samples.jsonl line each) and is then killed: nothing is closed (each
  write is flushed)."""
  w = metrics_io.MetricsWriter(str(workdir))
  for s in steps:
    w.write(s, {"loss": float(s)} if s else {"eval/maj@2": 0.5})
    with open(workdir / "samples.jsonl", "a") as f:
      f.write(json.dumps({"step": s, "prompt": "p", "completions": []}) + "\n")


def _accumulated(workdir):
  """{tag: [(step, value)]} as TensorBoard's Python reader (--load_fast=false) shows them; None
  without the tensorboard package (only tensorboardX is a dependency)."""
  try:
    from tensorboard.backend.event_processing import plugin_event_accumulator
  except ImportError:
    return None
  acc = plugin_event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  acc.Reload()
  return {tag: [(e.step, round(float(e.tensor_proto.float_val[0]), 6)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()["tensors"]}


def test_resume_cuts_tensorboard_and_samples_back_to_the_checkpoint(tmp_path):
  _killed_run(tmp_path, range(0, 6))  # steps 0..5 logged, the checkpoint is step 3
  with metrics_io.MetricsWriter(str(tmp_path), resume_step=3) as w:
    for s in (4, 5, 6):
      w.write(s, {"loss": 10.0 + s})
  # Each step once, the resumed run's values after step 3: no lost step 4 or 5 next to the new.
  events = sorted(_tb_events(str(tmp_path)))
  assert events == sorted([("eval/maj@2", 0, 0.5), ("loss", 1, 1.0), ("loss", 2, 2.0),
                           ("loss", 3, 3.0), ("loss", 4, 14.0), ("loss", 5, 15.0),
                           ("loss", 6, 16.0)])
  assert [r["step"] for r in metrics_io.read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 5, 6]
  samples = [json.loads(line)["step"] for line in open(tmp_path / "samples.jsonl")]
  assert samples == [0, 1, 2, 3]  # the loop appends 4.. as it logs them again
  accumulated = _accumulated(str(tmp_path))
  if accumulated is not None:
    assert accumulated == {"eval/maj@2": [(0, 0.5)],
                           "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0),
                                    (6, 16.0)]}


def test_restart_without_a_checkpoint_redoes_step_0_once(tmp_path):
  _killed_run(tmp_path, range(0, 3))  # killed before the first checkpoint
  with metrics_io.MetricsWriter(str(tmp_path), resume_step=0) as w:
    w.write(0, {"eval/maj@2": 0.75})
    w.write(1, {"loss": 11.0})
  assert sorted(_tb_events(str(tmp_path))) == [("eval/maj@2", 0, 0.75), ("loss", 1, 11.0)]
  assert metrics_io.read_metrics(str(tmp_path)) == [{"step": 0, "eval/maj@2": 0.75},
                                                    {"step": 1, "loss": 11.0}]
  assert (tmp_path / "samples.jsonl").read_text() == ""


def test_a_torn_event_record_is_dropped_on_resume(tmp_path):
  _killed_run(tmp_path, range(1, 4))
  (path,) = glob.glob(str(tmp_path / "tb" / "*tfevents*"))
  with open(path, "ab") as f:
    f.write(struct.pack("<Q", 100) + b"\0" * 20)  # a record cut short by the kill
  with metrics_io.MetricsWriter(str(tmp_path), resume_step=2) as w:
    w.write(3, {"loss": 13.0})
  assert sorted(_tb_events(str(tmp_path))) == [("loss", 1, 1.0), ("loss", 2, 2.0),
                                               ("loss", 3, 13.0)]


# -- one name per quantity -----------------------------------------------------------
def test_eval_names_keep_their_at_sign_and_the_old_name_is_only_in_the_jsonl(tmp_path):
  with metrics_io.MetricsWriter(str(tmp_path)) as w:
    written = w.write(5, {"eval/pass@1": 0.25, "eval/maj@4": 0.5, "eval/pass@4": 0.75})
  assert written["eval/accuracy"] == 0.25  # the deprecated alias, for old readers
  assert metrics_io.read_metrics(str(tmp_path)) == [written]
  # tensorboardX's add_scalar would have written eval/maj_4.
  assert _tb_scalars(str(tmp_path)) == {("eval/pass@1", 5): 0.25, ("eval/maj@4", 5): 0.5,
                                        ("eval/pass@4", 5): 0.75}


# -- plots ---------------------------------------------------------------------------
def _lines(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_reward_plot_draws_the_total_on_top_of_an_equal_component_and_names_the_run():
  records = [{"step": s, "reward": 0.1 * s, "rewards/accuracy/mean": 0.0,
              "rewards/tag_count/mean": 0.1 * s} for s in range(1, 8)]
  fig = plots.figure("my_run", plots.PLOTS["reward.png"], records)
  ax = fig.axes[0]
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  # The component equal to the total shares its line (it would hide it otherwise).
  assert legend == ["reward = rewards/tag_count/mean", "rewards/accuracy/mean"]
  total, other = ax.get_lines()
  assert total.get_zorder() > other.get_zorder() and total.get_linewidth() > other.get_linewidth()
  assert ax.get_title(loc="right") == "my_run, step 7"


def test_accuracy_plot_spans_0_to_1_even_when_accuracy_is_0():
  records = [{"step": s, "eval/pass@1": 0.0, "eval/maj@1": 0.0, "eval/accuracy": 0.0}
             for s in (0, 10, 20)]
  ax = plots.figure("r", plots.PLOTS["accuracy.png"], records).axes[0]
  assert ax.get_ylim() == (0.0, 1.0)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["eval/pass@1 = eval/maj@1"]


def test_accuracy_plot_shades_each_logged_interval_instead_of_drawing_its_bounds():
  records = [{"step": 0, "eval/pass@1": 0.2, "eval/pass@1_ci95_low": 0.1,
              "eval/pass@1_ci95_high": 0.3, "eval/maj@4": 0.25, "eval/pass@4": 0.5},
             {"step": 5, "reward": 1.0},  # a training step: no evaluation
             {"step": 10, "eval/pass@1": 0.6, "eval/pass@1_ci95_low": 0.4,
              "eval/pass@1_ci95_high": 0.8, "eval/maj@4": 0.65, "eval/pass@4": 0.9}]
  ax = plots.figure("r", plots.PLOTS["accuracy.png"], records).axes[0]
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == ["eval/pass@1 (95% interval shaded)", "eval/maj@4", "eval/pass@4"]
  assert len(ax.get_lines()) == 3  # the bounds are not lines
  (band,) = ax.collections
  xs, ys = band.get_paths()[0].vertices.T
  # The band spans the logged bounds at the evaluated steps, in pass@1's line colour.
  assert set(np.round(ys, 6)) == {0.1, 0.3, 0.4, 0.8} and set(xs) == {0.0, 10.0}
  assert tuple(band.get_facecolor()[0][:3]) == matplotlib.colors.to_rgb(ax.get_lines()[0].get_color())


def test_sft_loss_plot_has_the_held_out_loss_and_a_perplexity_axis(tmp_path):
  workdir = tmp_path / "sft_run"
  workdir.mkdir()
  records = [{"step": s, "loss": 4.0 / s, "perplexity": math.exp(4.0 / s)} for s in range(1, 9)]
  records[-1]["eval/loss"] = 1.0
  assert "loss.png" in [os.path.basename(p) for p in plots.write_plots(str(workdir), records)]
  ax = plots.figure("sft_run", plots.PLOTS["loss.png"], records).axes[0]
  assert ax.get_title(loc="right") == "sft_run, step 8"
  right = ax.child_axes[0]  # perplexity = exp(loss), ticked at round values
  assert right.get_ylabel() == "perplexity"
  assert {"2", "5", "50"} <= {t.get_text() for t in right.get_yticklabels()}
  # A GRPO loss is not a log-likelihood: no perplexity axis.
  grpo = plots.figure("g", plots.PLOTS["loss.png"], [{"step": 1, "loss": -0.1}])
  assert not grpo.axes[0].child_axes


# -- Weights & Biases ----------------------------------------------------------------
def _wandb_cfg(**kw):
  cfg = config_lib.defaults()
  cfg.logging.wandb.update(dict({"project": "p"}, **kw))
  return cfg


class _FakeWandb(types.ModuleType):
  """Records wandb.init's arguments and each log call."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []

  def init(self, **kw):
    self.calls.append(("init", kw))
    return types.SimpleNamespace(log=lambda data, step: self.calls.append(("log", step, data)),
                                 finish=lambda: self.calls.append(("finish",)))


def test_wandb_gets_the_jsonl_keys_named_after_the_workdir(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = _wandb_cfg()
  config_lib.validate(cfg)
  workdir = tmp_path / "run7"
  with metrics_io.MetricsWriter(str(workdir), resume_step=0, wandb_cfg=cfg.logging.wandb,
                                run_config={"a": 1}) as w:
    w.write(0, {"eval/pass@1": 0.5, "note": "x"})
    w.write(1, {"loss": 2.0})
  (_, init), *logs, finish = fake.calls
  assert init["project"] == "p" and init["mode"] == "offline" and init["name"] == "run7"
  assert init["dir"] == str(workdir) and init["config"] == {"a": 1} and init["entity"] is None
  assert logs == [("log", 0, {"eval/pass@1": 0.5, "note": "x"}), ("log", 1, {"loss": 2.0})]
  assert finish == ("finish",)
  # A resumed run is a new W&B run of the same group (W&B cannot take back logged steps).
  fake.calls.clear()
  metrics_io.MetricsWriter(str(workdir), resume_step=1, wandb_cfg=cfg.logging.wandb).close()
  assert fake.calls[0][1]["name"] == "run7-from-1" and fake.calls[0][1]["group"] == "run7"


def test_wandb_is_off_by_default_and_a_config_error_when_not_installed(tmp_path, monkeypatch):
  assert config_lib.defaults().logging.wandb.project == ""
  monkeypatch.delitem(sys.modules, "wandb", raising=False)
  real = importlib.util.find_spec  # as if wandb were not installed
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(config_lib.ConfigError, match=r"pip install -e '\.\[wandb\]'"):
    config_lib.validate(_wandb_cfg())
  with pytest.raises(config_lib.ConfigError, match="mode"):
    config_lib.validate(_wandb_cfg(mode="sometimes"))


def _wandb_history(run_file):
  """The history rows of an offline run's .wandb file (a LevelDB-style log of protobufs)."""
  from wandb.proto import wandb_internal_pb2

  data = open(run_file, "rb").read()
  assert data[:4] == b":W&B"
  pos, buf, rows = 7, b"", []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header: padding
      pos += 32768 - pos % 32768
      continue
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    buf += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record.FromString(buf)
      buf = b""
      if record.WhichOneof("record_type") == "history":
        items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                 for i in record.history.item}
        rows.append({k: v for k, v in items.items() if not k.startswith("_")})  # W&B's own
  return rows


def test_real_wandb_offline_run_files_hold_the_metrics(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = _wandb_cfg()
  with metrics_io.MetricsWriter(str(tmp_path), wandb_cfg=cfg.logging.wandb) as w:
    w.write(0, {"eval/pass@1": 0.25, "eval/maj@2": 0.5})
    w.write(1, {"loss": 1.5, "reward": 0.75})
  (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
  # W&B's service process writes the file: finish() may return before the last bytes land.
  deadline = time.monotonic() + 60
  while len(rows := _wandb_history(run_file)) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
  assert rows == [{"eval/pass@1": 0.25, "eval/maj@2": 0.5}, {"loss": 1.5, "reward": 0.75}]
