"""Checkpoint import/export: Hugging Face folders and GGUF files <-> our params.

Our params (see transformer.py) are a flat dict of arrays with layer weights
stacked on a leading axis and kernels stored [in, out]. Hugging Face stores one
tensor per layer, [out, in]. GGUF (llama.cpp) uses its own tensor names and,
for the Llama architecture only, permutes the rows of q and k for its
interleaved RoPE; we undo that on import. For Gemma, llama.cpp stores each
RMSNorm weight as its scale 1 + w, where Hugging Face (and we) keep w: we
subtract 1 on import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from grpo_jax.models.transformer import ModelConfig, layer_param_names

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
_HF_ARCH_NAME = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

# our name -> Hugging Face per-layer name (format with the layer index).
_LAYER_NAMES = {
    "attn_norm": "model.layers.{}.input_layernorm.weight",
    "q_proj": "model.layers.{}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{}.post_attention_layernorm.weight",
    "gate_proj": "model.layers.{}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{}.mlp.up_proj.weight",
    "down_proj": "model.layers.{}.mlp.down_proj.weight",
}
# Gemma's four norms a layer: mlp_norm is the one before the MLP.
_SANDWICH_LAYER_NAMES = {
    "mlp_norm": "model.layers.{}.pre_feedforward_layernorm.weight",
    "post_attn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "post_mlp_norm": "model.layers.{}.post_feedforward_layernorm.weight",
}


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
  return {**_LAYER_NAMES, **_SANDWICH_LAYER_NAMES} if cfg.sandwich_norm else _LAYER_NAMES
_GLOBAL_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
_KERNELS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


# -- configs -------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict."""
  archs = hf.get("architectures") or []
  arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  if arch is None:
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma3_text": "gemma3"}.get(hf.get("model_type"))
  if arch is None:
    raise ValueError(
        f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
        f"{sorted(SUPPORTED_ARCHITECTURES)}")
  if arch == "gemma3":
    return _gemma3_config_from_hf(hf)
  if hf.get("use_sliding_window"):
    raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=true is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
  # transformers >= 5 nests RoPE settings under rope_parameters; older configs
  # use rope_theta and rope_scaling at the top level.
  rope = dict(hf.get("rope_parameters") or {})
  theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  rope_scaling = None
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
      raise ValueError(f"rope scaling {kind!r} is not supported; supported: None, 'llama3'")
    rope_scaling = tuple(
        (k, float(scaling[k])) for k in
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
  heads = hf["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
      qk_norm=arch == "qwen3",
      architecture=arch,
  )


def _gemma3_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """A Gemma3ForCausalLM (gemma3_text) config.json; defaults: transformers' Gemma3TextConfig."""
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(key) is not None:
      raise ValueError(f"{key}={hf[key]} is not supported")
  if hf.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention=true is not supported")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise ValueError(f"hidden_activation={act!r} is not supported; only 'gelu_pytorch_tanh'")
  layers = hf.get("num_hidden_layers", 26)
  types = hf.get("layer_types")
  if types is None:  # every sliding_window_pattern-th layer is global
    pattern = hf.get("sliding_window_pattern", 6)
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
  # transformers >= 5: rope_parameters per layer type; before: rope_theta, rope_local_base_freq
  # and rope_scaling (global layers only).
  rope = dict(hf.get("rope_parameters") or {})
  full, sliding = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
  theta = hf.get("rope_theta", full.get("rope_theta", 1_000_000.0))
  local_theta = hf.get("rope_local_base_freq", sliding.get("rope_theta", 10_000.0))
  scaling = hf.get("rope_scaling") or (full if full.get("rope_type", "default") != "default"
                                       else None)
  rope_scaling = None
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "linear":
      raise ValueError(f"Gemma 3 rope scaling {kind!r} is not supported; supported: 'linear'")
    rope_scaling = (("factor", float(scaling["factor"])),)
  if sliding.get("rope_type", "default") != "default":
    raise ValueError("RoPE scaling of the sliding-window layers is not supported")
  heads = hf.get("num_attention_heads", 8)
  return ModelConfig(
      vocab_size=hf.get("vocab_size", 262_208), hidden_size=hf.get("hidden_size", 2304),
      intermediate_size=hf.get("intermediate_size", 9216), num_layers=layers, num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads", 4), head_dim=hf.get("head_dim", 256),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
      rope_scaling=rope_scaling, max_position_embeddings=hf.get("max_position_embeddings", 131_072),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      attention_bias=bool(hf.get("attention_bias", False)), qk_norm=True, architecture="gemma3",
      sliding_window=int(hf.get("sliding_window") or 4096), layer_types=tuple(types),
      rope_local_theta=float(local_theta),
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      hidden_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=True)


def _int_if_whole(x: float) -> float | int:  # transformers' Gemma 3 config wants an int
  return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig, **extra) -> dict[str, Any]:
  hf = {
      "architectures": [_HF_ARCH_NAME[cfg.architecture]],
      "model_type": cfg.architecture,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": (dict(cfg.rope_scaling_dict, rope_type="llama3")
                       if cfg.rope_scaling else None),
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "hidden_act": "silu",
      "attention_bias": cfg.attention_bias,
      "torch_dtype": "float32",
  }
  if cfg.architecture == "llama":
    hf["mlp_bias"] = False
  if cfg.architecture == "gemma3":
    # Written the pre-5 way (rope_theta, rope_local_base_freq, rope_scaling); transformers 5
    # turns them into its rope_parameters.
    hf.update(model_type="gemma3_text", hidden_activation=cfg.hidden_act,
              sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types or ()),
              rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
              query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
              final_logit_softcapping=None, attn_logit_softcapping=None,
              rope_scaling=(dict(rope_type="linear", factor=cfg.rope_scaling_dict["factor"])
                            if cfg.rope_scaling else None))
    del hf["hidden_act"]
  hf.update({k: v for k, v in extra.items() if v is not None})
  return hf


# -- params ----------------------------------------------------------------------
def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Hugging Face state dict (numpy) -> our flat params dict."""
  missing = []

  def get(name):
    if name not in tensors:
      missing.append(name)
      return None
    return np.asarray(tensors[name], dtype=np.float32)

  params = {}
  names = _layer_names(cfg)
  for ours in layer_param_names(cfg):
    layers = [get(names[ours].format(i)) for i in range(cfg.num_layers)]
    if not missing:
      stacked = np.stack(layers)
      params[ours] = np.swapaxes(stacked, 1, 2) if ours in _KERNELS else stacked
  params["embed"] = get(_GLOBAL_NAMES["embed"])
  params["final_norm"] = get(_GLOBAL_NAMES["final_norm"])
  if not cfg.tie_word_embeddings:
    head = get(_GLOBAL_NAMES["lm_head"])
    params["lm_head"] = None if head is None else head.T
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
  return params


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> Hugging Face state dict of contiguous fp32 numpy arrays."""
  out = {}
  names = _layer_names(cfg)
  for ours in layer_param_names(cfg):
    stacked = np.asarray(params[ours], dtype=np.float32)
    for i in range(cfg.num_layers):
      w = stacked[i].T if ours in _KERNELS else stacked[i]
      out[names[ours].format(i)] = np.ascontiguousarray(w)
  out[_GLOBAL_NAMES["embed"]] = np.asarray(params["embed"], np.float32)
  out[_GLOBAL_NAMES["final_norm"]] = np.asarray(params["final_norm"], np.float32)
  if not cfg.tie_word_embeddings:
    out[_GLOBAL_NAMES["lm_head"]] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
  return out


# -- Hugging Face folders ------------------------------------------------------------
def read_hf_folder(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads config.json and model.safetensors (or the sharded files of its index)."""
  from safetensors.numpy import load_file

  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint folder needs "
                            "config.json and *.safetensors")
  with open(config_path) as f:
    cfg = config_from_hf(json.load(f))
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path} "
        "(PyTorch .bin checkpoints are not read: convert them with transformers' save_pretrained)")
  tensors = {}
  for name in files:
    # bf16 tensors come back as ml_dtypes.bfloat16 numpy arrays; params_from_hf casts.
    tensors.update(load_file(os.path.join(path, name)))
  return cfg, params_from_hf(tensors, cfg)


EXPORT_DTYPES = ("float32", "bfloat16")


def write_hf_folder(path: str, cfg: ModelConfig, params: dict[str, Any], tokenizer=None,
                    dtype: str = "float32") -> None:
  """Writes config.json, model.safetensors and, with a tokenizer, its files (chat template
  included) and generation_config.json.

  Args:
    dtype: the stored tensors' dtype, one of EXPORT_DTYPES ("bfloat16" halves the folder;
      config.json's torch_dtype says which).
  """
  from safetensors.numpy import save_file

  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}; got {dtype!r}")
  os.makedirs(path, exist_ok=True)
  extra = {}
  if tokenizer is not None:
    extra = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, torch_dtype=dtype, **extra), f, indent=2)
  tensors = params_to_hf(params, cfg)
  if dtype == "bfloat16":
    import ml_dtypes  # a JAX dependency; numpy has no bfloat16 of its own

    tensors = {name: t.astype(ml_dtypes.bfloat16) for name, t in tensors.items()}
  tmp = os.path.join(path, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(path, "model.safetensors"))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
    write_generation_config(path, tokenizer)


def write_generation_config(path: str, tokenizer) -> None:
  """generation_config.json with our stop tokens (EOS and the chat template's end of turn), so
  transformers' and vLLM's generate stop where our sampler stops."""
  from transformers import GenerationConfig

  from grpo_jax.data.templates import stop_ids

  GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=list(stop_ids(tokenizer)),
                   pad_token_id=tokenizer.pad_token_id).save_pretrained(path)


# -- GGUF ------------------------------------------------------------------------
_GGUF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
_GGUF_GEMMA_LAYER = {  # Gemma's ffn_norm is the norm before the MLP
    "ffn_norm": "pre_feedforward_layernorm.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# llama.cpp's Gemma 3 constants, not in the file's metadata: every 6th layer is global, local
# layers use RoPE base 10000.
_GGUF_GEMMA3_PATTERN, _GGUF_GEMMA3_LOCAL_THETA = 6, 10_000.0


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (interleaved -> half-split RoPE)."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_gguf_tokenizer(path: str):
  """The tokenizer of a GGUF file (a transformers fast tokenizer with its chat template), built
  without PyTorch.

  transformers 5 reads a GGUF's metadata with a reader that imports torch; the run does not
  need torch otherwise, so we read the metadata with the gguf package and hand it to the same
  conversion transformers uses (tests/models_test.py checks the ids against AutoTokenizer).
  Returns None when this transformers has no such conversion (callers use AutoTokenizer).
  """
  import gguf

  try:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
  except ImportError:
    return None
  reader = gguf.GGUFReader(path)
  meta = {key: field.contents() for key, field in reader.fields.items()
          if key.startswith("tokenizer.") or key == "general.architecture"}
  grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                     if f"tokenizer.{key}" in meta}
             for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
  for name, key in mapping._SPECIAL_TOKENS.items():  # bos_token: its text, from its id
    token_id = meta.get(f"tokenizer.ggml.{key}")
    config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  backend, extra = mapping.convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads and dequantises a GGUF file of a Llama / Qwen2 / Qwen3 / Gemma 3 model."""
  reader, cfg = _gguf_reader_config(path)
  tensors = _gguf_tensors(reader, path, cfg)
  if cfg.architecture == "gemma3":
    for name in tensors:  # llama.cpp's (1 + w) back to w
      if name.endswith("norm.weight"):
        tensors[name] = tensors[name] - 1.0
  return cfg, params_from_hf(tensors, cfg)


def gguf_config(path: str) -> ModelConfig:
  """The ModelConfig of a GGUF file from its metadata alone (no tensor is read)."""
  return _gguf_reader_config(path)[1]


def _gguf_reader_config(path: str) -> tuple[Any, ModelConfig]:
  """(the file's gguf.GGUFReader, its model's ModelConfig); clear errors for what is not
  supported."""
  import gguf

  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, TypeError) as e:  # gguf's parser has no error class
    raise ValueError(f"{path} is not a readable GGUF file ({e}); check that the download is "
                     "complete, or point at another file") from None
  arch = _gguf_field(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {GGUF_ARCHITECTURES}")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError("GGUF files with rope_freqs (Llama 3.1 RoPE scaling) are not supported; "
                     "load the Hugging Face checkpoint folder instead")
  g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
  heads, kv_heads, d = g("attention.head_count"), g("attention.head_count_kv"), g("embedding_length")
  vocab = g("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
  if arch == "gemma3":
    return reader, _gemma3_gguf_config(names, g, int(vocab))
  return reader, ModelConfig(
      vocab_size=int(vocab), hidden_size=int(d), intermediate_size=int(g("feed_forward_length")),
      num_layers=int(g("block_count")), num_heads=int(heads), num_kv_heads=int(kv_heads or heads),
      head_dim=int(g("attention.key_length") or d // heads),
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      max_position_embeddings=int(g("context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      attention_bias=arch == "qwen2", qk_norm=arch == "qwen3", architecture=arch)


def _gemma3_gguf_config(names, g, vocab) -> ModelConfig:
  heads, layers = int(g("attention.head_count")), int(g("block_count"))
  scaling = None
  if g("rope.scaling.type") not in (None, "none"):
    if g("rope.scaling.type") != "linear":
      raise ValueError(f"Gemma 3 rope scaling {g('rope.scaling.type')!r} is not supported")
    scaling = (("factor", float(g("rope.scaling.factor"))),)
  head_dim = int(g("attention.key_length"))
  return ModelConfig(
      vocab_size=vocab, hidden_size=int(g("embedding_length")),
      intermediate_size=int(g("feed_forward_length")), num_layers=layers, num_heads=heads,
      num_kv_heads=int(g("attention.head_count_kv") or heads), head_dim=head_dim,
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(g("rope.freq_base", 1_000_000.0)), rope_scaling=scaling,
      max_position_embeddings=int(g("context_length", 32768)),
      tie_word_embeddings="output.weight" not in names, qk_norm=True, architecture="gemma3",
      sliding_window=int(g("attention.sliding_window")),
      layer_types=tuple("sliding_attention" if (i + 1) % _GGUF_GEMMA3_PATTERN else
                        "full_attention" for i in range(layers)),
      rope_local_theta=_GGUF_GEMMA3_LOCAL_THETA, query_pre_attn_scalar=float(head_dim),
      hidden_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=True)


def _gguf_tensors(reader, path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The file's tensors, dequantised to fp32, under Hugging Face's names."""
  import gguf

  layer_names = {**_GGUF_LAYER, **_GGUF_GEMMA_LAYER} if cfg.sandwich_norm else _GGUF_LAYER
  arch = cfg.architecture
  tensors = {}
  for t in reader.tensors:
    if t.name in _GGUF_GLOBAL:
      hf_name = _GGUF_GLOBAL[t.name]
    else:
      # blk.N.attn_q.weight -> "attn_q"; blk.N.attn_q.bias -> "attn_q.bias"
      _, layer, rest = t.name.split(".", 2) if t.name.startswith("blk.") else ("", "", t.name)
      key = rest.removesuffix(".weight")
      if not layer or key not in layer_names:
        raise ValueError(f"unexpected tensor {t.name!r} in {path}")
      hf_name = f"model.layers.{layer}.{layer_names[key]}"
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      supported = sorted(q.name for q in gguf.GGMLQuantizationType
                         if q in getattr(gguf.quants, "_type_traits", {}) or q.name in ("F32", "F16", "BF16"))
      raise ValueError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which cannot be "
                       f"dequantised; supported: {supported}") from e
    w = np.asarray(w, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      w = _unpermute_qk(w, cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads)
    tensors[hf_name] = w
  return tensors
