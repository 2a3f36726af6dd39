"""metrics_io tests: jsonl round trip and resume, TensorBoard events, PNG plots, progress line."""

import glob
import io
import math
import os
import struct

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from grpo_jax import metrics_io


def _records(steps):
  return [{"loss": 0.5 / s, "reward": 0.1 * s, "rewards/accuracy/mean": 0.05 * s,
           "rewards/format/mean": 0.2, "kl": 0.01 * s, "completions/mean_length": 30.0 + s}
          for s in steps]


def _tb_scalars(workdir):
  """{(tag, step): value} from every event file, read with the TFRecord framing."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


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
  records[9].update({"eval/accuracy": 0.3, "eval/maj@8": 0.4})
  records[19].update({"eval/accuracy": 0.5, "eval/maj@8": 0.6})
  written = metrics_io.write_plots(str(tmp_path), records, size=(5, 3), dpi=80)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["accuracy.png", "kl.png", "length.png", "reward.png"]
  for path in written:
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (240, 400)
    assert image[..., :3].std() > 0.01  # something is drawn on the white canvas
  assert not glob.glob(str(tmp_path / "*.tmp*"))


def test_plots_skip_absent_keys(tmp_path):
  written = metrics_io.write_plots(str(tmp_path), [{"step": 1, "loss": 1.0, "kl": 0.1},
                                                   {"step": 2, "loss": 0.5, "kl": 0.2}])
  assert [os.path.basename(p) for p in written] == ["kl.png"]
  assert sorted(os.listdir(tmp_path)) == ["kl.png"]


def test_series_matches_reward_components_in_order():
  records = [dict(step=s, **r) for s, r in zip([1, 2], _records([1, 2]))]
  series = metrics_io._series(records, metrics_io.PLOTS["reward.png"][2])
  assert list(series) == ["reward", "rewards/accuracy/mean", "rewards/format/mean"]
  assert series["reward"] == ([1, 2], [0.1, 0.2])


def test_progress_bar_shows_steps_reward_and_the_last_eval_accuracy():
  stream = io.StringIO()
  bar = metrics_io.Progress(100, initial=10, stream=stream)
  assert bar.update(20, {"reward": 0.5, "eval/accuracy": 0.4}) == "reward 0.500 | eval acc 0.400"
  # The last eval accuracy stays until the next evaluation.
  assert bar.update(30, {"reward": 0.75}) == "reward 0.750 | eval acc 0.400"
  bar.close()
  out = stream.getvalue()
  assert "30/100" in out and "reward 0.750 | eval acc 0.400" in out
