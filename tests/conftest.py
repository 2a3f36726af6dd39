"""Shared fixtures. Tests run on CPU; real-model fixtures are loaded once per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: a multi-process, multi-device or restart end-to-end run, or a parity "
      "test of the 270M Gemma (minutes); the README's test command leaves these out "
      "(-m 'not slow'), .ci/run runs them as a second job")


@pytest.fixture(scope="session")
def smollm2():
  """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32."""
  from grpo_jax import models

  return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_torch():
  """The same GGUF loaded by transformers on PyTorch: the independent reference."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from grpo_jax import models

  path = models.embedded_gguf_path("smollm2-135m-instruct")
  folder, name = os.path.split(path)
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return model, tokenizer


# Gemma 3 parity runs with this sliding window (the 270M's is 512): short texts then cross it.
GEMMA3_TEST_WINDOW = 16


@pytest.fixture(scope="session")
def gemma3():
  """(model, tokenizer) of the embedded Gemma 3 270M (GGUF, Q4_K_M dequantised), fp32."""
  from grpo_jax import models

  return models.load("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_torch(gemma3):
  """(ours, reference) with sliding window GEMMA3_TEST_WINDOW: our model, and transformers'
  Gemma3ForCausalLM on PyTorch holding the same (dequantised) weights."""
  import dataclasses

  import numpy as np
  import torch
  import transformers

  from grpo_jax import models
  from grpo_jax.models import checkpoints

  model = gemma3[0]
  cfg = dataclasses.replace(model.cfg, sliding_window=GEMMA3_TEST_WINDOW)
  params = models.params_dict(model)
  ours = models.model_from_params(cfg, params)
  hf_cfg = transformers.Gemma3TextConfig.from_dict(checkpoints.config_to_hf(cfg))
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  ref = transformers.Gemma3ForCausalLM(hf_cfg)
  state = checkpoints.params_to_hf({k: np.asarray(v) for k, v in params.items()}, cfg)
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}  # writable copies
  missing, unexpected = ref.load_state_dict(tensors, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()  # tied
  return ours, ref.eval()



def write_tiny_workdir(path, template="chat", noise=0.5, seed=0):
  """A training workdir as train.py leaves one, without training: config.json naming the tiny
  model and a task template, and one checkpoint of tiny-random's params plus noise (so a reader
  that ignored the checkpoint would show)."""
  import json

  import numpy as np
  from flax import nnx

  from grpo_jax import checkpointing, models

  model, _ = models.load("tiny-random")
  _, params = nnx.split(model)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: x + noise * rng.standard_normal(x.shape).astype(x.dtype), params)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model": {"name": "tiny-random", "dtype": "float32"},
               "task": {"name": "arithmetic", "template": template}}, f)
  with checkpointing.run_checkpointer(path) as ckpt:
    ckpt.save(1, {"params": params, "opt_state": {"count": np.zeros((), np.int32)}})
  return str(path)
