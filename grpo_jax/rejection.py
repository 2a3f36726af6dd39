r"""Rejection sampling: K answers per problem from a policy, the good ones as an SFT dataset.

    python -m grpo_jax.rejection --model=runs/smollm2_arithmetic --task=arithmetic \
        --num_problems=512 --num_samples=8 --output=data/rs.jsonl
    python -m grpo_jax.rejection --model=/ckpt/Qwen2.5-7B-Instruct --task=jsonl \
        --task_kwargs='{"path": "gsm8k_train.jsonl", "prompt_key": "question"}' \
        --num_problems=7000 --num_samples=4 --require_format --output=data/distill.jsonl

Stage 3 of the R1 pipeline (docs/maths.md): sample many answers from the RL policy,
keep the correct and readable ones, SFT on them. Each sample goes through the
filters in this order and is counted under the first one it fails
(`stats["rejected"]`), so kept + sum(rejected) == samples:

    truncated     no stop token within --max_new_tokens (an unfinished answer)
    unverifiable  the --reward function returned None (e.g. a ground truth it cannot parse)
    incorrect     the --reward function gave less than 1 (--reward=none turns this off)
    format        "format" (strict R1 <think>...</think><answer>...</answer>) below 1,
                  only with --require_format (--format_reward=format_lenient relaxes it)
    language      "language_consistency" below --min_language_share (1 = every word of the
                  reasoning in the target script; the task's `language` column, default latin)
    duplicate     the same text as an earlier surviving sample of the same problem
    surplus       beyond --keep_per_problem survivors of its problem

`stats["failed"]` counts every sample that fails each check on its own (with
every answer verifiable, 1 - failed.incorrect / samples is the policy's pass@1).
A sample of exactly --max_new_tokens tokens counts as truncated even when its
last token was a stop token (`sample_texts` returns lengths, not the flag).

Which survivors are kept (--prefer): "first" (the default) keeps them in the
order they were sampled, which for i.i.d. samples is a uniform draw from the
accepted answers: the dataset keeps the policy's own distribution of correct
answers. "shortest" prefers short answers (less rambling), but on problems a
model can guess it favours a bare guess over a worked answer, so it is opt-in.

Output: one JSON object per kept sample, {"prompt": the raw question (before
any template: the SFT stage applies its own), "completion": the text, "answer":
..., and the task's other columns}, i.e. directly the {"prompt", "completion"}
format of SFT. FILE.stats.json beside it (FILE.jsonl -> FILE.stats.json) holds
the statistics and the settings; the same JSON is printed to stdout, progress
goes to stderr.

Distillation is the same command with a teacher: --model is any model
`models.load` reads (a known name, a Hugging Face checkpoint folder, a .gguf
file, or a training workdir, whose latest checkpoint is used), so
`--model=TEACHER` writes the teacher's filtered traces and a student is then
SFT-ed on the file. The teacher samples under its own chat template
(--template); the file keeps the raw question, so the student's template applies.

Sampling runs through `evaluate.sample_texts` on one process (a whole model per host).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

import numpy as np
from absl import app, flags

from grpo_jax import cli, rewards

# The filters, in the order a sample meets them; the first it fails is its rejection reason.
REASONS = ("truncated", "unverifiable", "incorrect", "format", "language", "duplicate", "surplus")
PREFER = ("first", "shortest")


def stats_path(output: str) -> str:
  """FILE.jsonl -> FILE.stats.json (any other name gets .stats.json appended)."""
  return (output[:-len(".jsonl")] if output.endswith(".jsonl") else output) + ".stats.json"


def _check_reward(name: str | None) -> None:
  if name is not None and name not in rewards.REWARD_FUNCTIONS:
    raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(rewards.REWARD_FUNCTIONS)}")


def _scores(reward, prompts, completions, columns) -> np.ndarray:
  """Rewards [n] of `reward`, a REWARD_FUNCTIONS name or a reward function (NaN for None);
  None: all 1."""
  if reward is None:
    return np.ones(len(completions))
  if not callable(reward):
    _check_reward(reward)
    reward = rewards.REWARD_FUNCTIONS[reward]
  values = reward(prompts=prompts, completions=completions, **columns)
  return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)


def filter_samples(examples: Sequence[dict], texts: Sequence[Sequence[str]], lengths,
                   *, max_new_tokens: int, reward: str | Callable | None = "accuracy_lenient",
                   format_reward: str | None = None, min_language_share: float = 1.0,
                   keep_per_problem: int = 1, prefer: str = "first") -> tuple[list, dict]:
  """Applies the filters (module docstring) to K samples per problem.

  The filters run in one function, in the documented order, because each sample is counted
  under the first one it fails: the order is the contract.

  Args:
    examples: P task examples ({"prompt", "answer", ...}).
    texts: texts[i] are the K completions of examples[i].
    lengths: [P, K] completion lengths in tokens, the stop token included; a
      length of max_new_tokens counts as truncated (see `rejection_sample`).
    max_new_tokens: the sampling budget.
    reward: REWARD_FUNCTIONS name (or a reward function, e.g. one with keywords bound:
      `cli.reward_with_kwargs`) that says an answer is right (reward 1), or
      None to keep wrong answers too.
    format_reward: REWARD_FUNCTIONS name that says an answer is well formatted,
      or None for no format filter.
    min_language_share: least `language_consistency` reward kept (0 = off).
    keep_per_problem: most samples kept per problem.
    prefer: "first" (sampling order) or "shortest" (fewest tokens, then order).

  Returns:
    (rows, stats): the kept rows in problem order, and the statistics.
  """
  if prefer not in PREFER:
    raise ValueError(f"prefer={prefer!r}; expected one of {list(PREFER)}")
  if keep_per_problem < 1:
    raise ValueError(f"keep_per_problem must be >= 1; got {keep_per_problem}")
  lengths = np.asarray(lengths).reshape(len(examples), -1)
  rejected = dict.fromkeys(REASONS, 0)
  failed = dict.fromkeys(REASONS[:5], 0)
  rows, kept_tokens, problems_kept = [], [], 0
  for ex, samples, lens in zip(examples, texts, lengths, strict=True):
    k = len(samples)
    prompts = [ex["prompt"]] * k
    columns = {key: [value] * k for key, value in ex.items() if key != "prompt"}
    checks = {"truncated": lens >= max_new_tokens}
    right = _scores(reward, prompts, samples, columns)
    checks["unverifiable"] = np.isnan(right)
    checks["incorrect"] = ~checks["unverifiable"] & ~(right >= 1.0)
    checks["format"] = ~(_scores(format_reward, prompts, samples, columns) >= 1.0)
    if min_language_share > 0:
      share = _scores("language_consistency", prompts, samples, columns)
      checks["language"] = ~(share >= min_language_share)
    else:
      checks["language"] = np.zeros(k, bool)
    for name, fails in checks.items():
      failed[name] += int(fails.sum())

    survivors, seen = [], set()
    for j, text in enumerate(samples):
      reason = next((name for name, fails in checks.items() if fails[j]), None)
      if reason is None and text in seen:
        reason = "duplicate"
      if reason is None:
        seen.add(text)
        survivors.append(j)
      else:
        rejected[reason] += 1
    if prefer == "shortest":
      survivors.sort(key=lambda j: (lens[j], j))  # stable: ties keep sampling order
    rejected["surplus"] += max(0, len(survivors) - keep_per_problem)
    problems_kept += bool(survivors)
    for j in survivors[:keep_per_problem]:
      row = {"prompt": ex["prompt"], "completion": samples[j]}
      row.update((name, value) for name, value in ex.items() if name not in row)
      rows.append(row)
      kept_tokens.append(int(lens[j]))

  samples_total = int(lengths.size)
  kept_chars = [len(row["completion"]) for row in rows]
  stats = {
      "problems": len(examples),
      "samples": samples_total,
      "kept": len(rows),
      "acceptance_rate": len(rows) / samples_total if samples_total else 0.0,
      "problems_with_kept": problems_kept,
      "problems_with_kept_fraction": problems_kept / len(examples) if examples else 0.0,
      "mean_kept_length_tokens": float(np.mean(kept_tokens)) if rows else 0.0,
      "mean_kept_length_chars": float(np.mean(kept_chars)) if rows else 0.0,
      "rejected": rejected,
      "failed": failed,
  }
  return rows, stats


def rejection_sample(graphdef, params, tokenizer, examples: Sequence[dict], *,
                     template: str = "chat", num_samples: int = 8, temperature: float = 1.0,
                     top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
                     keep_per_problem: int = 1, prefer: str = "first",
                     reward: str | Callable | None = "accuracy_lenient",
                     require_format: bool = False,
                     format_reward: str = "format", min_language_share: float = 1.0,
                     key=None, seed: int = 0, prompts_per_batch: int = 16,
                     stop_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                     progress: bool = True,
                     sampler: Callable | None = None) -> tuple[list[dict], dict]:
  """Samples `num_samples` answers per example and keeps the good ones (module docstring).

  Args:
    graphdef, params: the policy (or teacher), as `nnx.split` gives them.
    tokenizer: its transformers tokenizer.
    examples: task examples {"prompt": raw question, "answer": ..., ...}.
    template: how the policy sees a question (data.TEMPLATES).
    num_samples, temperature, top_p, top_k, max_new_tokens: sampling settings.
    keep_per_problem, prefer, reward, min_language_share: see `filter_samples`.
    require_format: also require `format_reward` (strict R1 "format" by default) to be 1.
    key: a jax.random key (default: jax.random.key(seed)).
    prompts_per_batch: problems sampled per call of the compiled sampler.
    stop_ids: tokens that end an answer (default `templates.stop_ids(tokenizer, stop_strings)`).
    stop_strings: strings that end an answer, cut before them (e.g. ("\n",)); see
      `templates.stop_ids`.
    progress: a tqdm bar on stderr.
    sampler: `evaluate.sample_texts` or a function with its signature (tests
      inject fakes). It returns token lengths, not the sampler's truncated flag,
      so an answer whose stop token is exactly its max_new_tokens-th token
      counts as truncated (conservative: never the other way round).

  Returns:
    (rows, stats): rows {"prompt", "completion", "answer", other columns}; stats
    as in `filter_samples`.
  """
  import jax
  import tqdm

  from grpo_jax import evaluate
  from grpo_jax.data import batching, format_prompt, templates

  if not examples:
    raise ValueError("no examples to sample")
  _check_reward(reward)
  _check_reward(format_reward if require_format else None)
  sampler = sampler or evaluate.sample_texts
  key = jax.random.key(seed) if key is None else key
  stop_ids = tuple(stop_ids or templates.stop_ids(tokenizer, stop_strings))
  prompts = [format_prompt(ex, template, tokenizer) for ex in examples]
  # One prompt length for all batches: one compiled sampler.
  longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
  prompt_length = batching.bucket_length(longest)
  texts, lengths = [], []
  with tqdm.tqdm(total=len(prompts), desc="rejection sampling", unit="problem", file=sys.stderr,
                 disable=not progress) as bar:
    for start in range(0, len(prompts), prompts_per_batch):
      chunk = prompts[start:start + prompts_per_batch]
      out_texts, out_lengths = sampler(
          graphdef, params, tokenizer, chunk, num_samples=num_samples,
          max_new_tokens=max_new_tokens, temperature=temperature,
          key=jax.random.fold_in(key, start), stop_ids=stop_ids,
          prompts_per_batch=prompts_per_batch, prompt_length=prompt_length, top_p=top_p,
          top_k=top_k, stop_strings=tuple(stop_strings))
      texts.extend(list(t) for t in out_texts)
      lengths.append(np.asarray(out_lengths).reshape(len(chunk), num_samples))
      bar.update(len(chunk))
  return filter_samples(examples, texts, np.concatenate(lengths), max_new_tokens=max_new_tokens,
                        reward=reward, format_reward=format_reward if require_format else None,
                        min_language_share=min_language_share, keep_per_problem=keep_per_problem,
                        prefer=prefer)


def write_dataset(rows: Sequence[dict], stats: dict, output: str) -> None:
  """Writes the rows to `output` (JSON lines) and the stats beside it, each atomically."""
  folder = os.path.dirname(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  for path, text in ((output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
                     (stats_path(output), json.dumps(stats, indent=2) + "\n")):
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


# Rejection sampling's own flags; the shared ones (model, task, sampling, num_problems, ...)
# are grpo_jax.cli's, with the defaults in DEFAULTS.
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"],
                           "problems to sample (eval problems should stay held out)")
_START_INDEX = flags.DEFINE_integer("start_index", 0, "first problem of the split")
_KEEP_PER_PROBLEM = flags.DEFINE_integer("keep_per_problem", 1, "most answers kept per problem")
_PREFER = flags.DEFINE_enum("prefer", "first", list(PREFER),
                            "which survivors a problem keeps first")
_REQUIRE_FORMAT = flags.DEFINE_bool("require_format", False,
                                    "also require --format_reward to give 1")
_FORMAT_REWARD = flags.DEFINE_string("format_reward", "format", "the format check of "
                                     "--require_format: format (strict R1 tags) or format_lenient")
_MIN_LANGUAGE_SHARE = flags.DEFINE_float(
    "min_language_share", 1.0,
    "least share of the reasoning's words in the target script (0 = off)")
for _name in ("model", "task", "task_kwargs", "num_problems", "num_samples", "output", "template",
              "temperature", "top_p", "top_k", "max_new_tokens", "stop_strings", "reward",
              "reward_kwargs", "prompts_per_batch", "seed", "dtype"):
  flags.declare_key_flag(_name)

# Rejection sampling's defaults for shared flags (--reward=none turns the correctness filter
# off; answers longer than --max_new_tokens are rejected; the JSONL stats go to FILE.stats.json).
DEFAULTS = {"num_samples": 8, "template": "chat", "reward": "accuracy_lenient"}


def main(argv) -> None:
  cli.no_arguments(argv)
  cli.require(cli.MODEL, cli.TASK, cli.OUTPUT)
  cli.positive(cli.NUM_PROBLEMS, cli.NUM_SAMPLES, cli.PROMPTS_PER_BATCH, _KEEP_PER_PROBLEM)
  cli.check_sampling()
  f = flags.FLAGS
  reward = None if f.reward.lower() == "none" else f.reward
  cli.check_reward(reward)  # before the model loads
  reward_kwargs = f.reward_kwargs and cli.parse_json_object(f.reward_kwargs, "reward_kwargs")
  if reward_kwargs:
    if reward is None:
      raise app.UsageError("--reward_kwargs binds keywords to --reward; --reward=none has none")
    reward_fn = cli.reward_with_kwargs(reward, reward_kwargs)
  cli.check_reward(f.format_reward, "format_reward")
  task_kwargs = cli.parse_task_kwargs(f.task_kwargs)
  stop_strings = cli.parse_stop_strings(f.stop_strings)
  task = cli.make_task(f.task, task_kwargs)
  from flax import nnx

  from grpo_jax import models

  indices = range(f.start_index, f.start_index + f.num_problems)
  examples = [task.example(f.split, i) for i in indices]
  print(f"[rejection] loading {f.model}", file=sys.stderr)
  model, tokenizer = models.load(f.model, dtype=f.dtype)
  graphdef, params = nnx.split(model)
  rows, stats = rejection_sample(
      graphdef, params, tokenizer, examples, template=f.template, num_samples=f.num_samples,
      temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, max_new_tokens=f.max_new_tokens,
      keep_per_problem=f.keep_per_problem, prefer=f.prefer,
      reward=reward_fn if reward_kwargs else reward, require_format=f.require_format, format_reward=f.format_reward,
      min_language_share=f.min_language_share, seed=f.seed, prompts_per_batch=f.prompts_per_batch,
      stop_strings=stop_strings)
  stats["settings"] = {
      "model": f.model, "task": f.task, "task_kwargs": task_kwargs, "split": f.split,
      "start_index": f.start_index, "template": f.template, "num_samples": f.num_samples,
      "temperature": f.temperature, "top_p": f.top_p, "top_k": f.top_k,
      "max_new_tokens": f.max_new_tokens, "stop_strings": list(stop_strings),
      "keep_per_problem": f.keep_per_problem,
      "prefer": f.prefer, "reward": reward, "reward_kwargs": reward_kwargs or None,
      "format_reward": f.format_reward if f.require_format else None,
      "min_language_share": f.min_language_share, "seed": f.seed, "output": f.output}
  write_dataset(rows, stats, f.output)
  print(f"[rejection] kept {stats['kept']} of {stats['samples']} samples -> {f.output}",
        file=sys.stderr)
  print(json.dumps(stats, indent=2))


if __name__ == "__main__":
  cli.run(main, DEFAULTS)
