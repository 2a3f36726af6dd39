"""`python -m grpo_jax.export`: a Hugging Face folder that transformers loads, as from Python."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from grpo_jax import cli, export, models
from grpo_jax.data import templates
from tests.conftest import write_tiny_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")


def run_export(*args):
  return subprocess.run([sys.executable, "-m", "grpo_jax.export", *args], env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def torch_logits(folder, ids):
  import torch
  from transformers import AutoModelForCausalLM

  hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(torch.tensor(ids)).logits.numpy()


def test_cli_exports_a_workdir_that_transformers_loads(tmp_path):
  workdir = write_tiny_workdir(tmp_path / "run")
  out = str(tmp_path / "hf")
  proc = run_export(f"--model={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == out + "\n"  # the folder alone: loading messages go to stderr

  from transformers import AutoTokenizer, GenerationConfig

  model, tokenizer = models.load(workdir)
  ids = np.asarray([tokenizer("What is 7 - 3? <answer>4</answer>")["input_ids"]])
  ours = np.asarray(models.jit_forward(model)(ids))
  theirs = torch_logits(out, ids)
  assert np.abs(ours - theirs).max() < 1e-4
  # The checkpoint's params, not the base model's: these differ by far more than the tolerance.
  base = np.asarray(models.jit_forward(models.load("tiny-random")[0])(ids))
  assert np.abs(base - theirs).max() > 0.1
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "float32"
  # Tokenizer and chat template: the same prompt ids through transformers alone.
  hf_tok = AutoTokenizer.from_pretrained(out)
  chat = [{"role": "user", "content": "What is 2 + 3?"}]
  assert hf_tok.chat_template == tokenizer.chat_template
  assert hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
      tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  generation = GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == list(templates.stop_ids(tokenizer)) == [tokenizer.eos_token_id]
  assert generation.pad_token_id == tokenizer.pad_token_id


def test_cli_bfloat16_writes_bf16_tensors(tmp_path):
  from safetensors import safe_open

  out = str(tmp_path / "bf16")
  proc = run_export("--model=tiny-random", f"--out={out}", "--dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  model, _ = models.load("tiny-random")
  from grpo_jax.models import checkpoints

  fp32 = checkpoints.params_to_hf(models.params_dict(model), model.cfg)
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    assert sorted(f.keys()) == sorted(fp32)
    for name in f.keys():
      tensor = f.get_tensor(name)
      assert tensor.dtype.name == "bfloat16", name
      np.testing.assert_array_equal(tensor, fp32[name].astype(tensor.dtype), err_msg=name)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  # transformers reads it, and bf16 rounding moves the logits only a little.
  ids = np.arange(3, 40)[None]
  diff = np.abs(np.asarray(models.jit_forward(model)(ids)) - torch_logits(out, ids)).max()
  assert 0 < diff < 0.05, diff


def test_generation_config_lists_eos_and_the_end_of_turn(tmp_path):
  """A chat template that closes each turn with its own special token: generation stops at it
  and at EOS, as our sampler does."""
  from transformers import GenerationConfig

  model, tokenizer = models.load("tiny-random")
  tokenizer.chat_template = (
      "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<unk>{% endfor %}"
      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  models.export(model, tokenizer, str(tmp_path))
  end_of_turn = tokenizer.convert_tokens_to_ids("<unk>")
  assert end_of_turn != tokenizer.eos_token_id
  eos = GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id
  assert sorted(eos) == sorted([tokenizer.eos_token_id, end_of_turn])


@pytest.mark.parametrize("argv,message", [
    (["--model=tiny-random"], "--out is required"),
    (["--model=tiny-random", "--out=OUT", "--dtype=float16"], "--dtype must be one of"),
    (["--model=tiny-random", "--out=FULL"], "is not empty"),
    (["--model=RUN", "--out=RUN", "--overwrite"], "--out must differ from --model"),
    (["--model=nowhere", "--out=OUT"], "unknown model"),
])
def test_bad_flags_fail_before_loading(argv, message, tmp_path):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "model.safetensors").write_text("stale")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  (tmp_path / "run" / "model.safetensors").write_text("")
  names = {"OUT": tmp_path / "new", "FULL": tmp_path / "full", "RUN": tmp_path / "run"}
  argv = [arg.split("=")[0] + "=" + str(names.get(arg.split("=")[-1], arg.split("=")[-1]))
          if "=" in arg else arg for arg in argv]
  cli.parse(argv, export.DEFAULTS, program="python -m grpo_jax.export")
  with pytest.raises(app.UsageError, match=message):
    export.check_flags()
  assert not (tmp_path / "new").exists()


def test_overwrite_writes_into_a_used_folder(tmp_path):
  (tmp_path / "notes.txt").write_text("kept")
  cli.parse(["--model=tiny-random", f"--out={tmp_path}", "--overwrite"], export.DEFAULTS)
  export.main(["export"])
  assert models.load(str(tmp_path))[0].cfg == models.load("tiny-random")[0].cfg
  assert (tmp_path / "notes.txt").read_text() == "kept"
