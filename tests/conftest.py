"""Shared fixtures. Tests run on CPU; real-model fixtures are loaded once per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


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

