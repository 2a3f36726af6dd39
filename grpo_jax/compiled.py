"""A run's programs, lowered and compiled for any devices: their memory, cost and collectives.

    progs = programs(cfg, model_cfg, mesh)          # {name: (jitted fn, abstract args, steps)}
    records = analyze(cfg, "v5e:2x4", model_cfg)   # what `python -m grpo_jax.aot` prints
    peaks = compiled_peaks(cfg, model_cfg, mesh)   # the start-up memory check (runner.setup)

Shapes only: params, optimizer state and batches are abstract (ShapeDtypeStructs
with the run's shardings), so nothing is allocated and no weights are read.
See `grpo_jax.aot` for the command line and what each number means.
"""

from __future__ import annotations

import re
import time
from typing import Any

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


def abstract_model(cfg, model_cfg):
  """(graphdef, params as ShapeDtypeStructs) of the config's model (with config.model.lora's
  adapters): shapes only, no memory."""
  import jax.numpy as jnp
  from flax import nnx

  from grpo_jax.models import transformer

  from grpo_jax import lora

  return nnx.split(nnx.eval_shape(lambda: lora.attach(transformer.init_model(
      model_cfg, dtype=jnp.dtype(cfg.model.dtype), attention_block=cfg.model.attention_block),
      cfg.model.get("lora"))))


def programs(cfg, model_cfg, mesh, *, rows_for=None) -> dict[str, tuple[Any, tuple, int]]:
  """{name: (jitted function, abstract args, decode steps)} of the programs a run of `cfg`
  compiles, placed on `mesh` (mesh=None: unsharded, for one device). `decode steps` is the
  decode loop's trip count for the samplers (0 for the updates).

  With PPO (rl.advantage_estimator="gae") also the critic's: "critic_values" (the rollout
  pass: values, GAE; `critic.make_advantages_fn`) and "critic_update"
  (`critic.update_step_jit`), their critic built as the run builds it (`critic.critic_for`
  of `critic.abstract_critic`); the policy's update then takes per-token advantages [N, T].

  The evaluation sampler's batch is split over the batch axes as the run's evaluator splits
  it (`evaluate.sample_texts`): filled up to a multiple of data x fsdp of `rows_for` (default
  `mesh`; an unsharded program with the rows a mesh runs, for its cost)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from grpo_jax import critic, distributed, grpo, lora, optim, sampling, sft, sharding

  rl, train = cfg.rl, cfg.train
  graphdef, params = abstract_model(cfg, model_cfg)
  param_sh = sharding.param_shardings(mesh, params) if mesh is not None else None
  batch_sh = sharding.batch_sharding(mesh) if mesh is not None else None
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  # The samplers decode from their own copy of the weights (sampling.rollout_copier; with LoRA
  # of the base with the adapters merged in, lora.rollout_copier).
  adapted = lora.has_adapters(params)
  sample_graphdef, base = lora.base_of(graphdef, params) if adapted else (graphdef, params)
  rollout = jax.eval_shape(lambda x: sampling.cast_for_rollout(x, cfg.model.dtype), base)
  rollout = _abstract(rollout, sharding.rollout_shardings(mesh, base) if mesh else None)
  params = _abstract(params, param_sh)

  def arr(shape, dtype, sh=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  b, g, p, t = train.prompts_per_step, rl.num_generations, rl.max_prompt_length, \
      rl.max_completion_length
  optimizer, _ = optim.optimizer_from_config(cfg.opt, train.steps)
  opt_state = jax.eval_shape(optimizer.init, lora.trainable(params))  # LoRA: adapters only
  opt_sh = sharding.param_shardings(mesh, opt_state) if mesh is not None else None
  opt_state = _abstract(opt_state, opt_sh)
  out: dict[str, tuple[Any, tuple, int]] = {}

  if cfg.mode == "sft":
    length = cfg.sft.max_length
    step = sft.make_update_step(graphdef, optimizer, grad_accum_steps=train.grad_accum_steps,
                                param_sharding=param_sh, opt_sharding=opt_sh,
                                batch_sharding=batch_sh, remat=cfg.model.remat)
    batch = sft.Batch(arr((b, length), jnp.int32, batch_sh), arr((b, length), jnp.int32, batch_sh),
                      arr((b, length), jnp.int32, batch_sh), arr((b, length), jnp.int32, batch_sh))
    out["update"] = (step, (params, opt_state, batch), 0)
  else:
    shards = sharding.batch_shards(mesh) if mesh is not None else 1
    sample_kw = dict(num_generations=g, max_new_tokens=t, stop_ids=(0,), pad_id=0,
                     parts=rl.rollout_parts, shards=shards)
    out["sample"] = (_bind(sampling.sample_jit, sample_graphdef, sample_kw),
                     (rollout, arr((b, p), jnp.int32, batch_sh), arr((b, p), jnp.int32, batch_sh),
                      key), t)
    gae = critic.enabled(rl)
    loss_cfg = critic.policy_loss_config(cfg)
    step = grpo.make_update_step(graphdef, optimizer, loss_cfg,
                                 grad_accum_steps=train.grad_accum_steps,
                                 param_sharding=param_sh, opt_sharding=opt_sh,
                                 batch_sharding=batch_sh)
    n = b * g
    per_token = arr((n, t), jnp.float32, batch_sh)  # PPO's advantages, values, returns [N, T]
    batch = grpo.Batch(arr((b, p), jnp.int32, batch_sh), arr((b, p), jnp.int32, batch_sh),
                       arr((n, t), jnp.int32, batch_sh), arr((n, t), jnp.int32, batch_sh),
                       per_token, per_token if gae else arr((n,), jnp.float32, batch_sh))
    ref = params if loss_cfg.beta != 0 and not adapted else None  # LoRA: the base, adapters off
    out["update"] = (step, (params, opt_state, ref, batch), 0)
    if gae:  # PPO: the critic's rollout pass (values, GAE) and its update
      the_critic, critic_params = _abstract_critic(cfg, graphdef, params, mesh)
      critic_opt = _abstract(jax.eval_shape(the_critic.optimizer.init, critic_params),
                             the_critic.opt_sh)
      values_fn = critic.make_advantages_fn(cfg, the_critic, graphdef, param_sh=param_sh,
                                            batch_sh=batch_sh, mesh=mesh)
      out["critic_values"] = (values_fn, (critic_params, params if rl.kl_in_reward else None,
                                          batch, arr((n,), jnp.float32, batch_sh)), 0)
      out["critic_update"] = (critic.update_step_jit(cfg, the_critic, batch_sh=batch_sh),
                              (critic_params, critic_opt, batch, per_token, per_token), 0)
  if cfg.eval.num_problems:
    rows_for = mesh if rows_for is None else rows_for
    e = distributed.padded_rows(min(cfg.eval.prompts_per_batch, cfg.eval.num_problems),
                                sharding.batch_sharding(rows_for) if rows_for is not None else None)
    kw = dict(num_generations=cfg.eval.num_samples, max_new_tokens=t, stop_ids=(0,), pad_id=0)
    out["eval_sample"] = (_bind(sampling.sample_jit, sample_graphdef, kw),
                          (rollout, arr((e, p), jnp.int32, batch_sh),
                           arr((e, p), jnp.int32, batch_sh), key), t)
  return out


def _abstract_critic(cfg, graphdef, params, mesh):
  """(the `critic.Critic` a run of `cfg` builds on `mesh`, its params as ShapeDtypeStructs with
  their shardings), from the policy's `graphdef` and abstract `params`."""
  from grpo_jax import critic

  critic_graphdef, critic_params = critic.abstract_critic(graphdef, _abstract(params))
  the_critic = critic.critic_for(cfg, critic_graphdef, critic_params, mesh)
  return the_critic, _abstract(critic_params, the_critic.param_sh)


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

  if not decode_steps:
    return _cost(fn, args)
  from grpo_jax import lora

  graphdef, params = abstract_model(cfg, model_cfg)
  if lora.has_adapters(params):  # the samplers decode the base with the adapters merged in
    graphdef, _ = lora.base_of(graphdef, params)
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


_COMPUTATION_RE = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_CALLEE_RE = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)="
                        r"(\{[^}]*\}|%?[\w.\-]+)")


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION_RE.match(line)
    if m:
      current = comps.setdefault(m.group(1), [])
    elif current is not None:
      current.append(line)
  return comps


def loop_collectives(hlo_text: str) -> dict[str, int]:
  """Collectives that run on every iteration of a data-dependent loop: those in the body (and
  in whatever it calls) of each `while` whose trip count XLA could not determine. In a
  sampler that is the decode loop (`lax.while_loop` until every row stops), while the layer
  scans and the random-number loops have known trip counts; so this is what one decode step
  communicates. Static counts, like `collectives`."""
  comps = _computations(hlo_text)
  bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1)
            for lines in comps.values() for line in lines
            if " while(" in line and "known_trip_count" not in line]
  seen, todo = set(), list(bodies)
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      for m in _CALLEE_RE.finditer(line):
        todo.extend(callee.strip(" {}%") for callee in m.group(1).split(","))
  return collectives("\n".join(line for name in seen for line in comps[name]))


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
  """(compiled, seconds); OutOfMemory when XLA refuses it for HBM. A plain function is jitted
  and lowered on the mesh of its sharded args (`sharding.on_mesh`), as the run calls it."""
  import jax

  from grpo_jax import sharding

  t = time.perf_counter()
  try:
    jitted = fn if hasattr(fn, "lower") else sharding.on_mesh(jax.jit(fn), sharding.mesh_of(args))
    lowered = jitted.lower(*args)
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
          "config.mesh.tensor, config.rl.rollout_parts (a sampler's KV cache a part at a time), "
          "config.model.remat=full (recompute each layer's activations in "
          "the backward), more config.train.grad_accum_steps, a smaller "
          "config.model.attention_block (attention scores held at once), a shorter "
          "config.rl.max_completion_length, config.model.dtype=bfloat16, or config.rl.beta=0")


def analyze(cfg, topology: str, model_cfg, only=None) -> list[dict]:
  """One record per program of the run of `cfg` compiled for `topology` (see module doc)."""
  from grpo_jax import aot_targets, config as config_lib

  chip, _ = aot_targets.parse(topology)
  devices = aot_targets.devices(topology)
  mesh = config_lib.make_mesh(cfg, devices=devices)
  mesh_desc = {k: int(v) for k, v in mesh.shape.items()}
  unsharded = programs(cfg, model_cfg, None, rows_for=mesh)  # the shapes run on `mesh`
  records = []
  progs = programs(cfg, model_cfg, mesh)
  held_by = held(cfg, progs)
  for name, (fn, args, steps) in progs.items():
    if only and name not in only:
      continue
    rec: dict[str, Any] = {"program": name, "topology": topology,
                           "device_kind": devices[0].device_kind, "num_devices": len(devices),
                           "mesh": mesh_desc, "hbm_bytes": chip.hbm_bytes}
    try:
      compiled, seconds = compile_program(fn, args)
      rec.update(memory(compiled))
      hlo = compiled.as_text()
      rec["collectives"] = collectives(hlo)
      if steps:  # a sampler: what each decode step communicates
        rec["decode_step_collectives"] = loop_collectives(hlo)
      if held_by[name]:  # the training state that stays on the device meanwhile
        rec["held_bytes"] = sum(held_by[name].values())
        rec["held"] = held_by[name]
      rec["fits"] = rec["peak_bytes"] + rec.get("held_bytes", 0) <= chip.hbm_bytes
    except OutOfMemory as e:  # XLA's own refusal: the size it needed, when it says it
      seconds = e.seconds
      rec.update({"fits": False, "error": str(e)})
      if e.required_bytes:
        rec["peak_bytes"] = e.required_bytes  # at least: the temporaries alone
    rec["compile_s"] = round(seconds, 2)
    cost = total_cost(name, unsharded[name][0], unsharded[name][1], steps, cfg, model_cfg)
    rec["flops"] = cost["flops"] / len(devices)
    rec["bytes_accessed"] = cost["bytes"] / len(devices)
    rec["roofline_s"] = (max(rec["flops"] / chip.peak_flops(cfg.model.dtype),
                             rec["bytes_accessed"] / chip.hbm_bandwidth)
                         if chip.hbm_bandwidth else None)  # no peaks known (cpu)
    records.append(rec)
  return records


def device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of arrays with shardings, abstract or placed (the
  largest shard)."""
  import math

  import jax

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree) if x is not None)


def held(cfg, progs) -> dict[str, dict[str, int]]:
  """{program: {what: bytes per device}} of the training state that stays on the device while
  the program runs without being its argument: of the policy params, its optimizer state, the
  reference params (beta != 0) and PPO's critic (params and optimizer state), whatever the
  program does not take. A sampler decodes from its own copy of the params, so they are held
  too, unless the copy would be the same arrays (sampling.rollout_copier). `progs`:
  `programs(...)` placed on a mesh."""
  import jax

  from grpo_jax import lora

  update_args = progs["update"][1]
  adapted = lora.has_adapters(update_args[0])  # LoRA: the reference is the base, adapters off
  params = device_bytes(update_args[0])
  state = {"params": params, "optimizer state": device_bytes(update_args[1])}
  if cfg.mode != "sft" and cfg.rl.beta != 0 and not adapted:  # the run keeps the reference
    state["reference"] = params
  if "critic_update" in progs:
    critic_args = progs["critic_update"][1]
    state["critic params"] = device_bytes(critic_args[0])
    state["critic optimizer state"] = device_bytes(critic_args[1])
  uses = {"update": {"params", "optimizer state"} | (
              {"reference"} if cfg.mode != "sft" and update_args[2] is not None else set()),
          "critic_update": {"critic params", "critic optimizer state"}}
  if "critic_values" in progs:
    uses["critic_values"] = {"critic params"} | (
        {"reference"} if progs["critic_values"][1][1] is not None else set())
  out = {}
  for name, (_, args, _) in progs.items():
    used = uses.get(name)
    if used is None:  # a sampler: its own copy of the params (LoRA: merged), or the params
      same = not adapted and all(
          a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim)
          for a, b in zip(jax.tree.leaves(args[0]), jax.tree.leaves(update_args[0])))
      used = {"params"} if same else set()
    out[name] = {k: v for k, v in state.items() if k not in used and v}
  return out


def held_while_sampling(cfg, progs) -> int:
  """Bytes per device that stay on it while the rollout sampler runs (`held`): the optimizer
  state, the reference params, PPO's critic, and the training params when the sampler decodes
  from a copy of them."""
  return sum(held(cfg, progs)["sample"].values())


def compiled_peaks(cfg, model_cfg, mesh) -> dict[str, dict]:
  """The run's programs compiled for `mesh` (the devices it will run on): {name: {"peak_bytes",
  "parts"}} per device, or {} when the backend gives no memory analysis. Each peak also
  counts what stays on the device while the program runs without being its argument
  (`held`): for a sampler the training params (it decodes from its own copy), the optimizer
  state and the reference params; with PPO's critic, the critic's params and optimizer state
  in the policy's programs, and the policy's in the critic's."""
  progs = programs(cfg, model_cfg, mesh)
  held_by = held(cfg, progs)
  out = {}
  for name, (fn, args, _) in progs.items():
    compiled, _ = compile_program(fn, args)
    try:
      mem = memory(compiled)
    except Exception:  # a backend without memory analysis
      return {}
    out[name] = {"peak_bytes": mem["peak_bytes"] + sum(held_by[name].values()),
                 "parts": {"arguments": mem["argument_bytes"], "outputs": mem["output_bytes"],
                           "temporaries": mem["temp_bytes"], "code": mem["code_bytes"],
                           "aliased (reused)": -mem["alias_bytes"],
                           **{f"{k} (held)": v for k, v in held_by[name].items()}}}
  return out


def check_compiled(peaks: dict[str, dict], limit: int) -> None:
  """ConfigError naming the program, its breakdown and what to change, when one's compiled
  peak exceeds `limit` bytes per device."""
  from grpo_jax.config import ConfigError

  for name, p in peaks.items():
    if p["peak_bytes"] > limit:
      parts = "\n".join(f"  {k:20s}{v / GIB:9.2f} GiB" for k, v in p["parts"].items())
      raise ConfigError(
          f"the {name} program needs {p['peak_bytes'] / GIB:.2f} GiB per device (XLA's memory "
          f"analysis of the compiled program), more than the {limit / GIB:.2f} GiB a device "
          f"has:\n{parts}\n{ADVICE[0].upper()}{ADVICE[1:]}.")


def table(records: list[dict]) -> str:
  rows = [f"{'program':13s} {'peak GiB':>9s} {'+held GiB':>9s} {'HBM GiB':>8s} {'fits':>5s} "
          f"{'TFLOP':>9s} {'roofline s':>10s} {'all-gather':>10s} {'per decode':>10s} {'compile s':>9s}"]
  for r in records:
    peak = r.get("peak_bytes")
    step = r.get("decode_step_collectives")
    per_step = "-" if step is None else str(step["all-gather"])
    roofline = "-" if r["roofline_s"] is None else f"{r['roofline_s']:.4f}"
    rows.append(f"{r['program']:13s} {peak / GIB if peak else float('nan'):9.2f} "
                f"{r.get('held_bytes', 0) / GIB:9.2f} "
                f"{r['hbm_bytes'] / GIB:8.2f} {str(r['fits']):>5s} {r['flops'] / 1e12:9.3f} "
                f"{roofline:>10s} {r.get('collectives', {}).get('all-gather', 0):10d} "
                f"{per_step:>10s} {r['compile_s']:9.1f}")
  return "\n".join(rows)


def shortfalls(records: list[dict]) -> list[str]:
  out = []
  for r in records:
    if r["fits"]:
      continue
    if "peak_bytes" in r:
      need = r["peak_bytes"] + r.get("held_bytes", 0)
      least = "at least " if "error" in r else ""
      held = (f" ({r['held_bytes'] / GIB:.2f} GiB of it the training state it leaves on the "
              "device)" if r.get("held_bytes") else "")
      out.append(f"{r['program']} needs {least}{need / GIB:.2f} GiB per device on "
                 f"{r['topology']}{held}, {(need - r['hbm_bytes']) / GIB:.2f} GiB more than the "
                 f"{r['hbm_bytes'] / GIB:.2f} GiB of HBM; {ADVICE}")
    else:
      out.append(f"{r['program']} does not fit on {r['topology']} (XLA: {r['error']}); {ADVICE}")
  return out
