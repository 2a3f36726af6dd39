r"""Compile a run's programs ahead of time for TPUs or GPUs that are not here, and report their
memory and cost per device.

    python -m grpo_jax.aot --config=configs/qwen25_gsm8k.py --topology=v5e:2x4
    python -m grpo_jax.aot --config=configs/qwen3_8b_gsm8k.py --topology=h100:1x1x8 \
        --config.rl.max_completion_length=8192

From shapes alone (no weights read, no tokenizer): the model's shapes come from
`config.model.name` when it is a preset of `models.presets` or a folder with a
Hugging Face config.json, or from `--model_shapes`. It lowers and compiles the
programs a training run with that config compiles, with the config's mesh and
sharding rules laid over the topology's devices:

- `sample`: the rollout sampler (B prompts of rl.max_prompt_length, G
  completions of up to rl.max_completion_length);
- `update`: the GRPO update at the longest completion bucket (policy, reference
  when beta != 0, AdamW state, gradient accumulation; params and optimizer state
  donated); the SFT update in SFT mode;
- `eval_sample`: the evaluation sampler (eval.prompts_per_batch prompts,
  eval.num_samples each), when config.eval.num_problems > 0.

Each program gets a table row and one JSON line (stdout) with XLA's memory
analysis per device (argument, output, temp, peak = argument + output + temp +
code - aliased), whether it fits the chip's HBM, its FLOPs and bytes accessed
per device per call, the collectives in the compiled HLO, the compile time,
and a roofline lower bound on its time: max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth). FLOPs and bytes come from XLA's cost analysis of the same program
lowered for one CPU device with every scan unrolled (the analysis counts a
loop body once), divided by the number of devices; a sampler is counted as
its prefill plus max_completion_length one-token model steps (every row
running to the limit: an upper bound; see `total_cost`). Exit 0 when every program fits; otherwise one line
per program that does not, with the shortfall and what to change.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: the GPU plugin must not probe

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "KIND:SHAPE, e.g. v5e:2x4 or h100:1x1x8")
_SHAPES = flags.DEFINE_string("model_shapes", None, "a models.presets name or a folder with a "
                              "Hugging Face config.json (default: config.model.name)")
_PROGRAMS = flags.DEFINE_list("programs", None, "only these programs (sample, update, "
                              "eval_sample; default all the run compiles)")

GIB = 2 ** 30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"=\s*\S+\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


# -- the programs --------------------------------------------------------------------
def _abstract(tree, shardings=None):
  """ShapeDtypeStructs of a pytree, with the given shardings (a matching pytree) if any."""
  import jax

  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def programs(cfg, model_cfg, mesh) -> dict[str, tuple[Any, tuple, int]]:
  """{name: (jitted function, abstract args, decode steps)} of the programs a run of `cfg`
  compiles, placed on `mesh` (mesh=None: unsharded, for one device). `decode steps` is the
  decode loop's trip count for the samplers (0 for the update)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from grpo_jax import grpo, optim, sampling, sft, sharding
  from grpo_jax.models import transformer

  rl, train = cfg.rl, cfg.train
  graphdef, params = nnx.split(nnx.eval_shape(lambda: transformer.init_model(
      model_cfg, dtype=jnp.dtype(cfg.model.dtype))))
  param_sh = sharding.param_shardings(mesh, params) if mesh is not None else None
  batch_sh = sharding.batch_sharding(mesh) if mesh is not None else None
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  params = _abstract(params, param_sh)

  def arr(shape, dtype, sh=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  b, g, p, t = train.prompts_per_step, rl.num_generations, rl.max_prompt_length, \
      rl.max_completion_length
  optimizer, _ = optim.optimizer_from_config(cfg.opt, train.steps)
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_sh = sharding.param_shardings(mesh, opt_state) if mesh is not None else None
  opt_state = _abstract(opt_state, opt_sh)
  out: dict[str, tuple[Any, tuple, int]] = {}

  if cfg.mode == "sft":
    length = cfg.sft.max_length
    step = sft.make_update_step(graphdef, optimizer, grad_accum_steps=train.grad_accum_steps,
                                param_sharding=param_sh, opt_sharding=opt_sh,
                                batch_sharding=batch_sh)
    batch = sft.Batch(arr((b, length), jnp.int32, batch_sh), arr((b, length), jnp.int32, batch_sh),
                      arr((b, length), jnp.int32, batch_sh), arr((b, length), jnp.int32, batch_sh))
    out["update"] = (step, (params, opt_state, batch), 0)
  else:
    sample_kw = dict(num_generations=g, max_new_tokens=t, stop_ids=(0,), pad_id=0)
    out["sample"] = (_bind(sampling.sample_jit, graphdef, sample_kw),
                     (params, arr((b, p), jnp.int32, batch_sh), arr((b, p), jnp.int32, batch_sh),
                      key), t)
    step = grpo.make_update_step(graphdef, optimizer, grpo.loss_config_from(rl),
                                 grad_accum_steps=train.grad_accum_steps,
                                 param_sharding=param_sh, opt_sharding=opt_sh,
                                 batch_sharding=batch_sh)
    n = b * g
    batch = grpo.Batch(arr((b, p), jnp.int32, batch_sh), arr((b, p), jnp.int32, batch_sh),
                       arr((n, t), jnp.int32, batch_sh), arr((n, t), jnp.int32, batch_sh),
                       arr((n, t), jnp.float32, batch_sh), arr((n,), jnp.float32, batch_sh))
    ref = params if rl.beta != 0 else None
    out["update"] = (step, (params, opt_state, ref, batch), 0)
  if cfg.eval.num_problems:
    e = min(cfg.eval.prompts_per_batch, cfg.eval.num_problems)
    kw = dict(num_generations=cfg.eval.num_samples, max_new_tokens=t, stop_ids=(0,), pad_id=0)
    out["eval_sample"] = (_bind(sampling.sample_jit, graphdef, kw),
                          (params, arr((e, p), jnp.int32, replicated),
                           arr((e, p), jnp.int32, replicated), key), t)
  return out


def _bind(sample_jit, graphdef, kw):
  """The sampler as a function of arrays only (its static settings bound)."""
  return lambda params, prompts, mask, key: sample_jit(graphdef, params, prompts, mask, key, **kw)


def _start_decoding_fn(graphdef, num_generations, max_new_tokens):
  """The sampler's work before its decode loop (prefill, first logits, cache)."""
  from flax import nnx

  from grpo_jax import sampling

  return lambda params, prompts, mask, key: sampling.start_decoding(
      nnx.merge(graphdef, params), prompts, mask, num_generations, max_new_tokens)


# -- analysis ------------------------------------------------------------------------
def _cost(fn, args) -> dict[str, float]:
  """XLA's cost analysis of fn(*args) lowered for one CPU device, every scan unrolled."""
  import jax

  from grpo_jax import flop_count

  cpu = jax.devices("cpu")[0]
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  with flop_count.unrolled(), jax.default_device(cpu):
    cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0))}


def total_cost(name: str, fn, args, decode_steps: int, cfg, model_cfg) -> dict[str, float]:
  """FLOPs and bytes of one call over all devices. A sampler is counted as its start (prefill,
  first logits) plus `decode_steps` model steps of one token per row over the full cache: the
  analysis would count its decode loop once, and the rarely taken full-vocabulary sort of
  top-k/top-p (a branch) as if it ran every step. Token selection (O(V) per row) is left out."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from grpo_jax.models import transformer

  if not decode_steps:
    return _cost(fn, args)
  graphdef = nnx.split(nnx.eval_shape(lambda: transformer.init_model(
      model_cfg, dtype=jnp.dtype(cfg.model.dtype))))[0]
  g = cfg.rl.num_generations if name == "sample" else cfg.eval.num_samples
  start_fn = _start_decoding_fn(graphdef, g, decode_steps)
  start = _cost(start_fn, args)
  logits, cache = jax.eval_shape(start_fn, *args)
  n = logits.shape[0]

  def step(params, tokens_Nx1, cache):
    model = nnx.merge(graphdef, params)
    hidden, cache = model.hidden_states(tokens_Nx1, attention_mask_BxL=jnp.ones_like(tokens_Nx1),
                                        cache=cache)
    return model.logits(hidden[:, 0]), cache

  one = _cost(step, (args[0], jax.ShapeDtypeStruct((n, 1), jnp.int32), cache))
  return {k: start[k] + decode_steps * one[k] for k in start}


def collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective the compiled HLO holds (static count, async pairs once)."""
  counts = {c: 0 for c in COLLECTIVES}
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    counts[m.group(1)] += 1
  return counts


def memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  arg, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  code, alias = m.generated_code_size_in_bytes, m.alias_size_in_bytes
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": temp,
          "code_bytes": code, "alias_bytes": alias,
          "peak_bytes": arg + out + temp + code - alias}


class OutOfMemory(Exception):
  """XLA refused a program as too big for the device."""

  def __init__(self, message: str, required_bytes: int | None, seconds: float):
    super().__init__(message)
    self.required_bytes, self.seconds = required_bytes, seconds


# XLA:TPU's refusal: "... total memory required for HLO temporaries (46.67G) exceeds available
# HBM (15.75G)." Other backends word it differently; then the size is unknown.
_REQUIRED_RE = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\)")


def compile_program(fn, args):
  """(compiled, seconds); OutOfMemory when XLA refuses it for HBM."""
  import jax

  t = time.perf_counter()
  try:
    lowered = fn.lower(*args) if hasattr(fn, "lower") else jax.jit(fn).lower(*args)
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    m = _REQUIRED_RE.search(text)
    required = (int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024) if m else None)
    message = next((line for line in text.splitlines() if "memory" in line.lower()), text)
    raise OutOfMemory(message.strip(), required, time.perf_counter() - t) from None
  return compiled, time.perf_counter() - t


ADVICE = ("to fit: more devices on config.mesh.fsdp or "
          "config.mesh.tensor, more config.train.grad_accum_steps, a shorter "
          "config.rl.max_completion_length, config.model.dtype=bfloat16, or config.rl.beta=0")


def analyze(cfg, topology: str, model_cfg, only=None) -> list[dict]:
  """One record per program of the run of `cfg` compiled for `topology` (see module doc)."""
  from grpo_jax import aot_targets, config as config_lib

  chip, _ = aot_targets.parse(topology)
  devices = aot_targets.devices(topology)
  mesh = config_lib.make_mesh(cfg, devices=devices)
  mesh_desc = {k: int(v) for k, v in mesh.shape.items()}
  unsharded = programs(cfg, model_cfg, None)
  records = []
  for name, (fn, args, steps) in programs(cfg, model_cfg, mesh).items():
    if only and name not in only:
      continue
    rec: dict[str, Any] = {"program": name, "topology": topology,
                           "device_kind": devices[0].device_kind, "num_devices": len(devices),
                           "mesh": mesh_desc, "hbm_bytes": chip.hbm_bytes}
    try:
      compiled, seconds = compile_program(fn, args)
      rec.update(memory(compiled))
      rec["collectives"] = collectives(compiled.as_text())
      rec["fits"] = rec["peak_bytes"] <= chip.hbm_bytes
    except OutOfMemory as e:  # XLA's own refusal: the size it needed, when it says it
      seconds = e.seconds
      rec.update({"fits": False, "error": str(e)})
      if e.required_bytes:
        rec["peak_bytes"] = e.required_bytes  # at least: the temporaries alone
    rec["compile_s"] = round(seconds, 2)
    cost = total_cost(name, unsharded[name][0], unsharded[name][1], steps, cfg, model_cfg)
    rec["flops"] = cost["flops"] / len(devices)
    rec["bytes_accessed"] = cost["bytes"] / len(devices)
    rec["roofline_s"] = max(rec["flops"] / chip.peak_flops(cfg.model.dtype),
                            rec["bytes_accessed"] / chip.hbm_bandwidth)
    records.append(rec)
  return records


def table(records: list[dict]) -> str:
  rows = [f"{'program':12s} {'peak GiB':>9s} {'HBM GiB':>8s} {'fits':>5s} {'TFLOP':>9s} "
          f"{'roofline s':>10s} {'all-gather':>10s} {'compile s':>9s}"]
  for r in records:
    peak = r.get("peak_bytes")
    rows.append(f"{r['program']:12s} {peak / GIB if peak else float('nan'):9.2f} "
                f"{r['hbm_bytes'] / GIB:8.2f} {str(r['fits']):>5s} {r['flops'] / 1e12:9.3f} "
                f"{r['roofline_s']:10.4f} {r.get('collectives', {}).get('all-gather', 0):10d} "
                f"{r['compile_s']:9.1f}")
  return "\n".join(rows)


def shortfalls(records: list[dict]) -> list[str]:
  out = []
  for r in records:
    if r["fits"]:
      continue
    if "peak_bytes" in r:
      short = (r["peak_bytes"] - r["hbm_bytes"]) / GIB
      least = "at least " if "error" in r else ""
      out.append(f"{r['program']} needs {least}{r['peak_bytes'] / GIB:.2f} GiB per device on "
                 f"{r['topology']}, {short:.2f} GiB more than the {r['hbm_bytes'] / GIB:.2f} GiB "
                 f"of HBM; {ADVICE}")
    else:
      out.append(f"{r['program']} does not fit on {r['topology']} (XLA: {r['error']}); {ADVICE}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from grpo_jax import aot_targets, config as config_lib
  from grpo_jax.models import presets

  cfg = _CONFIG.value
  if cfg is None or not _TOPOLOGY.value:
    raise app.UsageError("give --config=configs/NAME.py[:ARG] and --topology=KIND:SHAPE")
  try:
    config_lib.validate(cfg, data=False)
    aot_targets.parse(_TOPOLOGY.value)
    model_cfg = presets.shapes(_SHAPES.value or cfg.model.name)
    config_lib.validate_with_model(cfg, model_cfg)
    records = analyze(cfg, _TOPOLOGY.value, model_cfg, only=_PROGRAMS.value)
  except (config_lib.ConfigError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table(records), file=sys.stderr)
  for r in records:
    print(json.dumps(r), flush=True)
  problems = shortfalls(records)
  for line in problems:
    print(line, file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  app.run(main)
