"""LoRA: RL and SFT on a frozen base model through low-rank adapters (config.model.lora).

    model = lora.attach(model, cfg.model.lora, seed=0)     # adapters on the targeted projections
    graphdef, params = nnx.split(model)                    # params: base + params["lora"]
    trainable, frozen = lora.split(params)                 # the adapters; the base
    grads, aux = lora.grad(loss_fn)(params, *args)         # gradients of the adapters only
    base_graphdef, base = lora.merged(graphdef, params)    # W + scale * A @ B, no adapters

Why: full fine-tuning holds the params, their gradients, AdamW's two moments and (beta != 0)
a reference copy: ~16 bytes a parameter in fp32, 128 GB for an 8B model. With adapters only
they get gradients and optimizer state; the base stays as loaded, and the reference policy
(beta != 0) is the base itself with the adapters off (`without_adapters`), not a copy.

The adapters live in the Transformer as a submodule (`transformer.LoRA`, `model.lora`), so a
LoRA model is an ordinary model to everything that merges a graphdef with params (the judge,
tests): its forward adds scale * (y @ A) @ B to each targeted projection, unmerged. The
sampler instead decodes from `merged` weights, made once per rollout (`rollout_copier`):
measured faster on CPU than adding the low-rank product at every token (README, LoRA).

Why not qwix (its LoraProvider intercepts a Flax module's dot_general / einsum and finds the
weight by the module attribute its right operand is): this model keeps each projection
stacked over layers and applies it inside a `lax.scan` (and the MLP inside a custom_vjp), so
the operand qwix sees is a per-layer slice, not a module attribute, and the adapters it would
create there would be per call, not per layer. Restructuring the model into per-layer modules
to suit it would undo the one-layer compile of the scan; a low-rank delta on the stacked
params is a few lines.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models import transformer

KEY = "lora"  # the params' key of the adapters (the Transformer's `lora` attribute)
QUANTIZE_BASE = ("none",)  # config.model.lora.quantize_base values this build supports
QUANTIZE_BASE_PLANNED = ("int8", "nf4")
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj"


def enabled(lora_cfg) -> bool:
  """config.model.lora turns adapters on (rank > 0)."""
  return lora_cfg is not None and int(lora_cfg.rank) > 0


def targets(pattern: str) -> tuple[str, ...]:
  """The projections (transformer.LORA_TARGETABLE) whose names the regex fully matches."""
  regex = re.compile(pattern)
  return tuple(n for n in transformer.LORA_TARGETABLE if regex.fullmatch(n))


def attach(model: transformer.Transformer, lora_cfg, *, seed: int = 0
           ) -> transformer.Transformer:
  """`model` with fresh adapters (B = 0: the same function as before) on the projections that
  config.model.lora.targets names; unchanged when rank is 0. Adapters are fp32."""
  if not enabled(lora_cfg):
    return model
  model.lora = nnx.data(transformer.LoRA(model.cfg, targets(lora_cfg.targets),
                                         int(lora_cfg.rank), float(lora_cfg.alpha),
                                         rngs=nnx.Rngs(seed)))
  return model


def has_adapters(params) -> bool:
  """`params` (an nnx.State of a Transformer, or its shardings) hold adapters."""
  return isinstance(params, nnx.State) and KEY in params.raw_mapping


def split(params):
  """(trainable, frozen): with adapters, (the adapters' dict, the base's State); without,
  (params, None): everything trains."""
  if not has_adapters(params):
    return params, None
  raw = params.raw_mapping
  return raw[KEY], nnx.State({k: v for k, v in raw.items() if k != KEY})


def join(trainable, frozen):
  """The inverse of `split`."""
  if frozen is None:
    return trainable
  return nnx.State(dict(sorted({**frozen.raw_mapping, KEY: trainable}.items())))


def trainable(params):
  """What gets gradients and optimizer state: the adapters, or all of `params` without."""
  return split(params)[0]


def grad(loss_fn):
  """jax.grad(loss_fn, has_aux=True) with respect to `trainable(params)` only: the frozen base
  is a constant of the differentiation, so no gradient of its size is ever formed."""
  g = jax.grad(lambda t, frozen, *args, **kw: loss_fn(join(t, frozen), *args, **kw),
               has_aux=True)

  def grad_fn(params, *args, **kw):
    t, frozen = split(params)
    return g(t, frozen, *args, **kw)

  return grad_fn


def without_adapters(model: transformer.Transformer) -> transformer.Transformer:
  """The base model (the reference policy with beta != 0): the same module, adapters off."""
  model.lora = None
  return model


def merged(graphdef, params):
  """(graphdef, params) of the base model with the adapters folded into its weights,
  W + scale * A @ B per layer (fp32 sums, then the weight's dtype): the same function as the
  adapted model, without adapters. Call it under jit (the rollout copy, `merge_model`): it
  writes the merged weights into the module that nnx.merge builds from `params`."""
  model = nnx.merge(graphdef, params)
  adapters = model.lora
  if adapters is not None:
    for name in adapters.targets:
      a = getattr(adapters, f"{name}_lora_a")[...].astype(jnp.float32)
      b = getattr(adapters, f"{name}_lora_b")[...].astype(jnp.float32)
      weight = getattr(model, name)
      delta = adapters.scale * jnp.einsum("lir,lro->lio", a, b)
      weight[...] = (weight[...].astype(jnp.float32) + delta).astype(weight[...].dtype)
  return nnx.split(without_adapters(model))


def base_of(graphdef, params):
  """(graphdef, params) of the base alone: the adapted model's without its adapters (no copy)."""
  return nnx.split(without_adapters(nnx.merge(graphdef, params)))


def rollout_copier(graphdef, rollout_shardings, dtype):
  """params -> the sampler's copy of the base with the adapters merged in (`merged`), its
  matmul weights in `dtype`, laid out as `rollout_shardings` (of the base's params): one jitted
  program per rollout, as sampling.rollout_copier without LoRA. Sample it with `base_of`'s
  graphdef. Always a copy (the merged weights are new), dropped after the rollout."""
  from grpo_jax import sampling  # lazy: sampling is not needed to build a model

  return jax.jit(lambda params: sampling.cast_for_rollout(merged(graphdef, params)[1], dtype),
                 out_shardings=rollout_shardings)


def merge_model(model: transformer.Transformer) -> transformer.Transformer:
  """A plain model equal to `model` with its adapters merged (export, generate on a workdir);
  `model` itself when it has none."""
  if model.lora is None:
    return model
  graphdef, params = nnx.split(model)
  return nnx.merge(*jax.jit(merged, static_argnums=0)(graphdef, params))


# Where each projection sits in a Hugging Face Llama-family (Qwen, Gemma 3) decoder layer.
HF_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
              "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_peft(path: str, model: transformer.Transformer, base_model: str) -> str:
  """The adapters of `model` alone, in peft's LoRA format: `path`/adapter_config.json and
  adapter_model.safetensors (lora_A [r, in] and lora_B [out, r] per layer and projection,
  torch's [out, in] layout, so W + (alpha / r) B A is peft's merge). `base_model` is recorded
  as base_model_name_or_path. Written without peft (not a dependency); the test checks that
  these tensors merge into the same weights as our export, not that peft loads them."""
  import json
  import os

  import numpy as np
  from safetensors.numpy import save_file

  adapters = model.lora
  if adapters is None:
    raise ValueError("the model has no LoRA adapters (config.model.lora.rank = 0)")
  tensors = {}
  for name in adapters.targets:
    a = np.asarray(getattr(adapters, f"{name}_lora_a")[...], np.float32)  # [L, in, r]
    b = np.asarray(getattr(adapters, f"{name}_lora_b")[...], np.float32)  # [L, r, out]
    for i in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}.{name}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": adapters.rank, "lora_alpha": adapters.scale * adapters.rank,
            "lora_dropout": 0.0, "target_modules": list(adapters.targets), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False}
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return path


def count(tree) -> int:
  """Elements of a pytree's arrays."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
