"""Ahead-of-time compilation for a TPU and an H100 topology on this CPU (grpo_jax.aot).

The command line needs the `aot` extra's plugins (libtpu, jax-cuda12-plugin). The test set-up
installs them in VENV/aot (scripts/setup.sh test), which these subprocesses put on PYTHONPATH;
an environment with `pip install -e .[aot]` has them already.
"""

import json
import os
import subprocess
import sys

import pytest

from grpo_jax import compiled, config as config_lib
from grpo_jax.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_arithmetic.py")
GIB = 2 ** 30


PLUGINS = os.path.join(sys.prefix, "aot")


def run_aot(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
  env.pop("XLA_FLAGS", None)
  if os.path.isdir(PLUGINS):
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGINS, env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-m", "grpo_jax.aot", f"--config={TINY}", *args],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("topology, kind, programs", [
    ("v5e:2x4", "TPU v5 lite", "sample,update"),
    ("h100:1x1x8", "NVIDIA H100 80GB HBM3", "update"),
])
def test_tiny_run_compiles_for_the_topology_and_reports_consistent_numbers(topology, kind,
                                                                           programs):
  out = run_aot(f"--topology={topology}", f"--programs={programs}",
                "--config.train.prompts_per_step=8", "--config.rl.beta=0.04")
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r["program"] for r in records] == programs.split(",")
  for r in records:
    assert r["topology"] == topology and r["device_kind"] == kind and r["num_devices"] == 8
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert r["peak_bytes"] >= r["argument_bytes"] > 0
    assert r["fits"] == (r["peak_bytes"] <= r["hbm_bytes"]) is True
    assert r["flops"] > 0 and r["bytes_accessed"] > 0 and r["roofline_s"] > 0
    assert r["compile_s"] > 0 and set(r["collectives"]) >= {"all-gather", "all-reduce"}
  update = records[programs.split(",").index("update")]
  # Data parallelism over 8 devices: the gradients are summed across them.
  assert update["collectives"]["all-reduce"] >= 1
  # The policy and its optimizer state are donated: their buffers are reused.
  assert update["alias_bytes"] > 0
  assert "update" in out.stderr and "peak GiB" in out.stderr  # the table


def test_a_run_too_big_for_the_chip_exits_non_zero_with_the_shortfall():
  """An 8B model's fp32 training state alone (params + 2 Adam moments + reference, 128 GB)
  cannot sit on one v5e chip's 16 GiB whatever the activations."""
  out = run_aot("--topology=v5e:2x2", "--model_shapes=llama-3.1-8b", "--programs=update",
                "--config.rl.beta=0.04", "--config.mesh.data=1", "--config.mesh.fsdp=1",
                "--config.mesh.tensor=-1", "--config.train.prompts_per_step=4")
  assert out.returncode == 1, out.stderr[-3000:]
  line = [l for l in out.stderr.splitlines() if l.startswith("update")][-1]
  assert "v5e:2x2" in line and "GiB" in line and "config.mesh.fsdp" in line
  assert "grad_accum_steps" in line and "max_completion_length" in line


def test_unknown_topology_is_one_line():
  out = run_aot("--topology=v9z:1x1")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: unknown topology 'v9z:1x1'")


def _analytic_update_flops(cfg, m):
  """Matmul FLOPs of the GRPO update: policy forward + backward (2x forward), and the
  reference forward when beta != 0. The prompt runs once per group (B rows, attention over P);
  completions (N rows) attend to prompt + completion; the LM head runs at completion positions
  only."""
  rl, train = cfg.rl, cfg.train
  b, g, p, t = train.prompts_per_step, rl.num_generations, rl.max_prompt_length, \
      rl.max_completion_length
  q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  dense = 2 * (m.hidden_size * (q + 2 * kv) + q * m.hidden_size
               + 3 * m.hidden_size * m.intermediate_size)
  forward = (b * p * m.num_layers * (dense + 4 * q * p)
             + b * g * t * (m.num_layers * (dense + 4 * q * (p + t))
                            + 2 * m.hidden_size * m.vocab_size))
  return (3 + (rl.beta != 0)) * forward


@pytest.mark.parametrize("overrides", [{}, {"rl.beta": 0.04, "train.grad_accum_steps": 2}])
def test_update_flops_count_every_layer_and_micro_batch(overrides):
  """XLA counts a loop body once: unrolled, the count agrees with the analytic one (the
  remaining few percent are the elementwise work: norms, softmax, the optimizer)."""
  cfg = config_lib.from_file(TINY)
  for key, value in overrides.items():
    section, leaf = key.split(".")
    cfg[section][leaf] = value
  m = presets.shapes(cfg.model.name)
  fn, args, _ = compiled.programs(cfg, m, None)["update"]
  measured = compiled.total_cost("update", fn, args, 0, cfg, m)["flops"]
  assert measured == pytest.approx(_analytic_update_flops(cfg, m), rel=0.05)


def test_eval_sample_has_the_evaluators_rows_split_over_the_batch_axes():
  """As `evaluate.sample_texts` runs it on a mesh: eval.prompts_per_batch (3 here) filled up to
  a multiple of data x fsdp (8), split over them; the unsharded program for its cost alike."""
  from jax.sharding import AbstractMesh, AxisType

  cfg = config_lib.from_file(TINY)
  cfg.eval.num_problems, cfg.eval.prompts_per_batch = 5, 3
  m = presets.shapes(cfg.model.name)
  mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  _, args, _ = compiled.programs(cfg, m, mesh)["eval_sample"]
  for x in args[1:3]:  # prompts, mask
    assert x.shape == (8, cfg.rl.max_prompt_length)
    assert x.sharding.spec[0] == ("data", "fsdp")
  assert compiled.programs(cfg, m, None, rows_for=mesh)["eval_sample"][1][1].shape[0] == 8
  assert compiled.programs(cfg, m, None)["eval_sample"][1][1].shape[0] == 3
  cfg.eval.num_problems = 2  # fewer problems than a batch: the evaluator's batch is smaller
  assert compiled.programs(cfg, m, mesh)["eval_sample"][1][1].shape[0] == 8
  assert compiled.programs(cfg, m, None)["eval_sample"][1][1].shape[0] == 2


def test_collectives_are_counted_from_hlo_text():
  hlo = """
  %ag = f32[8,4] all-gather-start(f32[1,4] %p), dimensions={0}
  %agd = f32[8,4] all-gather-done(%ag)
  %ar = f32[4] all-reduce(f32[4] %x), to_apply=%add
  ROOT %rs = f32[1] reduce-scatter(f32[8] %y), dimensions={0}
  """
  counts = compiled.collectives(hlo)
  assert counts["all-gather"] == 1 and counts["all-reduce"] == 1
  assert counts["reduce-scatter"] == 1 and counts["all-to-all"] == 0


def test_loop_collectives_count_what_runs_inside_a_data_dependent_loop():
  # The decode loop (no known trip count) calls a layer scan (known trip count) whose body
  # all-gathers; a scan outside the loop all-gathers too, and must not count.
  hlo = """
%scan_body (p: f32[4]) -> f32[4] {
  %ag = f32[8] all-gather(f32[1] %p), dimensions={0}
}

%decode_body (p: f32[4]) -> f32[4] {
  %ar = f32[4] all-reduce(f32[4] %p), to_apply=%add
  ROOT %w = f32[4] while(f32[4] %p), condition=%c, body=%scan_body, backend_config={"known_trip_count":{"n":"2"}}
}

%prefill_body (p: f32[4]) -> f32[4] {
  %ag2 = f32[8] all-gather(f32[1] %p), dimensions={0}
  %ag3 = f32[8] all-gather(f32[1] %p), dimensions={0}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %a = f32[4] while(f32[4] %p), condition=%c, body=%prefill_body, backend_config={"known_trip_count":{"n":"2"}}
  ROOT %b = f32[4] while(f32[4] %a), condition=%c, body=%decode_body
}
"""
  assert compiled.collectives(hlo)["all-gather"] == 3
  step = compiled.loop_collectives(hlo)
  assert step["all-gather"] == 1 and step["all-reduce"] == 1


def test_presets_have_the_published_parameter_counts():
  billions = {"qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62, "qwen3-8b": 8.19, "llama-3.1-8b": 8.03,
              "llama-3.2-1b": 1.24, "qwen3-0.6b": 0.60}
  for name, count in billions.items():
    assert presets.shapes(name).num_params() / 1e9 == pytest.approx(count, abs=0.01), name
