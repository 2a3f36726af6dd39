"""Combining reward functions: the registry, the error-handling scorer and the weighted sum.

None from a function means "no reward for this completion": `weigh_scores`
skips it, and a completion that no function rewards gets NaN, which
`advantages.py` treats as missing.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import math
from typing import Sequence

import numpy as np

from grpo_jax.rewards.bertscore import bertscore_reward
from grpo_jax.rewards.countdown import countdown_reward
from grpo_jax.rewards.functions import (RewardFn, accuracy_reward, exact_match_reward,
                                        format_reward, lenient_accuracy_reward,
                                        lenient_format_reward, math_accuracy_reward,
                                        regex_format_reward, rouge1_reward, rougeL_reward,
                                        tag_count_reward)
from grpo_jax.rewards.language import language_consistency_reward


class RewardError(RuntimeError):
  """A reward function failed or broke the reward-function contract."""


# The rule rewards by the name `config.rewards` gives them.
REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "accuracy_lenient": lenient_accuracy_reward,
    "math_accuracy": math_accuracy_reward,
    "format": format_reward,
    "format_lenient": lenient_format_reward,
    "tag_count": tag_count_reward,
    "language_consistency": language_consistency_reward,
    "exact_match": exact_match_reward,
    "rouge1": rouge1_reward,
    "rougeL": rougeL_reward,
    "regex_format": regex_format_reward,
    "bertscore": bertscore_reward,  # needs the bertscore extra and an encoder on disk
    "countdown": countdown_reward,
}


def reward_fn_name(fn) -> str:
  """__name__ of a function (or of a partial's function), else its class name."""
  if isinstance(fn, functools.partial):
    return reward_fn_name(fn.func)
  return getattr(fn, "__name__", None) or type(fn).__name__


# Rewards the training loop builds at run time (they need a model), by name in config.rewards.
RUNTIME_REWARDS = ("judge",)  # judge.py: a model ranks each group's answers (config.judge)


def parse_rewards(text: str) -> list[tuple[str, float]]:
  """`config.rewards` as the command line writes it: "name:weight,name:weight" ("name" alone
  weighs 1), e.g. "accuracy:1,format:0.5" -> [("accuracy", 1.0), ("format", 0.5)].

  Only the syntax is checked here; `get_reward_fns` checks the names.
  """
  specs = []
  for item in text.split(","):
    name, sep, weight = item.strip().partition(":")
    name = name.strip()
    if not name:
      raise ValueError(f"{text!r}: expected name:weight pairs separated by commas, e.g. "
                       '"accuracy:1,format:0.5"')
    try:
      specs.append((name, float(weight) if sep else 1.0))
    except ValueError:
      raise ValueError(f"{text!r}: the weight of {name!r} is {weight!r}, not a number") from None
  return specs


def format_rewards(specs) -> str:
  """The "name:weight,..." form of (name_or_fn, weight) pairs, as `parse_rewards` reads it."""
  named, weights = get_reward_fns(specs, check=False)
  return ",".join(f"{name}:{weight:g}" for (name, _), weight in zip(named, weights))


def reward_keywords(fn) -> dict[str, inspect.Parameter]:
  """The keywords `config.reward_kwargs` may set for a reward function: its named parameters
  after prompts and completions (settings and, like `language`, columns that one value can
  stand for). A keyword-only one without a default must be set (regex_format's pattern)."""
  fn = fn.func if isinstance(fn, functools.partial) else fn
  return {name: p for name, p in inspect.signature(fn).parameters.items()
          if name not in ("prompts", "completions")
          and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_reward_kwargs(name: str, fn, kwargs: dict) -> None:
  """ValueError naming the fix for keywords `fn` does not take, required ones left out, or
  values it cannot use (its `check_kwargs`: a pattern that does not compile, a missing
  encoder folder); called for every named reward at start-up, with or without keywords."""
  known = reward_keywords(fn)
  for key in kwargs:
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"reward {name!r} takes no keyword {key!r}; {hint}its keywords: "
                       f"{', '.join(known) or 'none'} (config.reward_kwargs.{name})")
  for key, p in known.items():
    if p.kind == p.KEYWORD_ONLY and p.default is p.empty and key not in kwargs:
      raise ValueError(f"reward {name!r} needs the keyword {key!r}: set "
                       f"--config.reward_kwargs.{name}.{key}=VALUE (or config.reward_kwargs in "
                       "the config file)")
  check = getattr(fn, "check_kwargs", None)
  if check is not None:
    try:
      check(**kwargs)
    except ValueError as e:
      raise ValueError(f"config.reward_kwargs.{name}: {e}") from None


def _with_kwargs(name: str, fn, kwargs: dict | None, tokenizer=None, check: bool = True):
  """`fn` with its config keywords bound (functools.partial), checked; "policy" for a
  tokenizer keyword becomes `tokenizer` when there is one."""
  kwargs = dict(kwargs or {})
  if check:
    check_reward_kwargs(name, fn, kwargs)
  if tokenizer is not None and kwargs.get("tokenizer") == "policy":
    kwargs["tokenizer"] = tokenizer
  return functools.partial(fn, **kwargs) if kwargs else fn


def kwargs_dict(reward_kwargs) -> dict:
  """config.reward_kwargs (a ConfigDict or a dict of dicts) as plain dicts."""
  if reward_kwargs is None:
    return {}
  if hasattr(reward_kwargs, "to_dict"):
    reward_kwargs = reward_kwargs.to_dict()
  out = {}
  for name, kwargs in dict(reward_kwargs).items():
    if hasattr(kwargs, "to_dict"):
      kwargs = kwargs.to_dict()
    if not isinstance(kwargs, dict):
      raise ValueError(f"config.reward_kwargs.{name}={kwargs!r}: expected the keywords of "
                       f"reward {name!r} as a dict, e.g. {{'pattern': '...'}}")
    out[name] = kwargs
  return out


def reward_fn(name: str, reward_kwargs=None, tokenizer=None) -> RewardFn:
  """The REWARD_FUNCTIONS entry `name` with its keywords from `reward_kwargs` (config.
  reward_kwargs: {name: {keyword: value}}) bound: what config.eval.reward scores with."""
  if name not in REWARD_FUNCTIONS:
    raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARD_FUNCTIONS)}.")
  return _with_kwargs(name, REWARD_FUNCTIONS[name], kwargs_dict(reward_kwargs).get(name),
                      tokenizer)


def get_reward_fns(specs, reward_kwargs=None, *, tokenizer=None,
                   check: bool = True) -> tuple[list[tuple[str, RewardFn]], list[float]]:
  """Resolves `config.rewards` into (named reward functions, weights).

  Args:
    specs: sequence of (name_or_fn, weight), or bare names / functions
      (weight 1), or the command line's string "name:weight,name:weight"
      (`parse_rewards`). Names are keys of REWARD_FUNCTIONS or RUNTIME_REWARDS;
      a RUNTIME_REWARDS name comes back with None as its function, for the
      caller that has the model to build it.
    reward_kwargs: `config.reward_kwargs`, {reward name: {keyword: value}}: keywords bound to
      that reward (functools.partial), e.g. {"regex_format": {"pattern": "..."}}. Every name
      must be a known reward (or a function's name in `specs`) and every keyword one that the
      function takes (`check_reward_kwargs`); ValueError otherwise.
    tokenizer: the policy's tokenizer, put in place of a `tokenizer="policy"` keyword (the
      ROUGE rewards); None leaves "policy" there (start-up validation).
    check: False resolves the names only: no keyword is checked (`format_rewards`, and the
      command line before it has read config.reward_kwargs).

  Returns:
    ([(name, fn)], [weight]), ready for `combine_rewards(*get_reward_fns(...), ...)`.
  """
  if isinstance(specs, str):  # else iterating it would take each character for a name
    specs = parse_rewards(specs)
  kwargs_by_name = kwargs_dict(reward_kwargs)
  named, weights = [], []
  for spec in specs:
    fn, weight = (spec, 1.0) if isinstance(spec, str) or callable(spec) else spec
    if callable(fn):
      name = reward_fn_name(fn)
      named.append((name, _with_kwargs(name, fn, kwargs_by_name.get(name), tokenizer, check)))
    elif fn in REWARD_FUNCTIONS:
      named.append((fn, _with_kwargs(fn, REWARD_FUNCTIONS[fn], kwargs_by_name.get(fn),
                                     tokenizer, check)))
    elif fn in RUNTIME_REWARDS:
      named.append((fn, None))
    else:
      raise ValueError(f"unknown reward {fn!r}; known rewards: "
                       f"{sorted(REWARD_FUNCTIONS) + list(RUNTIME_REWARDS)}.")
    weights.append(float(weight))
  used = {name for name, _ in named}
  for name, kwargs in kwargs_by_name.items():
    if name in used or not check:
      continue
    if name not in REWARD_FUNCTIONS:  # keywords of a reward the config may use elsewhere
      close = difflib.get_close_matches(name, sorted(REWARD_FUNCTIONS) + sorted(used), n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"config.reward_kwargs.{name}: no reward is named {name!r}; {hint}"
                       f"known rewards: {sorted(REWARD_FUNCTIONS)}")
    _with_kwargs(name, REWARD_FUNCTIONS[name], kwargs, tokenizer)  # checked all the same
  return named, weights


def _short(completion, limit: int = 200) -> str:
  text = repr(completion)
  return text if len(text) <= limit else text[:limit] + "..."


def _checked_value(value) -> float:
  """float(value), NaN for None; raises on non-numbers and on NaN / inf."""
  if value is None:
    return math.nan
  if isinstance(value, (str, bytes)):
    raise TypeError(f"returned {value!r}, not a number")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"returned {value}; rewards must be finite (None means 'no reward')")
  return value


def _row_columns(columns: dict, i: int, n: int) -> dict:
  """The columns of row i as length-1 lists; other keyword values unchanged."""
  return {k: v[i:i + 1] if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n else v
          for k, v in columns.items()}


def _score(name, fn, prompts, completions, columns):
  """One function's rewards [N] (NaN = None) and [(row, exception)] failures."""
  n = len(completions)
  try:
    values = list(fn(prompts=prompts, completions=completions, **columns))
  except Exception as batch_error:  # any bug in user code: find the row, then report or zero it
    # Call row by row to find out which completion it chokes on.
    values, failures = [], []
    for i in range(n):
      try:
        row = list(fn(prompts=None if prompts is None else prompts[i:i + 1],
                      completions=completions[i:i + 1], **_row_columns(columns, i, n)))
      except Exception as e:
        values.append(math.nan)
        failures.append((i, e))
        continue
      if len(row) != 1:
        raise RewardError(f"reward function {name!r} returned {len(row)} values for 1 completion.")
      values.append(row[0])
    if not failures:
      raise RewardError(f"reward function {name!r} raised {type(batch_error).__name__}: "
                        f"{batch_error} on the batch, but on no single completion."
                        ) from batch_error
  else:
    failures = []
    if len(values) != n:
      raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} "
                        "completions.")
  rewards = np.full(n, np.nan)
  failed = {i for i, _ in failures}
  for i, value in enumerate(values):
    if i in failed:
      continue
    try:
      rewards[i] = _checked_value(value)
    except (TypeError, ValueError) as e:
      failures.append((i, e))
  return rewards, sorted(failures, key=lambda f: f[0])


def combine_rewards(reward_fns, weights, prompts, completions, *, on_error: str = "raise",
                    **columns):
  """Weighted sum of reward functions, skipping their None rewards.

  Args:
    reward_fns: functions or (name, function) pairs; a bare function is named
      by its __name__. Names must be unique.
    weights: one float per function, or None for all 1.
    prompts: N prompts (strings or chat messages).
    completions: N completions (strings or chat messages).
    on_error: "raise": a function that raises, or returns NaN / inf / a
      non-number, raises RewardError naming it and the completion. "zero":
      that completion gets 0 from that function, counted in
      `rewards/<name>/errors`. A list of the wrong length always raises.
    **columns: per-row dataset columns, passed on to every function.

  Returns:
    (rewards [N] float32, metrics). A completion that every function gave None
    is NaN (missing; TRL's nansum would make it 0). Metrics hold
    `rewards/<name>/mean` (of the unweighted rewards, NaN if all None) and,
    with on_error="zero", `rewards/<name>/errors`.
  """
  scores = score_rewards(reward_fns, prompts, completions, on_error=on_error, **columns)
  return weigh_scores(scores, weights)


@dataclasses.dataclass
class Scores:
  """Each reward function's unweighted rewards: what `score_rewards` measured.

  Scores of disjoint slices of a batch (e.g. one per host) concatenate with
  `Scores.concatenate`, and `weigh_scores` of the whole gives the batch's
  rewards and metrics.
  """
  names: list[str]
  rewards_NxF: np.ndarray  # NaN = the function gave None
  errors_F: np.ndarray  # rows set to 0 after a failure (on_error="zero")
  on_error: str = "raise"

  @staticmethod
  def concatenate(parts: Sequence["Scores"]) -> "Scores":
    return Scores(parts[0].names, np.concatenate([p.rewards_NxF for p in parts]),
                  np.sum([p.errors_F for p in parts], axis=0), parts[0].on_error)


def score_rewards(reward_fns, prompts, completions, *, on_error: str = "raise",
                  **columns) -> Scores:
  """Every function's rewards for N completions (see `combine_rewards` for the arguments)."""
  if on_error not in ("raise", "zero"):
    raise ValueError(f"on_error={on_error!r} is not supported; expected one of ['raise', 'zero'].")
  named = [(reward_fn_name(f), f) if callable(f) else tuple(f) for f in reward_fns]
  names = [name for name, _ in named]
  if not named or len(set(names)) != len(names):
    raise ValueError(f"need at least one reward function, with unique names; got {names}.")
  completions = list(completions)
  if prompts is not None and len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions.")
  per_fn, errors = [], []
  for name, fn in named:
    rewards, failures = _score(name, fn, prompts, completions, columns)
    if failures and on_error == "raise":
      i, e = failures[0]
      raise RewardError(f"reward function {name!r} failed ({type(e).__name__}: {e}) on "
                        f"completion {i}: {_short(completions[i])}") from e
    for i, e in failures:
      logging.warning("reward function %r: %s: %s on completion %d, reward set to 0.",
                      name, type(e).__name__, e, i)
      rewards[i] = 0.0
    per_fn.append(rewards)
    errors.append(len(failures))
  return Scores(names, np.stack(per_fn, axis=1), np.asarray(errors), on_error)


def weigh_scores(scores: Scores, weights) -> tuple[np.ndarray, dict]:
  """(rewards [N] float32, metrics) from `Scores`: see `combine_rewards`."""
  f = len(scores.names)
  weights = [1.0] * f if weights is None else [float(w) for w in weights]
  if len(weights) != f:
    raise ValueError(f"{len(weights)} weights for {f} reward functions {scores.names}.")
  rewards_NxF = scores.rewards_NxF
  present_NxF = ~np.isnan(rewards_NxF)
  metrics = {}
  for j, name in enumerate(scores.names):
    column = rewards_NxF[present_NxF[:, j], j]
    metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.size else math.nan
    if scores.on_error == "zero":
      metrics[f"rewards/{name}/errors"] = int(scores.errors_F[j])
  weighted = np.where(present_NxF, rewards_NxF * np.asarray(weights), 0.0).sum(axis=1)
  return np.where(present_NxF.any(axis=1), weighted, np.nan).astype(np.float32), metrics
