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


# -- PPO's critic (config.rl.advantage_estimator="gae") ------------------------------------
def _mesh():
  from jax.sharding import AbstractMesh, AxisType

  return AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _programs(overrides, mesh):
  cfg = config_lib.from_file(TINY)
  for key, value in overrides.items():
    section, leaf = key.split(".")
    cfg[section][leaf] = value
  m = presets.shapes(cfg.model.name)
  return cfg, m, compiled.programs(cfg, m, mesh)


def _leaves(tree):
  import jax

  return {jax.tree_util.keystr(path).removesuffix(".value"): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree) if x is not None}


def test_ppo_compiles_the_critics_programs_and_grpo_does_not():
  """With gae the programs gain the critic's rollout pass and update, their critic a copy of
  the policy's trunk (no LM head) plus a [D, 1] head and a [1] bias, sharded as the policy's
  params are, with an AdamW state of two moments per param; the policy's update takes
  per-token advantages. Without gae the programs are GRPO's."""
  mesh = _mesh()
  cfg, m, grpo_progs = _programs({}, mesh)
  assert list(grpo_progs) == ["sample", "update", "eval_sample"]
  assert grpo_progs["update"][1][3].advantages.shape == (4 * 8,)
  _, _, progs = _programs({"rl.advantage_estimator": "gae"}, mesh)
  assert set(progs) == {"sample", "update", "critic_values", "critic_update", "eval_sample"}
  n, t = 4 * 8, cfg.rl.max_completion_length
  assert progs["update"][1][3].advantages.shape == (n, t)

  policy = _leaves(progs["update"][1][0])
  critic_params, critic_opt = progs["critic_update"][1][:2]
  critic = _leaves(critic_params)
  trunk = {k.replace("['trunk']", "", 1): x for k, x in critic.items() if "['trunk']" in k}
  assert trunk.keys() == {k for k in policy if "lm_head" not in k}
  for k, x in trunk.items():  # the policy's shapes, dtypes and layouts
    assert (x.shape, x.dtype, x.sharding.spec) == (policy[k].shape, policy[k].dtype,
                                                   policy[k].sharding.spec), k
  assert critic["['value_head']"].shape == (m.hidden_size, 1)
  assert critic["['value_bias']"].shape == (1,)
  assert critic.keys() - {"['trunk']" + k for k in trunk} == {"['value_head']", "['value_bias']"}
  params_bytes = compiled.device_bytes(critic_params)
  assert compiled.device_bytes(critic_opt) == pytest.approx(2 * params_bytes, rel=0.01)
  # The rollout pass reads the critic's params (the reference only with kl_in_reward).
  values_args = progs["critic_values"][1]
  assert _leaves(values_args[0]).keys() == critic.keys() and values_args[1] is None
  assert values_args[3].shape == (n,)  # rewards
  for x in progs["critic_update"][1][3:]:  # old values, returns
    assert x.shape == (n, t) and x.dtype == "float32"


def test_held_bytes_count_the_critic_with_ppo_and_nothing_new_without():
  """What stays on a device while each program runs without being its argument: the
  critic's params and AdamW state join every policy program's (the samplers', and the
  update's, which had none), the policy's params and optimizer state are held through the
  critic's; GRPO's are the optimizer state (and the params the sampler copies)."""
  mesh = _mesh()
  cfg, _, grpo_progs = _programs({}, mesh)
  _, _, progs = _programs({"rl.advantage_estimator": "gae"}, mesh)
  size = compiled.device_bytes
  params, opt = size(grpo_progs["update"][1][0]), size(grpo_progs["update"][1][1])
  critic = size(progs["critic_update"][1][0]) + size(progs["critic_update"][1][1])
  grpo_held, held = compiled.held(cfg, grpo_progs), compiled.held(cfg, progs)
  assert grpo_held["update"] == {}
  copy = params if "params" in grpo_held["sample"] else 0
  assert sum(grpo_held["sample"].values()) == opt + copy > 0
  assert compiled.held_while_sampling(cfg, grpo_progs) == opt + copy
  for name in ("sample", "eval_sample"):
    assert sum(held[name].values()) == sum(grpo_held[name].values()) + critic
  assert compiled.held_while_sampling(cfg, progs) == opt + copy + critic
  assert sum(held["update"].values()) == critic
  assert held["critic_update"] == {"params": params, "optimizer state": opt}
  assert held["critic_values"] == {"params": params, "optimizer state": opt,
                                   "critic optimizer state": size(progs["critic_update"][1][1])}


def test_ppo_with_the_kl_in_the_reward_reads_the_reference_in_the_rollout_pass():
  """kl_in_reward: the reference's log-probs go into the rewards (the rollout pass takes it),
  the policy loss has no KL term (its update takes none); the reference stays on the device."""
  mesh = _mesh()
  cfg, _, progs = _programs({"rl.advantage_estimator": "gae", "rl.kl_in_reward": True,
                             "rl.beta": 0.05}, mesh)
  assert progs["update"][1][2] is None
  ref = progs["critic_values"][1][1]
  assert _leaves(ref).keys() == _leaves(progs["update"][1][0]).keys()
  held = compiled.held(cfg, progs)
  params = compiled.device_bytes(ref)
  assert held["update"]["reference"] == held["critic_update"]["reference"] == params
  assert "reference" not in held["critic_values"]


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_critic_programs_count_one_more_forward_backward(grad_accum_steps):
  """The critic's update costs a policy update without the LM head (a forward and backward of
  the trunk), its rollout pass one trunk forward (XLA's counts, unsharded), every micro-batch
  counted."""
  cfg, m, progs = _programs({"rl.advantage_estimator": "gae",
                             "train.grad_accum_steps": grad_accum_steps}, None)
  trunk = _analytic_update_flops(cfg, m) - 3 * _lm_head_flops(cfg, m)
  fn, args, _ = progs["critic_update"]
  flops = compiled.total_cost("critic_update", fn, args, 0, cfg, m)["flops"]
  assert flops == pytest.approx(trunk, rel=0.05)
  fn, args, _ = progs["critic_values"]
  assert compiled.total_cost("critic_values", fn, args, 0, cfg, m)["flops"] == pytest.approx(
      trunk / 3, rel=0.05)


@pytest.mark.slow  # a 20-40 s compile on 2 cores
def test_critic_update_compiles_with_its_state_donated():
  """The critic's update takes its params and AdamW state as arguments and reuses their
  buffers for the new ones (donated, as in the run)."""
  _, _, progs = _programs({"rl.advantage_estimator": "gae"}, None)
  fn, args, _ = progs["critic_update"]
  mem = compiled.memory(compiled.compile_program(fn, args)[0])
  critic_bytes = sum(x.size * x.dtype.itemsize for x in _leaves(args[:2]).values())
  assert mem["argument_bytes"] >= critic_bytes
  assert mem["alias_bytes"] >= 0.99 * critic_bytes


def _lm_head_flops(cfg, m):
  return (cfg.train.prompts_per_step * cfg.rl.num_generations * cfg.rl.max_completion_length
          * 2 * m.hidden_size * m.vocab_size)


def test_cpu_topology_analyses_the_programs_for_this_machine():
  """--topology=cpu: this machine's CPU devices, XLA's memory analysis, RAM as the limit, no
  roofline (no peak numbers); the critic's programs are in the records and the table."""
  from grpo_jax import aot_targets

  assert aot_targets.parse("cpu")[0].platform == "cpu"
  with pytest.raises(ValueError, match="unknown topology"):
    aot_targets.parse("cpu:2x2")
  cfg = config_lib.from_file(TINY)
  cfg.rl.advantage_estimator = "gae"
  (rec,) = compiled.analyze(cfg, "cpu", presets.shapes(cfg.model.name), only=["critic_values"])
  assert rec["program"] == "critic_values" and rec["device_kind"] == "cpu"
  assert rec["roofline_s"] is None and rec["flops"] > 0 and rec["fits"]
  assert rec["peak_bytes"] >= rec["argument_bytes"] > 0
  assert set(rec["held"]) == {"params", "optimizer state", "critic optimizer state"}
  assert rec["held_bytes"] == sum(rec["held"].values())
  text = compiled.table([rec])
  assert "critic_values" in text.splitlines()[1] and " - " in text
