"""Every config in configs/ validates; the real-scale one runs a step on a tiny Qwen2 folder."""

import glob
import json
import os
import re

import numpy as np
import pytest

from grpo_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  return config_lib.from_file(os.path.join(ROOT, "configs", name), arg)


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in
                                        glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_config_validates_and_documents_its_command(name, tmp_path):
  with open(os.path.join(ROOT, "configs", name)) as f:
    assert "python -m grpo_jax.main --config=configs/" + name in f.read()
  cfg = load_config(name, "/some/checkpoint" if "qwen" in name else None)
  if cfg.task.name == "jsonl" and not cfg.task.kwargs.get("path"):  # a file of the user's
    with pytest.raises(config_lib.ConfigError, match="--config.task.kwargs.path=FILE.jsonl"):
      config_lib.validate(cfg)
    cfg.task.kwargs.path = write_rows(tmp_path / "train.jsonl", cfg.task.kwargs.prompt_key)
    cfg.task.kwargs.eval_path = write_rows(tmp_path / "test.jsonl", cfg.task.kwargs.prompt_key)
  config_lib.validate(cfg)


@pytest.mark.parametrize("sft, grpo", [("smollm2_sft.py", "smollm2_arithmetic.py"),
                                       ("tiny_sft.py", "tiny_arithmetic.py")])
def test_sft_configs_train_the_model_and_task_of_their_grpo_run(sft, grpo):
  s, g = load_config(sft), load_config(grpo)
  assert (s.mode, g.mode) == ("sft", "grpo")
  assert s.task.to_dict() == g.task.to_dict() and s.model.to_dict() == g.model.to_dict()


def test_every_key_has_a_meaning_and_a_row_in_docs_config_md():
  """--print_config's meanings and docs/config.md's tables cover exactly the schema's keys."""
  keys = config_lib._flat_keys(config_lib.defaults())
  meanings = config_lib.meanings()
  assert set(meanings) == keys
  assert all(m.strip() and "\n" not in m for m in meanings.values())
  with open(os.path.join(ROOT, "docs", "config.md")) as f:
    documented = re.findall(r"^\| `([a-z_.]+)` \|", f.read(), re.MULTILINE)
  assert sorted(documented) == sorted(keys)  # each once, none stale


@pytest.mark.parametrize("value", [-1, True])
def test_attention_block_must_be_a_count(value):
  cfg = load_config("tiny_arithmetic.py")
  cfg.model.attention_block = 0  # never blocked: valid
  config_lib.validate(cfg)
  cfg.model.attention_block = value  # (a float is refused by ml_collections itself)
  with pytest.raises(config_lib.ConfigError, match="config.model.attention_block=.* must be an "
                     "integer >= 0"):
    config_lib.validate(cfg)


def test_from_file_needs_a_python_config():
  with pytest.raises(config_lib.ConfigError, match="README.md: not a Python config file"):
    config_lib.from_file(os.path.join(ROOT, "configs", "README.md"))


def write_rows(path, prompt_key, n=60):
  with open(path, "w") as f:
    f.writelines(json.dumps({prompt_key: f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                 for i in range(n))
  return str(path)


def test_real_scale_config_without_a_folder_has_shapes_but_no_weights():
  """Without its argument the config names a shape preset: enough for grpo_jax.aot, while
  loading it for training says which folder to give."""
  from grpo_jax import models
  from grpo_jax.models import presets

  cfg = load_config("qwen25_gsm8k.py")
  assert presets.shapes(cfg.model.name).num_layers == 28
  with pytest.raises(ValueError, match="checkpoint folder"):
    models.load(cfg.model.name)


@pytest.mark.slow  # ~40 s: a full CLI or multi-step run (the slow job)
def test_real_scale_config_runs_a_step_on_a_tiny_qwen2(tmp_path):
  import torch
  import transformers

  from grpo_jax import train
  from grpo_jax.models import tiny

  tokenizer = tiny.tokenizer()
  folder = str(tmp_path / "qwen")
  torch.manual_seed(0)
  transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      tie_word_embeddings=True)).save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  cfg = load_config("qwen25_gsm8k.py", folder)
  cfg.task.kwargs.path = write_rows(tmp_path / "train.jsonl", "question")
  cfg.task.kwargs.eval_path = write_rows(tmp_path / "test.jsonl", "question")
  cfg.opt.learning_rate, cfg.opt.warmup_steps = 1e-2, 0  # move it visibly: the KL must show
  cfg.rewards = [("accuracy", 1.0), ("tag_count", 1.0)]  # a random model never answers right
  cfg.task.template = "plain"
  cfg.rl.max_prompt_length, cfg.rl.max_completion_length = 32, 8
  cfg.train.steps, cfg.train.prompts_per_step, cfg.train.grad_accum_steps = 2, 4, 2
  cfg.eval.num_problems, cfg.eval.prompts_per_batch = 4, 4
  records = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in steps)
  assert steps[-1]["kl"] > 0  # beta = 0.04: the reference forward ran and the policy moved
  assert "eval/pass@1" in records[-1]


def test_gemma3_config_presets_pick_task_and_reward():
  countdown = load_config("gemma3_arithmetic.py", "countdown")
  config_lib.validate(countdown)
  assert (countdown.task.name, countdown.eval.reward, countdown.task.template) == (
      "countdown", "countdown", "r1_zero")
  assert dict(countdown.rewards)["countdown"] == 1.0
  assert load_config("gemma3_arithmetic.py").task.name == "arithmetic"
  with pytest.raises(ValueError, match="use one of .*countdown"):
    load_config("gemma3_arithmetic.py", "gsm8k")


@pytest.mark.parametrize("changes,match", [
    (dict(delta=1.1), r"config.rl.delta=1.1 must be > 1 \+ epsilon_high = 1.2"),
    (dict(delta=4.0, loss_type="sapo"), r"config.rl.delta=4.0 caps .* not 'sapo'"),
    (dict(top_entropy_quantile=1.5), r"config.rl.top_entropy_quantile=1.5 must be in \[0, 1\]"),
    (dict(rollout_correction="tis"), r"config.rl.rollout_correction='tis'; expected one of"),
    (dict(rollout_correction_threshold=0.5), "rollout_correction_threshold=0.5 must be >= 1"),
    (dict(rollout_correction="token_mask", num_iterations=2), "needs config.rl.num_iterations"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg=0.0 must be > 0"),
    (dict(gmpo_epsilon=-1.0), "config.rl.gmpo_epsilon=-1.0 must be > 0"),
    (dict(loss_type="gmpo", importance_sampling_level="sequence"),
     "set config.rl.importance_sampling_level='token'"),
    (dict(stop_strings=(3,)), r"config.rl.stop_strings=\(3,\) must be a tuple of non-empty"),
    (dict(stop_strings=("\n", "")), "must be a tuple of non-empty strings"),
])
def test_loss_options_are_checked_at_start_up(changes, match):
  cfg = load_config("tiny_arithmetic.py")
  for key, value in changes.items():
    cfg.rl[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(cfg, data=False)


def test_loss_options_reach_the_loss_by_name():
  from grpo_jax import grpo

  cfg = load_config("tiny_arithmetic.py")
  changes = dict(loss_type="cispo", use_bias_correction_kl=True, entropy_coef=0.01,
                 top_entropy_quantile=0.2, rollout_correction="sequence_mask",
                 rollout_correction_threshold=3.0, sapo_temperature_pos=2.0,
                 sapo_temperature_neg=3.0, gmpo_epsilon=0.3)
  for key, value in changes.items():
    cfg.rl[key] = value
  config_lib.validate(cfg, data=False)
  kwargs = grpo.loss_config_from(cfg.rl).kwargs
  assert {k: kwargs[k] for k in changes} == changes
  cfg.rl.loss_type, cfg.rl.delta = "dapo", 4.0
  config_lib.validate(cfg, data=False)
  assert grpo.loss_config_from(cfg.rl).kwargs["delta"] == 4.0
