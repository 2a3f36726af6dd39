"""The command line of a config: `--config.KEY=VALUE` overrides, checked as absl parses them.

ml_collections' config flag makes each override a flag of its own while absl parses argv. On
its own that turns a typo into an AttributeError or KeyError traceback from deep inside absl,
cannot set a list (config.rewards), and lets config.task.kwargs take only the keys the config
file happened to set. `parse_flags`, grpo_jax.main's flags parser, adds what it lacks:

  - every override's key is checked against the schema (`config.defaults()`) before absl
    runs: an unknown key is one line that names the closest known one;
  - `--config.rewards=name:weight,name:weight`, `--config.task.kwargs.KEY=VALUE` (any
    setting of the task's constructor, converted to the type it declares) and
    `--config.task.kwargs='{"KEY": VALUE, ...}'` (JSON, replacing the file's settings),
    `--config.reward_kwargs.NAME.KEY=VALUE` (a keyword of reward NAME, converted to the type
    it declares), `--config.reward_kwargs.NAME='{"KEY": VALUE}'` and
    `--config.reward_kwargs='{"NAME": {"KEY": VALUE}}'` (JSON or a Python literal, replacing
    that reward's or all the file's keywords) are taken out of argv and applied after the
    config file and the other overrides;
  - every parse error (a bad value, an unknown flag, a config file that raises) is one line
    on stderr and exit status 2, as argparse does;
  - `--print_config` prints every key with its value, default and meaning, and exits 0.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import sys
from typing import NoReturn, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from grpo_jax import config as config_lib, rewards
from grpo_jax.data import TASKS

# The keys whose overrides this module applies itself (ml_collections cannot).
OWN_KEYS = ("rewards", "task.kwargs", "reward_kwargs")


def fail(message: str) -> NoReturn:
  """The one-line error of a command line that cannot run; exit status 2 (a usage error)."""
  sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
  sys.exit(2)


def known_keys() -> set[str]:
  """The keys an override may name: every key of the schema and every section of them."""
  keys = config_lib._flat_keys(config_lib.defaults())
  return keys | {key.rsplit(".", 1)[0] for key in keys if "." in key}


def split_overrides(argv: Sequence[str], name: str = "config"):
  """(argv without the overrides of OWN_KEYS, those as [(key, text)], the other override keys).

  Overrides are recognised as ml_collections recognises them: `-`/`--`, an optional `no`
  (a boolean's false), then `config.`; the value follows `=` or is the next argument.
  """
  pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]*)(=?)(.*)$", re.DOTALL)
  rest, own, keys = [argv[0]], [], []
  i = 1
  while i < len(argv):
    arg = argv[i]
    i += 1
    if arg == "--":  # what follows is positional
      rest += argv[i - 1:]
      break
    match = pattern.match(arg)
    if not match:
      rest.append(arg)
      continue
    negated, key, has_value, value = match.groups()
    if key not in OWN_KEYS and not key.startswith(("task.kwargs.", "reward_kwargs.")):
      keys.append(key)
      rest.append(arg)
      continue
    if negated:
      value = "false"
    elif not has_value:
      if i == len(argv):
        fail(f"--{name}.{key} needs a value: --{name}.{key}=VALUE")
      value, i = argv[i], i + 1
    own.append((key, value))
  return rest, own, keys


def check_keys(keys: Sequence[str], name: str = "config") -> None:
  """Fails on the first key the schema does not have, naming the closest one that it does."""
  known = known_keys()
  for key in keys:
    if key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=1)
      hint = (f"; did you mean {name}.{close[0]}?" if close else
              "; --print_config lists every key")
      fail(f"unknown config key {name}.{key}{hint}")


def _one_line(error: Exception) -> str:
  """A flags error in one line: a config file's traceback shrinks to its last line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"


def apply_own(cfg, own: Sequence[tuple[str, str]], task_renamed: bool) -> None:
  """Sets config.rewards, config.task.kwargs and config.reward_kwargs from the overrides
  `split_overrides` took.

  When the command line changed config.task.name, the file's settings that the new task does
  not take are dropped (they were for the file's task), with a note on stderr.
  """
  kwargs = cfg.task.kwargs.to_dict()
  if cfg.task.name not in TASKS:
    if any(key.startswith("task.kwargs") for key, _ in own):  # they need the task's signature
      fail(f"config.task.name={cfg.task.name!r}: unknown task; known tasks: {sorted(TASKS)}")
    task_renamed = False  # nothing to drop: config.validate reports the unknown task
  if task_renamed:
    params = config_lib.task_parameters(cfg.task.name)
    dropped = [k for k in kwargs if k not in params]
    if dropped:
      sys.stderr.write(f"note: config.task.name={cfg.task.name}: left out config.task.kwargs "
                       f"{', '.join(dropped)} (the config file's, not settings of this task)\n")
      kwargs = {k: v for k, v in kwargs.items() if k in params}
  specs = None
  reward_kwargs = rewards.kwargs_dict(cfg.get("reward_kwargs"))
  for key, text in own:
    if key == "rewards":
      try:
        specs = rewards.parse_rewards(text)
        rewards.get_reward_fns(specs, check=False)  # the names, checked here, not at start-up
      except ValueError as e:
        fail(f"--config.rewards: {e}")
    elif key == "reward_kwargs" or key.startswith("reward_kwargs."):
      reward_kwargs = _reward_kwargs(reward_kwargs, key, text)
    elif key == "task.kwargs":
      try:
        kwargs = json.loads(text)
      except json.JSONDecodeError as e:
        fail(f"--config.task.kwargs is not valid JSON ({e}): {text!r}")
      if not isinstance(kwargs, dict):
        fail(f"--config.task.kwargs must be a JSON object; got {text!r}")
      for setting in kwargs:  # JSON values keep their own types: the constructor checks them
        _or_fail(config_lib.task_setting_type, cfg.task.name, setting)
    else:
      setting = key[len("task.kwargs."):]
      kwargs[setting] = _or_fail(config_lib.parse_task_setting, cfg.task.name, setting, text)
  with cfg.unlocked():  # locked against new keys: task.kwargs' are the task's, checked above
    cfg.task.kwargs = ml_collections.ConfigDict(kwargs)
    if any(key.startswith("reward_kwargs") for key, _ in own):
      cfg.reward_kwargs = ml_collections.ConfigDict(reward_kwargs)
    if specs is not None:
      cfg.rewards = type(cfg.rewards)(specs) if isinstance(cfg.rewards, tuple) else specs


def _literal(flag: str, text: str) -> dict:
  """A dict written as JSON or as a Python literal (what --print_config shows)."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fail(f"--{flag} is neither JSON nor a Python literal: {text!r}")
  if not isinstance(value, dict):
    fail(f"--{flag} must be a JSON object (a dict); got {text!r}")
  return value


def _reward_kwargs(current: dict, key: str, text: str) -> dict:
  """config.reward_kwargs after the override `key`=`text` (see the module's docstring); each
  reward name and keyword checked, so a typo fails here with the closest known one."""
  parts = key.split(".")
  if len(parts) == 1:
    new = _literal(f"config.{key}", text)
    for name, kwargs in new.items():
      if not isinstance(kwargs, dict):
        fail(f"--config.reward_kwargs: the keywords of {name!r} must be a dict; got {kwargs!r}")
      for keyword in kwargs:
        _or_fail(config_lib.reward_keyword_type, name, keyword)
    return new
  if len(parts) == 2:
    name = parts[1]
    kwargs = _literal(f"config.{key}", text)
    for keyword in kwargs:
      _or_fail(config_lib.reward_keyword_type, name, keyword)
    return {**current, name: kwargs}
  if len(parts) != 3:
    fail(f"--config.{key}: expected --config.reward_kwargs.NAME.KEYWORD=VALUE")
  _, name, keyword = parts
  value = _or_fail(config_lib.parse_reward_keyword, name, keyword, text)
  return {**current, name: {**current.get(name, {}), keyword: value}}


def _or_fail(fn, *args):
  try:
    return fn(*args)
  except config_lib.ConfigError as e:
    fail(e)


def parse_flags(argv: Sequence[str], config: flags.FlagHolder,
                print_config: flags.FlagHolder | None = None,
                required: Sequence[flags.FlagHolder] = ()) -> list[str]:
  """absl.app.run's flags_parser: parses argv (program name first), returns what is left.

  Args:
    argv: the command line.
    config: the holder of the ml_collections config flag (DEFINE_config_file).
    print_config: a boolean flag; when set, print the config (`config.describe`) and exit 0.
    required: flags that must be given unless print_config is set.
  """
  try:
    # ml_collections reads flag files itself, from sys.argv: expand them first, to see all.
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error as e:
    fail(_one_line(e))
  name = config.name
  rest, own, keys = split_overrides(argv, name)
  check_keys(keys, name)
  saved = sys.argv
  sys.argv = rest  # ml_collections looks up its overrides in sys.argv, not in what it parses
  try:
    remaining = flags.FLAGS(rest)
  except flags.Error as e:
    fail(_one_line(e))
  except (AttributeError, KeyError, OSError, TypeError) as e:  # one the schema check missed
    fail(f"--{name}: {type(e).__name__}: {_one_line(e)}")
  finally:
    sys.argv = saved
  cfg, filename = config.value, config_flags.get_config_filename(flags.FLAGS[name])
  if not isinstance(cfg, ml_collections.ConfigDict):
    try:
      cfg.task  # what stands for a file that could not be loaded raises its error here
    except OSError as e:
      fail(f"--{name}={filename}: cannot load it: {str(e).splitlines()[-1].strip()}")
    except AttributeError:
      pass
    fail(f"--{name}={filename}: get_config() returned {type(cfg).__name__}, not a ConfigDict "
         "(start from grpo_jax.config.defaults())")
  apply_own(cfg, own, task_renamed="task.name" in keys)
  if print_config is not None and print_config.value:
    print(config_lib.describe(cfg, filename))
    sys.exit(0)
  for holder in required:
    if holder.value is None:
      fail(f"--{holder.name} is required")
  return remaining
