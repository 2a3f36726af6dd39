"""Model shapes of public checkpoints, for ahead-of-time compilation without the weights.

`python -m grpo_jax.aot` compiles a run's programs from shapes alone; these
presets give the shapes of the checkpoints we load, as the fields of each
model's Hugging Face config.json (the source column). A folder holding just a
config.json works as well (`shapes("path/to/folder")`).

| preset | layers | hidden | MLP | heads / kv | vocab | tied | source (config.json of) |
|---|---|---|---|---|---|---|---|
| qwen2.5-0.5b | 24 | 896 | 4864 | 14 / 2 | 151936 | yes | Qwen/Qwen2.5-0.5B-Instruct |
| qwen2.5-1.5b | 28 | 1536 | 8960 | 12 / 2 | 151936 | yes | Qwen/Qwen2.5-1.5B-Instruct |
| qwen2.5-7b | 28 | 3584 | 18944 | 28 / 4 | 152064 | no | Qwen/Qwen2.5-7B-Instruct |
| qwen3-0.6b | 28 | 1024 | 3072 | 16 / 8 (head 128) | 151936 | yes | Qwen/Qwen3-0.6B |
| qwen3-1.7b | 28 | 2048 | 6144 | 16 / 8 (head 128) | 151936 | yes | Qwen/Qwen3-1.7B |
| qwen3-4b | 36 | 2560 | 9728 | 32 / 8 (head 128) | 151936 | yes | Qwen/Qwen3-4B |
| qwen3-8b | 36 | 4096 | 12288 | 32 / 8 (head 128) | 151936 | no | Qwen/Qwen3-8B |
| llama-3.2-1b | 16 | 2048 | 8192 | 32 / 8 (head 64) | 128256 | yes | meta-llama/Llama-3.2-1B-Instruct |
| llama-3.2-3b | 28 | 3072 | 8192 | 24 / 8 (head 128) | 128256 | yes | meta-llama/Llama-3.2-3B-Instruct |
| llama-3.1-8b | 32 | 4096 | 14336 | 32 / 8 (head 128) | 128256 | no | meta-llama/Llama-3.1-8B-Instruct |
| gemma3-1b | 26 | 1152 | 6912 | 4 / 1 (head 256) | 262144 | yes | google/gemma-3-1b-it |
| gemma3-4b | 34 | 2560 | 10240 | 8 / 4 (head 256) | 262208 | yes | google/gemma-3-4b-it (text) |
| gemma3-12b | 48 | 3840 | 15360 | 16 / 8 (head 256) | 262208 | yes | google/gemma-3-12b-it (text) |

Gemma 3: every 6th layer global, the others local with a sliding window of 512
(1B) or 1024 (4B, 12B); RoPE base 1e6 global (4B, 12B: linear scaling by 8),
1e4 local; query_pre_attn_scalar 256. The 4B and 12B are multimodal
checkpoints: these are the shapes of their language model alone.
"""

from __future__ import annotations

import json
import os

from grpo_jax.models.checkpoints import config_from_hf
from grpo_jax.models.transformer import ModelConfig


def _qwen2(layers, hidden, mlp, heads, kv, vocab=151936, tied=True):
  return {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": layers,
          "hidden_size": hidden, "intermediate_size": mlp, "num_attention_heads": heads,
          "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied,
          "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}


def _qwen3(layers, hidden, mlp, tied=True):
  return {"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": layers,
          "hidden_size": hidden, "intermediate_size": mlp, "num_attention_heads": 32 if
          hidden >= 2560 else 16, "num_key_value_heads": 8, "head_dim": 128,
          "vocab_size": 151936, "tie_word_embeddings": tied, "rope_theta": 1000000.0,
          "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}


def _llama3(layers, hidden, mlp, heads, head_dim, tied, factor):
  return {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
          "hidden_size": hidden, "intermediate_size": mlp, "num_attention_heads": heads,
          "num_key_value_heads": 8, "head_dim": head_dim, "vocab_size": 128256,
          "tie_word_embeddings": tied, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072,
          "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def _gemma3(layers, hidden, mlp, heads, kv, window, vocab, linear_rope):
  return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
          "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": mlp,
          "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 256,
          "vocab_size": vocab, "tie_word_embeddings": True, "rope_theta": 1000000.0,
          "rope_local_base_freq": 10000.0, "sliding_window": window, "sliding_window_pattern": 6,
          "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
          "hidden_activation": "gelu_pytorch_tanh",
          "max_position_embeddings": 131072 if linear_rope else 32768,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0} if linear_rope else None}


PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": _qwen2(24, 896, 4864, 14, 2),
    "qwen2.5-1.5b": _qwen2(28, 1536, 8960, 12, 2),
    "qwen2.5-7b": _qwen2(28, 3584, 18944, 28, 4, vocab=152064, tied=False),
    "qwen3-0.6b": _qwen3(28, 1024, 3072),
    "qwen3-1.7b": _qwen3(28, 2048, 6144),
    "qwen3-4b": _qwen3(36, 2560, 9728),
    "qwen3-8b": _qwen3(36, 4096, 12288, tied=False),
    "llama-3.2-1b": _llama3(16, 2048, 8192, 32, 64, True, 32.0),
    "llama-3.2-3b": _llama3(28, 3072, 8192, 24, 128, True, 32.0),
    "llama-3.1-8b": _llama3(32, 4096, 14336, 32, 128, False, 8.0),
    "gemma3-1b": _gemma3(26, 1152, 6912, 4, 1, 512, 262144, False),
    "gemma3-4b": _gemma3(34, 2560, 10240, 8, 4, 1024, 262208, True),
    "gemma3-12b": _gemma3(48, 3840, 15360, 16, 8, 1024, 262208, True),
}


def shapes(name_or_path: str) -> ModelConfig:
  """The ModelConfig of a preset name, of a folder's (or file's) config.json, or of a GGUF
  model's metadata (a known name such as "smollm2-135m-instruct", or a .gguf path); no
  weights."""
  if name_or_path == "tiny-random":
    from grpo_jax.models import tiny

    return tiny.config(tiny.vocab_size())
  if name_or_path in PRESETS:
    return config_from_hf(PRESETS[name_or_path])
  from grpo_jax import models  # (it imports this module)

  gguf = {**models.EMBEDDED_GGUF, **models.CHUNKED_GGUF}
  if name_or_path in gguf or name_or_path.endswith(".gguf"):
    from grpo_jax.models import checkpoints

    return checkpoints.gguf_config(models.resolve(name_or_path)[1])
  path = name_or_path
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"no model shapes for {name_or_path!r}: give a preset "
                     f"({', '.join(sorted(PRESETS))}) or a folder with a Hugging Face config.json")
  with open(path) as f:
    return config_from_hf(json.load(f))
