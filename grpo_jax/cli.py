"""Command-line flags shared by the entry points, defined once, and their checks.

absl keeps one flag registry per process, and tests import generate, evaluate
and rejection together: a flag name defined by two modules would fail at
import. So every flag that more than one entry point takes is defined here,
at import time, and each entry point defines only its own other flags.

Each entry point:
  - marks the shared flags it reads as its key flags (`flags.declare_key_flag`),
    so its --help lists them;
  - starts through `run(main, defaults)`, where `defaults` overrides the shared
    defaults below for that entry point (set before parsing, so --help shows
    them), or parses a list with `parse(argv, defaults)` (tests);
  - checks its flags with the helpers here, which raise app.UsageError with
    one line saying what is wrong.

The shared defaults are evaluate's; generate and rejection override some.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Callable, Sequence

from absl import app, flags

from grpo_jax.data import TASKS, TEMPLATES

# Every `python -m grpo_jax.NAME` program; `python -m grpo_jax` lists them with their summaries.
ENTRY_POINTS = ("main", "generate", "evaluate", "rejection", "export", "aot")

FLAGS = flags.FLAGS

# Sampling from a model: generate, evaluate, rejection.
MODEL = flags.DEFINE_string(
    "model", None, "a known model name, a Hugging Face checkpoint folder, a .gguf path, or a "
    "training workdir (its latest checkpoint)")
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "sampling temperature; 0 = greedy")
TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k likeliest tokens; 0 = off")
TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass; 1 = off")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "completion length limit in tokens")
STOP_STRINGS = flags.DEFINE_string(
    "stop_strings", "[]", "a JSON list of strings that also end a completion, which is cut "
    "before them, e.g. '[\"\\n\"]' for one-line answers (each must lie within one token; "
    "evaluate's default: a workdir's config.rl.stop_strings)")
SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
DTYPE = flags.DEFINE_string("dtype", None, "matmul operand dtype: float32 or bfloat16 "
                            "(default: a workdir's config.model.dtype, else float32)")

# Problems of a task, k samples each: evaluate, rejection.
TASK = flags.DEFINE_string("task", None, f"a task name, one of {sorted(TASKS)}")
TASK_KWARGS = flags.DEFINE_string(
    "task_kwargs", "{}", "the task's settings as a JSON object, e.g. '{\"max_digits\": 1}'")
TEMPLATE = flags.DEFINE_enum(
    "template", None, list(TEMPLATES),
    "prompt template the model sees (evaluate's default: a workdir's config.task.template, else "
    "chat when the tokenizer has a chat template, else r1_zero)")
NUM_PROBLEMS = flags.DEFINE_integer("num_problems", 64, "number of problems")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "completions sampled per problem (k)")
PROMPTS_PER_BATCH = flags.DEFINE_integer("prompts_per_batch", 16, "prompts sampled at once")
REWARD = flags.DEFINE_string(
    "reward", None, "the reward (a rewards.REWARD_FUNCTIONS name) whose full credit means right "
    "(evaluate's default: the task's default_reward, else accuracy; rejection: none = no "
    "correctness filter)")
REWARD_KWARGS = flags.DEFINE_string(
    "reward_kwargs", None, "keywords bound to --reward as a JSON object (what config."
    "reward_kwargs holds for it), e.g. '{\"pattern\": \"...\", \"answer_group\": \"sentence\"}' "
    "(evaluate's default: a workdir's config.reward_kwargs entry for --reward)")
OUTPUT = flags.DEFINE_string("output", None, "JSON-lines file to write")

SHARED = (MODEL, TEMPERATURE, TOP_K, TOP_P, MAX_NEW_TOKENS, STOP_STRINGS, SEED, DTYPE, TASK,
          TASK_KWARGS, TEMPLATE, NUM_PROBLEMS, NUM_SAMPLES, PROMPTS_PER_BATCH, REWARD,
          REWARD_KWARGS, OUTPUT)
# The defaults above, kept to restore them: an entry point's overrides must not leak into
# another one run later in the same process (tests).
_DEFAULTS = {holder.name: holder.default for holder in SHARED}


def set_defaults(overrides: dict | None = None) -> None:
  """The shared defaults, with this entry point's `overrides` ({flag name: default})."""
  unknown = set(overrides or {}) - set(_DEFAULTS)
  if unknown:
    raise ValueError(f"not shared flags: {sorted(unknown)}")
  for name, default in {**_DEFAULTS, **(overrides or {})}.items():
    FLAGS.set_default(name, default)


def run(main: Callable, defaults: dict | None = None) -> None:
  """app.run(main) with this entry point's defaults (set first, so --help shows them)."""
  set_defaults(defaults)
  app.run(main)


def parse(argv: Sequence[str], defaults: dict | None = None, program: str = "grpo_jax") -> None:
  """Parses `argv` (flags only, no program name) afresh: a flag it omits takes its default.

  For in-process callers (tests); errors are app.UsageError.
  """
  FLAGS.unparse_flags()  # else flags of an earlier parse keep their values
  set_defaults(defaults)
  try:
    rest = FLAGS([program, *argv])
  except flags.Error as e:
    raise app.UsageError(str(e)) from None
  no_arguments(rest)


def no_arguments(argv: Sequence[str]) -> None:
  """Rejects positional arguments (argv as app.run passes it: the program name first)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def require(*holders) -> None:
  """Each flag must have a value (a per-program check: absl's required flags are global)."""
  for holder in holders:
    if holder.value is None:
      raise app.UsageError(f"--{holder.name} is required")


def positive(*holders) -> None:
  """Each integer flag must be >= 1."""
  for holder in holders:
    if holder.value < 1:
      raise app.UsageError(f"--{holder.name} must be >= 1; got {holder.value}")


def check_sampling() -> None:
  """--temperature, --top_k, --top_p and --max_new_tokens in range."""
  positive(MAX_NEW_TOKENS)
  if TEMPERATURE.value < 0:
    raise app.UsageError(f"--temperature must be >= 0; got {TEMPERATURE.value}")
  if TOP_K.value < 0:
    raise app.UsageError(f"--top_k must be >= 0 (0 = off); got {TOP_K.value}")
  if not 0 < TOP_P.value <= 1:
    raise app.UsageError(f"--top_p must be in (0, 1]; got {TOP_P.value}")


def parse_task_kwargs(text: str) -> dict:
  """--task_kwargs' JSON object as a dict."""
  return parse_json_object(text, "task_kwargs")


def parse_stop_strings(value) -> tuple[str, ...]:
  """--stop_strings (a JSON list, or the list a workdir's config.json holds) as a tuple of
  non-empty strings (app.UsageError otherwise)."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise app.UsageError(f"--stop_strings is not valid JSON ({e}): {value!r}; give a list, "
                           "e.g. '[\"\\n\"]'") from None
  if not (isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value)):
    raise app.UsageError(f"--stop_strings must be a JSON list of non-empty strings; got "
                         f"{value!r}")
  return tuple(value)


def make_task(name: str, kwargs: dict):
  """data.get_task(name, **kwargs), its errors as one usage line."""
  from grpo_jax.data import get_task

  if name not in TASKS:
    raise app.UsageError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  try:
    return get_task(name, **kwargs)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--task={name} --task_kwargs={json.dumps(kwargs)}: {e}") from None


def parse_json_object(text: str, flag: str) -> dict:
  """--FLAG's JSON object text as a dict (app.UsageError when it is not one)."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--{flag}={text!r} is not valid JSON ({e}); give an object, e.g. "
                         '\'{"pattern": "..."}\'') from None
  if not isinstance(value, dict):
    raise app.UsageError(f"--{flag} must be a JSON object; got {value!r}")
  return value


def reward_with_kwargs(name: str, kwargs: dict | None) -> Callable:
  """The REWARD_FUNCTIONS entry `name` with `kwargs` bound, checked like config.reward_kwargs
  (app.UsageError naming --reward_kwargs)."""
  from grpo_jax import rewards  # imports JAX: only once the cheaper checks passed

  try:
    return rewards.reward_fn(name, {name: kwargs} if kwargs else None)
  except (ValueError, TypeError, KeyError) as e:
    raise app.UsageError(f"--reward_kwargs for reward {name!r}: {e}") from None


def check_reward(name: str | None, flag: str = "reward") -> None:
  """A REWARD_FUNCTIONS name (None passes: no reward)."""
  from grpo_jax import rewards  # imports JAX: only once the cheaper checks passed

  if name is not None and name not in rewards.REWARD_FUNCTIONS:
    raise app.UsageError(f"--{flag}: unknown reward {name!r}; known rewards: "
                         f"{sorted(rewards.REWARD_FUNCTIONS)}")


def model_kind(name: str) -> str:
  """models.resolve's kind of --model ("workdir", "hf", "gguf", "tiny")."""
  from grpo_jax import models  # imports transformers: after the cheap checks

  try:
    return models.resolve(name)[0]
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


def summary(module: str) -> str:
  """The first paragraph of grpo_jax.`module`'s docstring, read from its source (no import)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{module}.py")
  with open(path) as f:
    docstring = ast.get_docstring(ast.parse(f.read())) or ""
  return " ".join(docstring.split("\n\n")[0].split())
