"""The config schema: every key with its default, and start-up validation.

Experiment files in configs/ start from `defaults()` and change what they
need; `validate` rejects unknown keys (with the closest known one) and bad
values before any model is loaded or step is run. Names follow TRL's GRPOConfig
where it has one.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re
import typing

import ml_collections

from grpo_jax import advantages, lora, losses, metrics_io, ppo, rewards
from grpo_jax.data import TASKS, TEMPLATES
from grpo_jax.models import transformer


MODES = ("grpo", "sft")
# config.rl.advantage_estimator: the group baselines (advantages.py), or PPO's learned critic.
ESTIMATORS = advantages.ESTIMATORS + (ppo.ESTIMATOR,)


def _schema() -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """The defaults and each key's one-line meaning, set side by side.

  The meanings are data, not comments, so `--print_config` and the docs test read them from
  here: a key cannot be added without saying what it does. Long because it is the table of
  every key, one entry each, in one place.
  """
  c, meaning = ml_collections.ConfigDict(), {}

  def key(path: str, value, text: str):
    *sections, leaf = path.split(".")
    node = c
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[leaf] = value
    meaning[path] = text

  key("mode", "grpo", '"grpo": RL training (train.py); "sft": supervised fine-tuning on config.sft')
  key("rewards", [("accuracy", 1.0), ("format", 0.5)],
      "reward functions and weights: (name, weight) pairs in a file, "
      '"name:weight,name:weight" on the command line')
  key("reward_kwargs", ml_collections.ConfigDict(),
      "keywords bound to reward functions, {reward name: {keyword: value}} (e.g. regex_format's "
      "pattern); --config.reward_kwargs.NAME.KEY=VALUE")

  key("model.name", "smollm2-135m-instruct",
      "what to load: a known name, a Hugging Face folder, a .gguf file or a training workdir")
  key("model.dtype", "float32", 'matmul operand dtype, fp32 accumulation ("bfloat16" on '
      "accelerators); params stay fp32")
  key("model.remat", "none", 'what the update\'s backward keeps of each layer: "none" (all '
      'activations), "full" (only its input; the forward runs again), "dots_saveable", '
      '"nothing_saveable"')
  key("model.attention_block", transformer.ATTENTION_BLOCK,
      "queries per attention block: a forward of more tokens holds one block's scores at a time "
      "(the backward recomputes them); 0 = all scores at once")
  # LoRA (lora.py): only low-rank adapters train; the base stays frozen and is the reference.
  key("model.lora.rank", 0, "LoRA rank r: adapters (alpha / r) B A on the targeted "
      "projections get the gradients and optimizer state, the base is frozen; 0 = off (full "
      "fine-tuning)")
  key("model.lora.alpha", 32.0, "LoRA's alpha: the adapters' output is scaled by alpha / rank")
  key("model.lora.dropout", 0.0, "dropout on the adapters' input; only 0 is supported (the "
      "update has no per-step randomness, and dropout would make the trainer's log-probs "
      "differ from the sampler's)")
  key("model.lora.targets", lora.DEFAULT_TARGETS, "regex fully matching the names of the "
      f"projections that get adapters, of {list(transformer.LORA_TARGETABLE)}; default all")
  key("model.lora.quantize_base", "none", 'the frozen base\'s storage: "none" (as loaded); '
      '"int8" / "nf4" (QLoRA) are rejected: not implemented')

  key("task.name", "arithmetic", f"the prompt source, one of {sorted(TASKS)}")
  key("task.template", "chat", 'how a question becomes a prompt: "chat" | "r1_zero" | "plain"')
  key("task.kwargs", ml_collections.ConfigDict(),
      "the task's own settings (difficulty, files, seed), passed to its constructor")

  key("rl.num_generations", 8, "G, completions sampled per prompt (at least 2)")
  key("rl.beta", 0.04, "KL coefficient; 0 drops the KL term and the reference model")
  key("rl.epsilon", 0.2, "lower clip range (and the upper one when epsilon_high is unset)")
  key("rl.epsilon_high", ml_collections.FieldReference(None, field_type=float),
      "upper clip range; None = epsilon (DAPO's clip-higher: 0.28)")
  key("rl.loss_type", "grpo", f"the policy term and its token aggregation, one of "
      f"{list(losses.LOSS_TYPES)}")
  key("rl.kl_estimator", "k3", f"KL estimator, one of {list(losses.KL_ESTIMATORS)}")
  key("rl.scale_rewards", "group",
      "advantage scaling: group std | batch std | none (mean only, Dr. GRPO)")
  key("rl.advantage_estimator", "grpo",
      f"how rewards become advantages, one of {list(ESTIMATORS)} (gae: PPO with a learned "
      "critic)")
  key("rl.multi_objective_aggregation", "sum_then_normalize",
      '"sum_then_normalize" (weighted sum of the rewards, then the estimator) | '
      '"normalize_then_sum" (GDPO: each reward normalised in its group, then summed)')
  key("rl.num_iterations", 1, "mu, optimizer updates per rollout")
  key("rl.importance_sampling_level", "token", 'importance ratios: "token" (GRPO) | '
      '"sequence" (GSPO)')
  key("rl.max_prompt_length", 128, "prompt tokens kept (longer prompts keep their end)")
  key("rl.max_completion_length", 128,
      "completion limit in tokens (also dr_grpo's normaliser and the evaluation's limit)")
  key("rl.stop_strings", (), 'strings that also end a completion, which the rewards see cut '
      'before them, e.g. ("\\n",) for a base model\'s one-line answers (each must lie within '
      'one token)')
  key("rl.temperature", 1.0, "sampling temperature (0 = greedy); the loss's log-probs use it too")
  key("rl.top_p", 1.0, "nucleus sampling mass (1 = off)")
  key("rl.top_k", 0, "top-k sampling (0 = off)")
  key("rl.rollout_parts", 1, "the rollout samples the step's prompts in this many parts, one "
      "after the other (KV cache memory / parts; the same completions)")
  key("rl.mask_truncated_completions", False,
      "DAPO: no loss on completions cut at the length limit without a stop token")
  key("rl.use_bias_correction_kl", False, "weight each token's KL by the importance ratio "
      "(DeepSeek-V3.2's unbiased KL gradient; TRL 1.16's default); False = DeepSeekMath's")
  key("rl.delta", ml_collections.FieldReference(None, field_type=float),
      "INTELLECT-2's two-sided clip: the ratio's cap for negative advantages (> 1 + "
      "epsilon_high, e.g. 4); None = off; clipped loss types only")
  key("rl.entropy_coef", 0.0, "entropy bonus: coef x mean token entropy is subtracted from "
      "the loss (0 = off)")
  key("rl.top_entropy_quantile", 1.0, "policy loss only on the tokens whose entropy is in the "
      "top this fraction of the batch (the 80/20 paper: 0.2); 1 = every token")
  key("rl.rollout_correction", ml_collections.FieldReference(None, field_type=str),
      "trainer/sampler mismatch correction: None | token_truncate | token_mask | "
      "sequence_truncate | sequence_mask")
  key("rl.rollout_correction_threshold", 2.0,
      "the correction's cap (truncate) or cut-off (mask) of the trainer/sampler ratio (>= 1)")
  key("rl.sapo_temperature_pos", 1.0, "SAPO's gate temperature for positive advantages")
  key("rl.sapo_temperature_neg", 1.05, "SAPO's gate temperature for advantages <= 0")
  key("rl.gmpo_epsilon", 0.4, "GMPO's clip range on the token log-ratio: ratios within "
      "(e^-x, e^x)")
  # PPO (advantage_estimator="gae"): a critic, GAE over per-token rewards (TRL's names).
  key("rl.gamma", 1.0, "PPO: discount per token in GAE")
  key("rl.lam", 0.95, "PPO: GAE's lambda (1: Monte Carlo returns minus values; 0: TD errors)")
  key("rl.cliprange_value", 0.2, "PPO: the critic's values move at most this far from the "
      "rollout's in the clipped value loss")
  key("rl.vf_coef", 0.1, "PPO: weight of the value loss (the critic has its own AdamW, so it "
      "mostly sets where opt.max_grad_norm clips)")
  key("rl.critic_learning_rate", ml_collections.FieldReference(None, field_type=float),
      "PPO: the critic's peak learning rate; None = opt.learning_rate")
  key("rl.critic_init", "", "PPO: what the critic's trunk starts from: \"\" = the policy's "
      "initial params; else a model (anything model.name accepts, e.g. a value-pretrained or "
      "larger-trained policy's workdir) with the policy's architecture; the head starts at 0")
  key("rl.whiten_advantages", True, "PPO: whiten GAE's advantages over the batch's tokens")
  key("rl.kl_in_reward", False, "PPO: the KL to the reference as a per-token penalty beta x KL "
      "in the reward (InstructGPT), not in the loss; needs beta > 0")
  key("rl.dynamic_sampling", False, "DAPO: groups whose rewards all agree make way for "
      "informative groups of the next prompts, sampled in more rollouts of B prompts")
  key("rl.max_dynamic_sampling_rounds", 8, "dynamic sampling's cap on more rollouts per step; "
      "then the step trains on the groups it has (uninformative ones with advantage 0)")

  # LLM-as-judge reward ("judge" in config.rewards): a model ranks each group's G answers.
  key("judge.model", "policy",
      '"policy" (the current params) or anything model.name accepts; used by the "judge" reward')
  key("judge.template", "chat", 'how the judging prompt is written: "chat" | "plain"')

  # Supervised fine-tuning (mode "sft"; cold start, distillation). Batches of
  # train.prompts_per_step rows; prompts under task.template; the task's eval as in GRPO.
  key("sft.path", "", 'training JSONL: {"prompt", "completion"} or {"messages": [...]} a line '
      "(required in SFT mode)")
  key("sft.eval_path", "", "optional held-out JSONL of the same form: eval/loss at evaluations")
  key("sft.epochs", 0.0, "> 0: this many passes over the data (instead of train.steps)")
  key("sft.max_length", 1024,
      "tokens of prompt + completion (+ end of turn); longer rows are cut at the end")

  key("opt.learning_rate", 1e-6, "peak learning rate (AdamW, after a linear warmup from 0)")
  key("opt.warmup_steps", 0, "optimizer updates of linear warmup")
  key("opt.weight_decay", 0.0, "AdamW's decoupled weight decay")
  key("opt.max_grad_norm", 1.0, "global gradient-norm clip (0 = off)")
  key("opt.schedule", "constant", 'after warmup: "constant" | "cosine" (decay to 0)')

  key("train.steps", 100, "training steps (a rollout plus num_iterations updates each, in GRPO)")
  key("train.prompts_per_step", 4, "B, prompts per step (N = B * G completions); SFT: rows")
  key("train.grad_accum_steps", 1, "micro-batches per update (must divide prompts_per_step)")
  key("train.seed", 0, "seed of sampling, of evaluation samples and of SFT's data order")
  key("train.log_every", 1, "write metrics every this many steps (and at evaluations, the end)")
  key("train.eval_every", 0, "evaluate every this many steps; 0 = only before and after training")
  key("train.checkpoint_every", 50, "checkpoint every this many steps (and at the end, on "
      "SIGTERM/SIGINT)")
  key("train.keep_checkpoints", 3, "how many of the newest checkpoints to keep")
  key("train.device_memory_gb", 0.0, "one device's memory for the start-up check; 0 = what "
      "the device reports (a CPU reports none: no check)")

  key("mesh.data", -1, "data-parallel axis: batch split, params replicated (-1 = the rest)")
  key("mesh.fsdp", 1, "FSDP axis: batch, params and optimizer state split")
  key("mesh.tensor", 1, "tensor-parallel axis: heads, MLP width and vocabulary split")

  key("eval.num_problems", 64, "held-out problems of the task (0 = no evaluation)")
  key("eval.allow_repeats", False, "evaluate the first num_problems held-out examples even where "
      "problems repeat; by default only distinct ones, as many as the task's split holds")
  key("eval.num_samples", 1, "k completions per problem: pass@1 is their mean; maj@k, pass@k")
  key("eval.temperature", 0.0, "sampling temperature of the evaluation (0 = greedy)")
  key("eval.prompts_per_batch", 16, "prompts sampled at once")
  key("eval.reward", "accuracy", "the reward (a REWARD_FUNCTIONS name) whose full credit means "
      "right")

  # Experiment trackers besides metrics.jsonl and TensorBoard (process 0 logs).
  key("logging.wandb.project", "", 'Weights & Biases project; "" = off (needs the wandb extra)')
  key("logging.wandb.mode", "offline", '"offline" (files in WORKDIR/wandb; `wandb sync`) | '
      '"online"')
  key("logging.wandb.name", "", 'the W&B run name; "" = the workdir\'s name')
  key("logging.wandb.entity", "", 'the W&B entity; "" = the account\'s default')
  return c, meaning


def defaults() -> ml_collections.ConfigDict:
  """Every key with its default value: the base of every experiment file."""
  return _schema()[0]


def meanings() -> dict[str, str]:
  """{key: one-line meaning} for every key of `defaults()`, in the schema's order."""
  return _schema()[1]


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


def task_parameters(name: str) -> dict[str, tuple[typing.Any, typing.Any]]:
  """{setting: (type, default)} of task `name`'s constructor, the keys config.task.kwargs takes
  (read from its signature, so a new task needs no list here). A required setting's default
  is inspect.Parameter.empty."""
  cls = TASKS[name]
  hints = typing.get_type_hints(cls.__init__)
  return {p.name: (hints.get(p.name, str), p.default)
          for p in inspect.signature(cls).parameters.values()
          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def task_setting_type(task: str, setting: str):
  """The type task `task` declares for `setting`; ConfigError naming the closest setting it
  has when it has no such one."""
  params = task_parameters(task)
  if setting not in params:
    close = difflib.get_close_matches(setting, list(params), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"config.task.kwargs.{setting}: task {task!r} has no setting {setting!r}; "
                      f"{hint}its settings: {', '.join(params)}")
  return params[setting][0]


def parse_task_setting(task: str, setting: str, text: str):
  """The command line's text for config.task.kwargs.`setting` as the value task `task` takes
  (its constructor's annotation: int, float, bool, str, or one of them or None)."""
  hint = task_setting_type(task, setting)
  try:
    return parse_as(hint, text)
  except ValueError as e:
    raise ConfigError(f"config.task.kwargs.{setting}={text!r}: task {task!r} takes {e} "
                      "there") from None


def parse_as(hint, text: str):
  """Command-line text as a value of type `hint` (int, float, bool, str, or a union of them
  and None, tried in the union's order); ValueError naming the types when none fits."""
  types = typing.get_args(hint) or (hint,)
  if type(None) in types and text.lower() in ("none", "null"):
    return None
  for t in types:
    try:
      if t is bool:
        if text.lower() in ("true", "1", "yes", "false", "0", "no"):
          return text.lower() in ("true", "1", "yes")
      elif t in (int, float, str):
        return t(text)
    except ValueError:
      pass
  raise ValueError(" or ".join("None" if t is type(None) else getattr(t, "__name__", str(t))
                               for t in types))


def reward_keyword_type(name: str, keyword: str):
  """The type reward `name` declares for `keyword` (str where it declares none); ConfigError
  naming the fix for an unknown reward or keyword."""
  if name not in rewards.REWARD_FUNCTIONS:
    close = difflib.get_close_matches(name, sorted(rewards.REWARD_FUNCTIONS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"config.reward_kwargs.{name}: no reward is named {name!r}; {hint}known "
                      f"rewards: {sorted(rewards.REWARD_FUNCTIONS)}")
  fn = rewards.REWARD_FUNCTIONS[name]
  known = rewards.reward_keywords(fn)
  if keyword not in known:
    close = difflib.get_close_matches(keyword, list(known), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"config.reward_kwargs.{name}.{keyword}: reward {name!r} takes no "
                      f"keyword {keyword!r}; {hint}its keywords: {', '.join(known) or 'none'}")
  return typing.get_type_hints(fn).get(keyword, str)


def parse_reward_keyword(name: str, keyword: str, text: str):
  """The command line's text for config.reward_kwargs.`name`.`keyword` as the value reward
  `name` takes there (`reward_keyword_type`)."""
  hint = reward_keyword_type(name, keyword)
  try:
    return parse_as(hint, text)
  except ValueError as e:
    raise ConfigError(f"config.reward_kwargs.{name}.{keyword}={text!r}: reward {name!r} takes "
                      f"{e} there") from None


def _show(key: str, value) -> str:
  """A value as --print_config shows it; config.rewards in its command-line form."""
  if key == "rewards":
    try:
      value = rewards.format_rewards(value)
    except (TypeError, ValueError):  # validate reports it; show what is there
      pass
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def _task_rows(task: str, kwargs: dict) -> list[tuple[str, str, str, str]]:
  """describe's rows of config.task.kwargs: every setting of the task's constructor."""
  cls, unset = TASKS[task], inspect.Parameter.empty
  params = task_parameters(task)
  meaning = f"a setting of task {task!r} ({cls.__module__}.{cls.__name__})"
  rows = []
  for setting, (_, default) in params.items():
    value = kwargs.get(setting, default)
    rows.append((f"task.kwargs.{setting}", "(unset)" if value is unset else repr(value),
                 "(required)" if default is unset else repr(default), meaning))
  return rows + [(f"task.kwargs.{k}", repr(v), "-", f"not a setting of task {task!r}")
                 for k, v in kwargs.items() if k not in params]


def describe(cfg, source: str = "") -> str:
  """Every key of `cfg` with its value, its default and what it means, one a line, in the
  schema's order; config.task.kwargs as the settings of cfg.task.name's constructor. What
  `python -m grpo_jax.main --config=FILE --print_config` prints."""
  base = defaults()

  def get(c, key):
    for part in key.split("."):
      if not isinstance(c, ml_collections.ConfigDict) or part not in c:
        return "(unset)"
      c = c[part]
    return _show(key, c)

  rows = []
  for key, meaning in meanings().items():
    if key == "task.kwargs" and cfg.task.name in TASKS:
      rows += _task_rows(cfg.task.name, cfg.task.kwargs.to_dict())
    else:
      rows.append((key, get(cfg, key), get(base, key), meaning))
  rows += [(key, get(cfg, key), "-", "not in the schema: validation rejects it")
           for key in sorted(_flat_keys(cfg) - set(meanings()))]
  left = [f"config.{key} = {value}" for key, value, _, _ in rows]
  width = min(max(map(len, left)), 64)
  default_width = min(max(len(default) for _, _, default, _ in rows), 24)
  lines = [f"# {source or 'the config'}, with its command-line overrides: set a key with "
           "--config.KEY=VALUE"]
  lines += [f"{text.ljust(width)}  default {default.ljust(default_width)}  {meaning}"
            for text, (_, _, default, meaning) in zip(left, rows)]
  return "\n".join(lines)


def _flat_keys(cfg, prefix="") -> set[str]:
  keys = set()
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict) and k not in ("kwargs", "reward_kwargs"):
      keys |= _flat_keys(v, f"{prefix}{k}.")
    else:
      keys.add(prefix + k)
  return keys


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(cfg, *, data: bool = True) -> None:
  """Raises ConfigError on unknown keys or values that cannot run. Needs no model.

  data=False skips what needs the run's data (the task's and SFT's files): for
  ahead-of-time compilation, which needs only shapes.
  """
  known = _flat_keys(defaults())
  for key in sorted(_flat_keys(cfg) - known):
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean config.{close[0]}?" if close else ""
    raise ConfigError(f"unknown config key config.{key}{hint}")
  rl, train = cfg.rl, cfg.train
  _check(cfg.mode in MODES, f"config.mode={cfg.mode!r}; expected one of {list(MODES)}")
  _check(cfg.model.remat in transformer.REMAT, f"config.model.remat={cfg.model.remat!r}; "
         f"expected one of {list(transformer.REMAT)}")
  block = cfg.model.attention_block
  _check(isinstance(block, int) and not isinstance(block, bool) and block >= 0,
         f"config.model.attention_block={block!r} must be an integer >= 0 "
         "(queries per attention block, e.g. 512; 0: never blocked)")
  _validate_lora(cfg)
  if cfg.mode == "sft" and data:
    _validate_sft(cfg.sft)
  if rl.advantage_estimator == ppo.ESTIMATOR:
    _check(rl.num_generations >= 1,
           f"config.rl.num_generations={rl.num_generations} must be >= 1")
  else:
    _check(rl.num_generations >= 2,
           f"config.rl.num_generations={rl.num_generations}: GRPO needs at least 2 completions "
           "per prompt to compare them (advantages are relative to the group; "
           "advantage_estimator='gae', PPO, needs only 1)")
  _check(train.prompts_per_step >= 1, "config.train.prompts_per_step must be >= 1")
  _check(train.grad_accum_steps >= 1 and train.prompts_per_step % train.grad_accum_steps == 0,
         f"config.train.prompts_per_step={train.prompts_per_step} must be divisible by "
         f"config.train.grad_accum_steps={train.grad_accum_steps} (micro-batches of whole groups)")
  _check(rl.rollout_parts >= 1 and train.prompts_per_step % rl.rollout_parts == 0,
         f"config.rl.rollout_parts={rl.rollout_parts} must be >= 1 and divide "
         f"config.train.prompts_per_step={train.prompts_per_step}")
  _check(rl.loss_type in losses.LOSS_TYPES,
         f"config.rl.loss_type={rl.loss_type!r}; expected one of {list(losses.LOSS_TYPES)}")
  _check(rl.kl_estimator in losses.KL_ESTIMATORS,
         f"config.rl.kl_estimator={rl.kl_estimator!r}; expected one of {list(losses.KL_ESTIMATORS)}")
  _check(rl.importance_sampling_level in losses.IMPORTANCE_SAMPLING_LEVELS,
         f"config.rl.importance_sampling_level={rl.importance_sampling_level!r}; expected one of "
         f"{list(losses.IMPORTANCE_SAMPLING_LEVELS)}")
  _check(rl.scale_rewards in advantages.SCALES,
         f"config.rl.scale_rewards={rl.scale_rewards!r}; expected one of {list(advantages.SCALES)}")
  _validate_advantages(rl)
  _check(rl.num_iterations >= 1, "config.rl.num_iterations must be >= 1")
  _validate_loss_options(rl)
  _check(isinstance(rl.dynamic_sampling, bool),
         f"config.rl.dynamic_sampling={rl.dynamic_sampling!r} must be True or False")
  rounds = rl.max_dynamic_sampling_rounds
  _check(isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0,
         f"config.rl.max_dynamic_sampling_rounds={rounds!r} must be an integer >= 0 (the most "
         "rollouts of prompts_per_step prompts a step adds to replace groups whose rewards all "
         "agree; 0: none, only the dynamic_sampling/* metrics)")
  _check(rl.max_completion_length >= 1 and rl.max_prompt_length >= 1,
         "config.rl.max_prompt_length and max_completion_length must be >= 1")
  _check(isinstance(rl.stop_strings, (tuple, list))
         and all(isinstance(s, str) and s for s in rl.stop_strings),
         f"config.rl.stop_strings={rl.stop_strings!r} must be a tuple of non-empty strings, e.g. "
         "--config.rl.stop_strings='(\"\\n\",)'")
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
    if data:
      TASKS[cfg.task.name](**cfg.task.kwargs.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.task.kwargs for task {cfg.task.name!r}: {e}") from None
  except ImportError as e:  # a task whose data needs an optional package (tfds)
    raise ConfigError(f"config.task.name={cfg.task.name!r}: {e}") from None
  _check(cfg.judge.template in ("chat", "plain"),
         f"config.judge.template={cfg.judge.template!r}; expected 'chat' or 'plain'")
  try:
    rewards.get_reward_fns(cfg.rewards, check=False)
  except (KeyError, ValueError, TypeError) as e:
    raise ConfigError(f"config.rewards: {e}") from None
  try:  # the keywords of every reward, and the reward_kwargs of unused ones
    rewards.get_reward_fns(cfg.rewards, cfg.get("reward_kwargs"))
    rewards.reward_fn(cfg.eval.reward, cfg.get("reward_kwargs"))
  except (KeyError, ValueError, TypeError) as e:
    message = str(e)
    raise ConfigError(message if message.startswith("config.") else
                      f"config.reward_kwargs: {message}") from None
  except ImportError as e:  # a reward whose package is an extra (bertscore)
    raise ConfigError(f"config.rewards: {e}") from None
  try:  # a tracker that cannot start fails here, not after the model has loaded
    metrics_io.check_wandb_config(cfg.logging.wandb)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate_advantages(rl) -> None:
  """advantage_estimator, multi_objective_aggregation and scale_rewards go together."""
  _check(rl.advantage_estimator in ESTIMATORS,
         f"config.rl.advantage_estimator={rl.advantage_estimator!r}; expected one of "
         f"{list(ESTIMATORS)}")
  _validate_ppo(rl)
  _check(rl.advantage_estimator == "grpo" or rl.scale_rewards == "group",
         f"config.rl.scale_rewards={rl.scale_rewards!r} applies to advantage_estimator='grpo' "
         f"only; {rl.advantage_estimator!r} has its own scaling (leave scale_rewards at 'group')")
  _check(rl.multi_objective_aggregation in advantages.MULTI_OBJECTIVE_AGGREGATIONS,
         f"config.rl.multi_objective_aggregation={rl.multi_objective_aggregation!r}; expected one "
         f"of {list(advantages.MULTI_OBJECTIVE_AGGREGATIONS)}")
  _check(rl.multi_objective_aggregation == "sum_then_normalize" or rl.advantage_estimator == "grpo",
         "config.rl.multi_objective_aggregation='normalize_then_sum' (GDPO) normalises each "
         "reward within its group, GRPO's way: it needs advantage_estimator='grpo', not "
         f"{rl.advantage_estimator!r}")


def _validate_ppo(rl) -> None:
  """PPO's keys (advantage_estimator="gae"): their ranges, and what goes with them."""
  gae = rl.advantage_estimator == ppo.ESTIMATOR
  _check(isinstance(rl.kl_in_reward, bool) and isinstance(rl.whiten_advantages, bool),
         f"config.rl.kl_in_reward={rl.kl_in_reward!r} and whiten_advantages="
         f"{rl.whiten_advantages!r} must be True or False")
  _check(not rl.kl_in_reward or gae,
         "config.rl.kl_in_reward=True puts the KL penalty into PPO's per-token rewards; it needs "
         f"config.rl.advantage_estimator='gae', not {rl.advantage_estimator!r} (GRPO's KL is "
         "the loss's, config.rl.beta)")
  _check(not rl.kl_in_reward or rl.beta > 0,
         f"config.rl.kl_in_reward=True with config.rl.beta={rl.beta}: beta is the penalty's "
         "coefficient (TRL's kl_coef, 0.05); set beta > 0 or kl_in_reward=False")
  for name, lo, hi in (("gamma", 0.0, 1.0), ("lam", 0.0, 1.0)):
    _check(_is_number(rl[name]) and lo <= rl[name] <= hi,
           f"config.rl.{name}={rl[name]!r} must be in [{lo}, {hi}]")
  _check(_is_number(rl.cliprange_value) and rl.cliprange_value > 0,
         f"config.rl.cliprange_value={rl.cliprange_value!r} must be > 0 (TRL: 0.2)")
  _check(_is_number(rl.vf_coef) and rl.vf_coef > 0,
         f"config.rl.vf_coef={rl.vf_coef!r} must be > 0 (TRL: 0.1)")
  lr = rl.critic_learning_rate
  _check(lr is None or (_is_number(lr) and lr > 0),
         f"config.rl.critic_learning_rate={lr!r} must be > 0 (None: opt.learning_rate)")
  _check(isinstance(rl.critic_init, str), f"config.rl.critic_init={rl.critic_init!r} must be a "
         "string: a model name, folder, .gguf file or workdir ('' = the policy)")
  _check(not rl.critic_init or gae,
         f"config.rl.critic_init={rl.critic_init!r} initialises PPO's critic; it needs "
         f"config.rl.advantage_estimator='gae', not {rl.advantage_estimator!r}")
  if rl.critic_init:
    from grpo_jax import models

    try:
      models.resolve(rl.critic_init)
    except (ValueError, FileNotFoundError, OSError) as e:
      raise ConfigError(f"config.rl.critic_init={rl.critic_init!r}: {e}") from None
  _check(not (gae and rl.dynamic_sampling),
         "config.rl.dynamic_sampling drops groups whose rewards all agree, which only matters "
         "for group baselines; PPO's critic learns from every completion: set "
         "dynamic_sampling=False with advantage_estimator='gae'")


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate_loss_options(rl) -> None:
  """The loss's own options (losses.grpo_loss): each value, and the combinations that make one
  of them do nothing or something other than its name says."""
  _check(isinstance(rl.use_bias_correction_kl, bool),
         f"config.rl.use_bias_correction_kl={rl.use_bias_correction_kl!r} must be True or False")
  eps_high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
  if rl.delta is not None:
    _check(rl.loss_type in losses.CLIPPED_LOSS_TYPES,
           f"config.rl.delta={rl.delta} caps the clipped surrogate's ratio; it applies to "
           f"config.rl.loss_type in {list(losses.CLIPPED_LOSS_TYPES)}, not {rl.loss_type!r}")
    _check(rl.delta > 1 + eps_high,
           f"config.rl.delta={rl.delta} must be > 1 + epsilon_high = {1 + eps_high} (INTELLECT-2 "
           "uses 4; below that it would also cut what the upper clip already bounds)")
  _check(_is_number(rl.entropy_coef), f"config.rl.entropy_coef={rl.entropy_coef!r} must be a "
         "number (0: no entropy bonus)")
  _check(_is_number(rl.top_entropy_quantile) and 0 <= rl.top_entropy_quantile <= 1,
         f"config.rl.top_entropy_quantile={rl.top_entropy_quantile!r} must be in [0, 1] (the "
         "fraction of highest-entropy tokens kept in the policy loss; 1: all, the paper: 0.2)")
  _check(rl.rollout_correction in losses.ROLLOUT_CORRECTIONS,
         f"config.rl.rollout_correction={rl.rollout_correction!r}; expected one of "
         f"{list(losses.ROLLOUT_CORRECTIONS)}")
  _check(_is_number(rl.rollout_correction_threshold) and rl.rollout_correction_threshold >= 1,
         f"config.rl.rollout_correction_threshold={rl.rollout_correction_threshold!r} must be "
         ">= 1 (a token the sampler and trainer agree on has ratio 1; e.g. 2)")
  _check(rl.rollout_correction is None or rl.num_iterations == 1,
         f"config.rl.rollout_correction={rl.rollout_correction!r} needs config.rl.num_iterations"
         f" = 1: with {rl.num_iterations} updates per rollout the sampler's log-probs are pi_old, "
         "so the ratio it corrects is 1 by construction (the PPO ratio carries the mismatch)")
  _check(_is_number(rl.sapo_temperature_pos) and rl.sapo_temperature_pos > 0
         and _is_number(rl.sapo_temperature_neg) and rl.sapo_temperature_neg > 0,
         f"config.rl.sapo_temperature_pos={rl.sapo_temperature_pos!r} and sapo_temperature_neg="
         f"{rl.sapo_temperature_neg!r} must be > 0 (the paper: 1.0 and 1.05)")
  _check(_is_number(rl.gmpo_epsilon) and rl.gmpo_epsilon > 0,
         f"config.rl.gmpo_epsilon={rl.gmpo_epsilon!r} must be > 0 (the paper: 0.4)")
  _check(rl.loss_type != "gmpo" or rl.importance_sampling_level == "token",
         "config.rl.loss_type='gmpo' takes a geometric mean of token ratios per sequence itself; "
         "set config.rl.importance_sampling_level='token'")


def _validate_lora(cfg) -> None:
  """config.model.lora: the adapters' settings, and what LoRA does not combine with."""
  lo = cfg.model.lora
  rank = lo.rank
  _check(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0,
         f"config.model.lora.rank={rank!r} must be an integer >= 0 (0: no LoRA, full "
         "fine-tuning; e.g. 16)")
  if not rank:
    return
  _check(_is_number(lo.alpha) and lo.alpha > 0,
         f"config.model.lora.alpha={lo.alpha!r} must be > 0 (the adapters' scale is alpha / "
         "rank; e.g. 2 x rank)")
  _check(_is_number(lo.dropout) and lo.dropout == 0,
         f"config.model.lora.dropout={lo.dropout!r}: only 0 is supported (the update step "
         "takes no random key, and in RL dropout would make the trainer's log-probs differ "
         "from the sampler's); set it to 0")
  try:
    re.compile(lo.targets)
  except (re.error, TypeError) as e:
    raise ConfigError(f"config.model.lora.targets={lo.targets!r} is not a regex: {e}") from None
  _check(bool(lora.targets(lo.targets)),
         f"config.model.lora.targets={lo.targets!r} matches none of the projections that can "
         f"take adapters, {list(transformer.LORA_TARGETABLE)} (a full match of the name; "
         f"default {lora.DEFAULT_TARGETS!r})")
  _check(lo.quantize_base in lora.QUANTIZE_BASE,
         f"config.model.lora.quantize_base={lo.quantize_base!r}: "
         + (f"QLoRA's quantised base ({lo.quantize_base}) is not implemented in this build; "
            "set it to 'none' (the base stays in its loaded dtype)"
            if lo.quantize_base in lora.QUANTIZE_BASE_PLANNED
            else f"expected one of {list(lora.QUANTIZE_BASE)}"))
  _check(cfg.rl.advantage_estimator != ppo.ESTIMATOR,
         "config.model.lora with advantage_estimator='gae' (PPO): the critic copies the "
         "policy's trunk, which LoRA does not adapt; use a GRPO-family estimator or lora.rank=0")


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
  shards = sharding.batch_shards(mesh)
  micro = cfg.train.prompts_per_step // cfg.train.grad_accum_steps
  _check(micro % shards == 0,
         f"config.train.prompts_per_step / grad_accum_steps = {micro} prompts per micro-batch "
         f"is not divisible by the {shards} batch shards (config.mesh.data x fsdp = "
         f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
  part = cfg.train.prompts_per_step // cfg.rl.rollout_parts
  _check(part % shards == 0,
         f"config.train.prompts_per_step / rl.rollout_parts = {part} prompts per rollout part "
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
