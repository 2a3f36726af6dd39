"""Export a model as a Hugging Face folder that transformers, vLLM or llama.cpp's converter load.

    python -m grpo_jax.export --model=runs/smollm2_arithmetic --out=out/smollm2_arithmetic
    python -m grpo_jax.export --model=smollm2-135m-instruct --out=out/smollm2 --dtype=bfloat16

--model: a training workdir (its latest checkpoint), a known name, a Hugging
Face checkpoint folder or a .gguf file. --out gets config.json,
model.safetensors, the tokenizer with its chat template, and
generation_config.json whose eos_token_id lists the tokens our sampler stops at
(EOS and the chat template's end of turn). --dtype is the stored tensors'
dtype: float32 (the default: the training params as they are) or bfloat16
(half the size). --out must be empty or new, unless --overwrite. Prints the
folder on stdout. A LoRA run's workdir exports with its adapters merged into the
base; --adapters also writes the adapters alone in peft's format to OUT/adapter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from absl import app, flags

from grpo_jax import cli

_OUT = flags.DEFINE_string("out", None, "the folder to write (required; empty or new)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "write into a folder that has files already")
_ADAPTERS = flags.DEFINE_bool("adapters", False, "a LoRA workdir: also write its adapters alone "
                              "in peft's format to OUT/adapter (adapter_config.json, "
                              "adapter_model.safetensors)")
for _name in ("model", "dtype"):
  flags.declare_key_flag(_name)

# The shared --dtype is the compute dtype elsewhere; here it is the stored tensors' dtype, and
# float32 keeps the params exactly (a workdir's bf16 compute setting must not round them).
DEFAULTS = {"dtype": "float32"}
DTYPES = ("float32", "bfloat16")


def check_flags() -> None:
  """The flags, checked before the model loads."""
  cli.require(cli.MODEL, _OUT)
  if cli.DTYPE.value not in DTYPES:
    raise app.UsageError(f"--dtype must be one of {list(DTYPES)}; got {cli.DTYPE.value!r}")
  out = _OUT.value
  if os.path.exists(out) and not os.path.isdir(out):
    raise app.UsageError(f"--out={out} is a file, not a folder")
  # Leftovers of an earlier export (another shard layout, a stale index) would be read back
  # instead of the new weights.
  if os.path.isdir(out) and os.listdir(out) and not _OVERWRITE.value:
    raise app.UsageError(f"--out={out} is not empty; choose a new folder or pass --overwrite")
  kind = cli.model_kind(cli.MODEL.value)
  if _ADAPTERS.value and kind != "workdir":
    raise app.UsageError(f"--adapters needs a LoRA training workdir as --model; "
                         f"{cli.MODEL.value!r} is not a workdir")
  if kind in ("workdir", "hf") and os.path.realpath(out) == os.path.realpath(cli.MODEL.value):
    raise app.UsageError(f"--out must differ from --model ({out})")


def main(argv):
  cli.no_arguments(argv)
  check_flags()
  for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Libraries print while loading; stdout carries only the folder written.
  with contextlib.redirect_stdout(sys.stderr):
    from grpo_jax import models

    print(f"[export] loading {cli.MODEL.value}")
    # Params load as fp32 whatever --dtype says: the cast happens once, on writing.
    model, tokenizer = models.load(cli.MODEL.value, dtype="float32")
    models.export(model, tokenizer, _OUT.value, dtype=cli.DTYPE.value)
    print(f"[export] wrote {cli.DTYPE.value} weights, config, tokenizer and generation config")
    if _ADAPTERS.value:
      from grpo_jax import lora

      adapted, _ = models.load_workdir_adapted(cli.MODEL.value, dtype="float32")
      if adapted.lora is None:
        raise app.UsageError(f"--adapters: {cli.MODEL.value} trained without LoRA "
                             "(config.model.lora.rank = 0): it has no adapters")
      with open(os.path.join(cli.MODEL.value, "config.json")) as f:
        base = json.load(f)["model"]["name"]
      lora.write_peft(os.path.join(_OUT.value, "adapter"), adapted, base)
      print("[export] wrote the LoRA adapters in peft's format to adapter/")
  print(_OUT.value, flush=True)


if __name__ == "__main__":
  cli.run(main, DEFAULTS)
