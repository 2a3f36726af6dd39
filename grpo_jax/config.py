"""The config schema: every key with its default, and start-up validation.

Experiment files in configs/ start from `defaults()` and change what they
need; `validate` rejects unknown keys (with the closest known one) and bad
values before any model is loaded or step is run. Names follow TRL's GRPOConfig
where it has one.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

from grpo_jax import advantages, losses, rewards
from grpo_jax.data import TASKS, TEMPLATES


MODES = ("grpo", "sft")


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "grpo"  # "grpo" (train.py) | "sft": supervised fine-tuning on config.sft (sft.py)

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # known name, HF folder, or .gguf path
  c.model.dtype = "float32"  # matmul operand dtype ("bfloat16" on accelerators)

  c.task = ml_collections.ConfigDict()
  c.task.name = "arithmetic"
  c.task.template = "chat"  # "chat" | "r1_zero" | "plain"
  c.task.kwargs = ml_collections.ConfigDict()  # task difficulty knobs and seed

  c.rl = ml_collections.ConfigDict()
  c.rl.num_generations = 8  # G, completions per prompt
  c.rl.beta = 0.04  # KL coefficient (0: no reference model)
  c.rl.epsilon = 0.2
  c.rl.epsilon_high = ml_collections.FieldReference(None, field_type=float)
  c.rl.loss_type = "grpo"  # grpo | bnpo | dapo | dr_grpo
  c.rl.kl_estimator = "k3"
  c.rl.scale_rewards = "group"  # group | batch | none
  c.rl.num_iterations = 1  # updates per rollout (mu)
  c.rl.importance_sampling_level = "token"  # token | sequence (GSPO)
  c.rl.max_prompt_length = 128
  c.rl.max_completion_length = 128
  c.rl.temperature = 1.0
  c.rl.top_p = 1.0
  c.rl.top_k = 0
  c.rl.mask_truncated_completions = False  # DAPO: no loss on completions cut at the limit

  c.rewards = [("accuracy", 1.0), ("format", 0.5)]

  # LLM-as-judge reward ("judge" in config.rewards): a model ranks each group's G answers.
  c.judge = ml_collections.ConfigDict()
  c.judge.model = "policy"  # "policy" (the current params) or anything models.load reads
  c.judge.template = "chat"  # how the judging prompt is written: "chat" | "plain"

  # Supervised fine-tuning (mode "sft"; cold start, distillation). Batches of
  # train.prompts_per_step rows; prompts under task.template; the task's eval as in GRPO.
  c.sft = ml_collections.ConfigDict()
  c.sft.path = ""  # JSONL: {"prompt", "completion"} or {"messages": [..., assistant turn]} a line
  c.sft.eval_path = ""  # optional held-out JSONL of the same form: eval/loss at evaluations
  c.sft.epochs = 0.0  # > 0: this many passes over the data (instead of train.steps)
  c.sft.max_length = 1024  # tokens of prompt + completion (+ EOS); longer rows are cut at the end

  c.opt = ml_collections.ConfigDict()
  c.opt.learning_rate = 1e-6
  c.opt.warmup_steps = 0
  c.opt.weight_decay = 0.0
  c.opt.max_grad_norm = 1.0
  c.opt.schedule = "constant"  # constant | cosine

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.prompts_per_step = 4  # B; N = B * G completions per step
  c.train.grad_accum_steps = 1
  c.train.seed = 0
  c.train.log_every = 1
  c.train.eval_every = 0  # 0: evaluate only before the first and after the last step
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3
  # Memory of one device for the start-up check; 0: what the device reports (GPU/TPU;
  # a CPU reports none, so no check there unless set).
  c.train.device_memory_gb = 0.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.num_problems = 64
  c.eval.num_samples = 1  # k: pass@1 is the mean over k samples, maj@k when k > 1
  c.eval.temperature = 0.0  # 0: greedy
  c.eval.prompts_per_batch = 16
  c.eval.reward = "accuracy"  # the reward (a REWARD_FUNCTIONS name) that says an answer is right
  return c


def from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an experiment file, as `--config=path:arg` loads it.

  For configs that build on another (configs/smollm2_sft.py takes its task from
  configs/smollm2_arithmetic.py), benchmarks and tests.
  """
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"grpo_jax_config_{name}", path)
  if spec is None:
    raise ConfigError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _flat_keys(cfg, prefix="") -> set[str]:
  keys = set()
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict) and not k == "kwargs":
      keys |= _flat_keys(v, f"{prefix}{k}.")
    else:
      keys.add(prefix + k)
  return keys


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(cfg) -> None:
  """Raises ConfigError on unknown keys or values that cannot run. Needs no model."""
  known = _flat_keys(defaults())
  for key in sorted(_flat_keys(cfg) - known):
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean config.{close[0]}?" if close else ""
    raise ConfigError(f"unknown config key config.{key}{hint}")
  rl, train = cfg.rl, cfg.train
  _check(cfg.mode in MODES, f"config.mode={cfg.mode!r}; expected one of {list(MODES)}")
  if cfg.mode == "sft":
    _validate_sft(cfg.sft)
  _check(rl.num_generations >= 2,
         f"config.rl.num_generations={rl.num_generations}: GRPO needs at least 2 completions per "
         "prompt to compare them (advantages are relative to the group)")
  _check(train.prompts_per_step >= 1, "config.train.prompts_per_step must be >= 1")
  _check(train.grad_accum_steps >= 1 and train.prompts_per_step % train.grad_accum_steps == 0,
         f"config.train.prompts_per_step={train.prompts_per_step} must be divisible by "
         f"config.train.grad_accum_steps={train.grad_accum_steps} (micro-batches of whole groups)")
  _check(rl.loss_type in losses.LOSS_TYPES,
         f"config.rl.loss_type={rl.loss_type!r}; expected one of {list(losses.LOSS_TYPES)}")
  _check(rl.kl_estimator in losses.KL_ESTIMATORS,
         f"config.rl.kl_estimator={rl.kl_estimator!r}; expected one of {list(losses.KL_ESTIMATORS)}")
  _check(rl.importance_sampling_level in losses.IMPORTANCE_SAMPLING_LEVELS,
         f"config.rl.importance_sampling_level={rl.importance_sampling_level!r}; expected one of "
         f"{list(losses.IMPORTANCE_SAMPLING_LEVELS)}")
  _check(rl.scale_rewards in advantages.SCALES,
         f"config.rl.scale_rewards={rl.scale_rewards!r}; expected one of {list(advantages.SCALES)}")
  _check(rl.num_iterations >= 1, "config.rl.num_iterations must be >= 1")
  _check(rl.max_completion_length >= 1 and rl.max_prompt_length >= 1,
         "config.rl.max_prompt_length and max_completion_length must be >= 1")
  _check(rl.temperature >= 0 and 0 < rl.top_p <= 1 and rl.top_k >= 0,
         "config.rl: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
  _check(cfg.opt.schedule in ("constant", "cosine"),
         f"config.opt.schedule={cfg.opt.schedule!r}; expected 'constant' or 'cosine'")
  _check(cfg.opt.learning_rate > 0, "config.opt.learning_rate must be > 0")
  _validate_schedule(train)
  ev = cfg.eval
  _check(ev.num_problems >= 0, f"config.eval.num_problems={ev.num_problems} must be >= 0 "
         "(0: no evaluation)")
  _check(ev.num_samples >= 1, f"config.eval.num_samples={ev.num_samples} must be >= 1")
  _check(ev.prompts_per_batch >= 1, f"config.eval.prompts_per_batch={ev.prompts_per_batch} must "
         "be >= 1 (prompts the evaluation samples at once; e.g. 16)")
  _check(ev.temperature >= 0, f"config.eval.temperature={ev.temperature} must be >= 0 "
         "(0: greedy)")
  _check(cfg.eval.reward in rewards.REWARD_FUNCTIONS,
         f"config.eval.reward={cfg.eval.reward!r}: unknown reward; known rewards: "
         f"{sorted(rewards.REWARD_FUNCTIONS)}")
  _check(cfg.task.template in TEMPLATES,
         f"config.task.template={cfg.task.template!r}; expected one of {list(TEMPLATES)}")
  _check(cfg.task.name in TASKS, f"config.task.name={cfg.task.name!r}: unknown task; known "
         f"tasks: {sorted(TASKS)}")
  try:
    TASKS[cfg.task.name](**cfg.task.kwargs.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.task.kwargs for task {cfg.task.name!r}: {e}") from None
  except ImportError as e:  # a task whose data needs an optional package (tfds)
    raise ConfigError(f"config.task.name={cfg.task.name!r}: {e}") from None
  _check(cfg.judge.template in ("chat", "plain"),
         f"config.judge.template={cfg.judge.template!r}; expected 'chat' or 'plain'")
  try:
    rewards.get_reward_fns(list(cfg.rewards))
  except (KeyError, ValueError, TypeError) as e:
    raise ConfigError(f"config.rewards: {e}") from None


def _validate_schedule(train) -> None:
  """The loop's counts: each is a divisor or a length, so 0 or less would fail mid-run."""
  _check(train.steps >= 1, f"config.train.steps={train.steps} must be >= 1")
  _check(train.log_every >= 1, f"config.train.log_every={train.log_every} must be >= 1 "
         "(1: every step)")
  for key, zero in (("eval_every", "evaluate only before the first and after the last step"),
                    ("checkpoint_every", "checkpoint only at the last step and on a signal")):
    _check(train[key] >= 0, f"config.train.{key}={train[key]} must be >= 0 (0: {zero})")
  _check(train.keep_checkpoints >= 1,
         f"config.train.keep_checkpoints={train.keep_checkpoints} must be >= 1 (the newest "
         "checkpoint is the one a run resumes from)")
  _check(train.device_memory_gb >= 0, f"config.train.device_memory_gb={train.device_memory_gb} "
         "must be >= 0 (0: what the device reports)")


def _validate_sft(sft) -> None:
  """The files and numbers of config.sft; the rows themselves are checked as they are read
  (sft.read_rows), also before the model loads."""
  _check(bool(sft.path), "config.mode='sft' needs config.sft.path: a JSONL file with one "
         '{"prompt": ..., "completion": ...} (or {"messages": [...]}) object per line; '
         "e.g. --config.sft.path=data.jsonl")
  for key in ("path", "eval_path"):
    path = sft[key]
    _check(not path or os.path.isfile(path),
           f"config.sft.{key}={path!r}: no such file ({os.path.abspath(path)})")
  _check(sft.epochs >= 0, f"config.sft.epochs={sft.epochs} must be >= 0 (0: train.steps steps)")
  _check(sft.max_length >= 2, f"config.sft.max_length={sft.max_length} must be >= 2 tokens")


def make_mesh(cfg, devices=None):
  """The mesh of config.mesh, checked against the batch: ConfigError if they do not fit."""
  from grpo_jax import sharding

  try:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.train.prompts_per_step // cfg.train.grad_accum_steps
  _check(micro % shards == 0,
         f"config.train.prompts_per_step / grad_accum_steps = {micro} prompts per micro-batch "
         f"is not divisible by the {shards} batch shards (config.mesh.data x fsdp = "
         f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
  return mesh


def validate_with_model(cfg, model_cfg) -> None:
  """Checks that need the model: the context length."""
  total = cfg.rl.max_prompt_length + cfg.rl.max_completion_length
  _check(total <= model_cfg.max_position_embeddings,
         f"config.rl.max_prompt_length + max_completion_length = {total} is longer than the "
         f"model's context of {model_cfg.max_position_embeddings} tokens; lower one of them")
  if cfg.mode == "sft":
    _check(cfg.sft.max_length <= model_cfg.max_position_embeddings,
           f"config.sft.max_length={cfg.sft.max_length} is longer than the model's context of "
           f"{model_cfg.max_position_embeddings} tokens; lower it")
