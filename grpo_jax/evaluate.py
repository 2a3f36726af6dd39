"""Evaluation on held-out problems: pass@1, maj@k and pass@k over k samples per problem.

From the command line (one JSON object on stdout; progress on stderr):

    python -m grpo_jax.evaluate --model=runs/smollm2_arithmetic --task=arithmetic \\
        --task_kwargs='{"max_digits": 1}' --num_problems=48 --num_samples=4 --output=eval.jsonl
    {"pass@1": 0.766, "pass@1_ci95": [0.70, 0.83], "maj@4": 0.771, ..., "num_problems": 48,
     "num_distinct_problems": 17, ...}

The problems are the task's first --num_problems distinct held-out problems
(--allow_repeats: the first eval examples, repeats included); a split with
fewer gives what it has, and "num_distinct_problems" says how many. The 95%
intervals of pass@1 and maj@k come from a bootstrap over those distinct
problems (`interval`): the uncertainty of the score as an estimate over the
task's problem space, for the model's sampling at this temperature.

--model takes what `models.load` takes: a known name, a Hugging Face folder, a
.gguf file or a training workdir. With a workdir, --task is optional: the
flags not given among --task, --task_kwargs, --template and --max_new_tokens
take the run's config.json values (task.name, task.kwargs, task.template,
rl.max_completion_length); stderr and the summary's "from_workdir" say which.

    python -m grpo_jax.evaluate --model=runs/smollm2_arithmetic --num_problems=48

--output writes one JSON line per problem (the prompt, the answer, the k
completions, which were right, the answers that voted) to read what the model
did. `python -m grpo_jax.evaluate --help` lists every flag.

From code (train.py evaluates this way):

    metrics = evaluate(graphdef, params, tokenizer, examples, template="chat",
                       num_samples=4, temperature=1.0, max_new_tokens=128, key=key,
                       stop_ids=templates.stop_ids(tokenizer))

A completion is right when `correct_fn` (a TRL-signature reward) gives it full
credit (>= 1). pass@1 is the mean accuracy over all k samples (docs/maths.md);
maj@k the accuracy of the most frequent answer among the k; pass@k the unbiased
estimator of the probability that at least one of k samples is right (with
n = k samples drawn, it is the fraction of problems with any right sample).
The command line's keys are those of metrics.jsonl without "eval/" (eval/pass@1
there is pass@1 here); an interval is one [low, high] key here ("pass@1_ci95"),
two keys there ("eval/pass@1_ci95_low", "eval/pass@1_ci95_high").
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sys
import time
import types
from typing import Callable, Sequence

import jax
import numpy as np
from absl import app, flags

from grpo_jax import cli, distributed, rewards, sampling
from grpo_jax.data import TASKS, TEMPLATES, batching, format_prompt, templates

# (prompts, k) -> (k completion texts per prompt, their token lengths [len(prompts), k]).
Sampler = Callable[[Sequence[str], int], tuple[list[list[str]], np.ndarray]]


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def vote_key(text: str):
  """What a completion's vote counts for in maj@k, or None when it does not vote.

  The final answer (`rewards.lenient_final_answer`: the <answer> or \\boxed{}
  content, else the last number) as an exact number when it is one ("1,000",
  "1000.0" and "\\frac{2}{2}" vote together), else as a whitespace-normalised
  string (an equation, a LaTeX expression); no answer or an empty one: None.
  """
  answer = rewards.lenient_final_answer(text)
  if answer is None:
    return None
  number = rewards.parse_number(answer)
  if number is not None:
    return number
  return " ".join(answer.split()) or None


def score_problem(example: dict, texts: Sequence[str],
                  correct_fn: Callable = rewards.accuracy_reward) -> dict:
  """One problem's k completions judged: which are right, the votes and the majority.

  Returns:
    {"correct": [bool] * k, "ungraded": completions correct_fn returned None for,
     "votes": [str | None] * k (each completion's `vote_key`), "majority": the
     winning vote (ties: the first seen) or None, "majority_correct": bool}.
  """
  k = len(texts)
  columns = {key: [value] * k for key, value in example.items() if key != "prompt"}
  values = list(correct_fn(prompts=[example["prompt"]] * k, completions=list(texts), **columns))
  correct = [v is not None and float(v) >= 1.0 for v in values]
  keys = [vote_key(t) for t in texts]
  votes = collections.Counter(key for key in keys if key is not None)
  majority = votes.most_common(1)[0][0] if votes else None  # Counter keeps first-seen order
  return {"correct": correct, "ungraded": sum(v is None for v in values),
          "votes": [None if key is None else str(key) for key in keys],
          "majority": None if majority is None else str(majority),
          "majority_correct": majority is not None and correct[keys.index(majority)]}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval of a proportion, successes of n trials (95% for the default z)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def interval(right, total, groups=None, resamples: int = 2000, seed: int = 0
             ) -> tuple[float, float]:
  """95% interval of sum(right) / sum(total) by a cluster bootstrap over problems.

  right[i] / total[i] is row i's score (pass@1: right samples of k; maj@k: 0 or 1 of 1).
  Rows with the same `groups` value (the prompt: an evaluation that repeats a problem) form
  one cluster, so a repeat adds no information. Clusters are drawn with replacement,
  `resamples` times, and the 2.5% and 97.5% quantiles of the recomputed ratio are the
  interval. When every cluster scores the same 0 or 1 (the bootstrap collapses to a point),
  the Wilson interval over the clusters, which then are independent yes/no trials, is used.
  """
  groups = range(len(right)) if groups is None else groups
  cluster_right, cluster_total = collections.defaultdict(float), collections.defaultdict(float)
  for g, r, t in zip(groups, right, total, strict=True):
    cluster_right[g] += r
    cluster_total[g] += t
  right_C = np.array(list(cluster_right.values()))
  total_C = np.array(list(cluster_total.values()))
  scores = right_C / total_C
  if np.all(scores == 0) or np.all(scores == 1):
    return wilson_interval(float(scores.sum()), len(scores))
  draws = np.random.default_rng(seed).integers(0, len(right_C), (resamples, len(right_C)))
  stats = right_C[draws].sum(1) / total_C[draws].sum(1)
  return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def _metrics(judged: Sequence[dict], completions: Sequence[Sequence[str]], lengths=None,
             prompts: Sequence[str] | None = None) -> dict:
  """`score`'s metrics; `prompts` (one per problem) group repeated problems for the intervals
  and the distinct count (None: every problem is distinct)."""
  k = len(completions[0])
  if any(len(texts) != k for texts in completions):
    raise ValueError(f"every problem needs the same number of completions; got "
                     f"{sorted({len(texts) for texts in completions})}")
  groups = list(range(len(judged)) if prompts is None else prompts)
  right = [sum(j["correct"]) for j in judged]
  majority = [float(j["majority_correct"]) for j in judged]
  pass1_low, pass1_high = interval(right, [k] * len(judged), groups)
  maj_low, maj_high = interval(majority, [1] * len(judged), groups)
  metrics = {
      "eval/pass@1": float(np.mean([np.mean(j["correct"]) for j in judged])),
      "eval/pass@1_ci95_low": pass1_low,
      "eval/pass@1_ci95_high": pass1_high,
      f"eval/maj@{k}": float(np.mean([j["majority_correct"] for j in judged])),
      f"eval/maj@{k}_ci95_low": maj_low,
      f"eval/maj@{k}_ci95_high": maj_high,
      f"eval/pass@{k}": float(np.mean([pass_at_k(k, sum(j["correct"]), k) for j in judged])),
      "eval/num_problems": len(judged),
      "eval/num_distinct_problems": len(set(groups)),
      "eval/mean_length_chars": float(np.mean([len(t) for texts in completions for t in texts])),
  }
  if lengths is not None:
    metrics["eval/mean_length"] = float(np.mean(lengths))
  return metrics


def score(examples: Sequence[dict], completions: Sequence[Sequence[str]],
          correct_fn: Callable = rewards.accuracy_reward, lengths=None) -> dict:
  """Metrics from k completions per example (a fake model's outputs in tests).

  Args:
    examples: problems with "prompt" and "answer" (and any columns correct_fn reads).
    completions: completions[i] are the k texts sampled for examples[i].
    correct_fn: a TRL-signature reward returning 1.0 for a right answer.
    lengths: optional token lengths [len(examples), k]; adds "eval/mean_length".

  Returns:
    {"eval/pass@1", "eval/maj@k", "eval/pass@k", "eval/num_problems",
     "eval/num_distinct_problems", "eval/mean_length_chars"[, "eval/mean_length"]} (one key
    for pass@k when k = 1), and the 95% intervals "eval/pass@1_ci95_low" / "_high" and
    "eval/maj@k_ci95_low" / "_high" (`interval`: a bootstrap over the distinct problems).
  """
  judged = [score_problem(ex, texts, correct_fn)
            for ex, texts in zip(examples, completions, strict=True)]
  return _metrics(judged, completions, lengths, [ex["prompt"] for ex in examples])


def sample_texts(graphdef, params, tokenizer, prompts: Sequence[str], *, num_samples: int,
                 max_new_tokens: int, temperature: float, key, stop_ids,
                 prompts_per_batch: int = 16, prompt_length: int | None = None,
                 top_p: float = 1.0, top_k: int = 0,
                 on_batch: Callable[[int, int], None] | None = None, batch_sh=None,
                 stop_strings: Sequence[str] = ()):
  """k completions (text) per prompt, and their token lengths [len(prompts), k].

  Prompts go in fixed-size batches (the last one padded with repeats), so one
  program serves every batch. Lengths count the stop token when there is one. With
  `stop_strings` (whose tokens are among `stop_ids`: `templates.stop_ids`) each text ends
  before the first of them.
  `on_batch(done, total)` is called after each batch (progress reports).

  `batch_sh` (the run's `sharding.batch_sharding`, training's) splits each batch over the
  mesh's batch axes, as training splits its prompts: the batch of `prompts_per_batch` prompts
  is filled with repeats up to a multiple of the shards (their samples are dropped), each
  process tokenizes only the rows its devices hold, at a prompt length every process agrees
  on, and the sampled tokens are gathered, so every process returns the completions of all
  prompts. They are the completions of batch_sh=None (one device, every prompt on it): a
  row's sample depends on its key, row and prompt only. With several processes, call it on
  every process with the same prompts.
  """
  k, pad_id = num_samples, tokenizer.pad_token_id
  rows = distributed.padded_rows(prompts_per_batch, batch_sh)  # [B] prompts per sampler call
  mine = slice(0, rows) if batch_sh is None else distributed.local_rows(batch_sh, rows)
  batches = []  # (start, this process's rows [b] of the batch as token ids, real prompts)
  for start, chunk, real in batching.fixed_size_chunks(prompts, prompts_per_batch):
    chunk = (chunk + [chunk[-1]] * (rows - len(chunk)))[mine]
    batches.append((start, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk],
                    real))
  longest = max(len(i) for _, ids, _ in batches for i in ids)
  if batch_sh is not None:
    longest = distributed.global_max(longest)
  length = prompt_length or batching.bucket_length(longest)
  texts, lengths = [], []
  for start, ids, real in batches:
    tokens_BxP, mask_BxP = batching.left_pad(ids, pad_id, length)
    mesh = contextlib.nullcontext()
    if batch_sh is not None:
      tokens_BxP, mask_BxP = distributed.to_global((tokens_BxP, mask_BxP), batch_sh)
      mesh = jax.set_mesh(batch_sh.mesh)  # the model's activation layouts apply
    with mesh:
      out = sampling.sample_jit(graphdef, params, tokens_BxP, mask_BxP,
                                jax.random.fold_in(key, start), num_generations=k,
                                max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                                pad_id=pad_id, temperature=temperature, top_p=top_p, top_k=top_k)
    if batch_sh is None:
      toks_NxT, lens_N = jax.device_get((out.tokens, out.lengths))
    else:  # this process's rows, then every process's: all of them decode the whole batch
      local = distributed.to_local({"tokens": out.tokens, "lengths": out.lengths}, batch_sh)
      whole = distributed.gather_rows(local, slice(mine.start * k, mine.stop * k))
      toks_NxT, lens_N = whole["tokens"], whole["lengths"]
    for i in range(real * k):
      texts.append(templates.decode_completion(tokenizer, toks_NxT[i, :lens_N[i]], stop_strings))
      lengths.append(int(lens_N[i]))
    if on_batch is not None:
      on_batch(start + real, len(prompts))
  return ([texts[i * k:(i + 1) * k] for i in range(len(prompts))],
          np.asarray(lengths).reshape(len(prompts), k))


def model_sampler(graphdef, params, tokenizer, *, max_new_tokens: int, temperature: float, key,
                  stop_ids, prompts_per_batch: int = 16, prompt_length: int | None = None,
                  top_p: float = 1.0, top_k: int = 0,
                  on_batch: Callable[[int, int], None] | None = None,
                  batch_sh=None, stop_strings: Sequence[str] = ()) -> Sampler:
  """A `Sampler` that draws from the model (graphdef, params) with `sample_texts`."""

  def sample(prompts, num_samples):
    return sample_texts(graphdef, params, tokenizer, prompts, num_samples=num_samples,
                        max_new_tokens=max_new_tokens, temperature=temperature, key=key,
                        stop_ids=stop_ids, prompts_per_batch=prompts_per_batch,
                        prompt_length=prompt_length, top_p=top_p, top_k=top_k, on_batch=on_batch,
                        batch_sh=batch_sh, stop_strings=stop_strings)

  return sample


def run(sampler: Sampler, examples: Sequence[dict], prompts: Sequence[str], *, num_samples: int,
        correct_fn: Callable = rewards.accuracy_reward) -> tuple[dict, list[dict]]:
  """Samples k completions per example with `sampler` and scores them.

  Args:
    sampler: (prompts, k) -> (texts [P][k], token lengths [P, k]): a model
      (`model_sampler`), or a fake one in tests.
    examples: the problems; prompts[i] is examples[i] under the template.
    num_samples: k.
    correct_fn: the reward that says a completion is right.

  Returns:
    (metrics as `score` returns them, with "eval/mean_length" in tokens;
     one record per problem: the example's fields, "prompt_text", "completions",
     "lengths", "correct", "num_correct", "votes", "majority", "majority_correct").
  """
  texts, lengths = sampler(list(prompts), num_samples)
  lengths = np.asarray(lengths)
  judged = [score_problem(ex, t, correct_fn) for ex, t in zip(examples, texts, strict=True)]
  records = []
  for i, (ex, prompt, t, j) in enumerate(zip(examples, prompts, texts, judged)):
    records.append({"index": i, **ex, "prompt_text": prompt, "completions": list(t),
                    "lengths": [int(n) for n in lengths[i]], "correct": j["correct"],
                    "num_correct": sum(j["correct"]), "ungraded": j["ungraded"],
                    "votes": j["votes"], "majority": j["majority"],
                    "majority_correct": j["majority_correct"]})
  return _metrics(judged, texts, lengths, [ex["prompt"] for ex in examples]), records


def evaluate(graphdef, params, tokenizer, examples: Sequence[dict], *, template: str,
             num_samples: int, temperature: float, max_new_tokens: int, key, stop_ids,
             prompts_per_batch: int = 16, prompt_length: int | None = None,
             correct_fn: Callable = rewards.accuracy_reward, batch_sh=None,
             stop_strings: Sequence[str] = ()) -> dict:
  """Samples k completions per held-out example and scores them (see `score`).

  `batch_sh`: split each batch of prompts over the mesh's batch axes (see `sample_texts`);
  with several processes every one of them returns the metrics of all examples.
  """
  prompts = [format_prompt(ex, template, tokenizer) for ex in examples]
  sampler = model_sampler(graphdef, params, tokenizer, max_new_tokens=max_new_tokens,
                          temperature=temperature, key=key, stop_ids=stop_ids,
                          prompts_per_batch=prompts_per_batch, prompt_length=prompt_length,
                          batch_sh=batch_sh, stop_strings=stop_strings)
  return run(sampler, examples, prompts, num_samples=num_samples, correct_fn=correct_fn)[0]


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------


def _log(message: str):
  print(f"[evaluate] {message}", file=sys.stderr, flush=True)


# The flags are cli's shared ones (model, task, task_kwargs, template, sampling, num_problems,
# num_samples, reward, prompts_per_batch, output); their defaults are evaluate's.
_ALLOW_REPEATS = flags.DEFINE_bool(
    "allow_repeats", False, "evaluate the first --num_problems eval examples even when some "
    "repeat a problem (a small problem space); by default only distinct problems, as many as "
    "the split holds up to --num_problems")

for _name in ("model", "task", "task_kwargs", "template", "num_problems", "num_samples",
              "temperature", "top_p", "top_k", "max_new_tokens", "stop_strings", "reward",
              "reward_kwargs",
              "prompts_per_batch", "seed", "dtype", "output"):
  flags.declare_key_flag(_name)

# Settings a training workdir's config.json supplies when their flag is not given:
# flag -> (section, key) in config.json.
WORKDIR_DEFAULTS = {"task": ("task", "name"), "task_kwargs": ("task", "kwargs"),
                    "template": ("task", "template"),
                    "max_new_tokens": ("rl", "max_completion_length"),
                    "stop_strings": ("rl", "stop_strings")}


def run_config(workdir: str) -> dict:
  """A training run's config.json (what train.py wrote), or {} when unreadable."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
  return config if isinstance(config, dict) else {}


def _from_workdir(workdir: str) -> dict:
  """{flag: value} of WORKDIR_DEFAULTS for the flags not given; the task's kwargs only go with
  the run's own task."""
  config = run_config(workdir)
  found = {}
  for name, (section, key) in WORKDIR_DEFAULTS.items():
    value = (config.get(section) or {}).get(key)
    if value is not None and not flags.FLAGS[name].present:
      found[name] = value
  if (config.get("task") or {}).get("name") != (cli.TASK.value or found.get("task")):
    found.pop("task_kwargs", None)
  if found.get("template") not in (None, *TEMPLATES):
    del found["template"]
  return found


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  """The flags, checked (app.UsageError), as a namespace.

  Args:
    argv: flags to parse, without the program name (tests); None: app.run parsed them.
  """
  if argv is not None:
    cli.parse(argv, program="python -m grpo_jax.evaluate")
  cli.require(cli.MODEL)
  cli.positive(cli.NUM_PROBLEMS, cli.NUM_SAMPLES, cli.PROMPTS_PER_BATCH)
  cli.check_sampling()
  args = types.SimpleNamespace(**{h.name: h.value for h in cli.SHARED})
  args.allow_repeats = _ALLOW_REPEATS.value
  args.model_kind = cli.model_kind(args.model)
  # A training run knows its task, template and completion length: they become the defaults.
  args.from_workdir = _from_workdir(args.model) if args.model_kind == "workdir" else {}
  vars(args).update(args.from_workdir)
  if args.task is None:
    raise app.UsageError("--task is required (unless --model is a training workdir, whose "
                         "config.json names it)")
  if isinstance(args.task_kwargs, str):
    args.task_kwargs = cli.parse_task_kwargs(args.task_kwargs)
  args.stop_strings = cli.parse_stop_strings(args.stop_strings)
  args.task_obj = cli.make_task(args.task, args.task_kwargs)
  if args.reward is None:
    args.reward = getattr(TASKS[args.task], "default_reward", None) or "accuracy"
  cli.check_reward(args.reward)
  if isinstance(args.reward_kwargs, str):
    args.reward_kwargs = cli.parse_json_object(args.reward_kwargs, "reward_kwargs")
  elif args.model_kind == "workdir":  # the keywords the run scored --reward with
    found = (run_config(args.model).get("reward_kwargs") or {}).get(args.reward)
    if found:
      args.reward_kwargs = args.from_workdir["reward_kwargs"] = found
  args.correct_fn = cli.reward_with_kwargs(args.reward, args.reward_kwargs)
  return args


def load_sampler(args: types.SimpleNamespace, examples: Sequence[dict]):
  """(model `Sampler`, tokenizer) for the parsed flags; `main` takes a fake instead in tests."""
  from flax import nnx

  from grpo_jax import models

  _log(f"loading {args.model}")
  model, tokenizer = models.load(args.model, dtype=args.dtype)
  graphdef, params = nnx.split(model)
  del model

  def progress(done, total):
    _log(f"sampled {done}/{total} problems x {args.num_samples}")

  sampler = model_sampler(graphdef, params, tokenizer, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, key=jax.random.key(args.seed),
                          stop_ids=templates.stop_ids(tokenizer, args.stop_strings),
                          stop_strings=args.stop_strings,
                          prompts_per_batch=min(args.prompts_per_batch, len(examples)),
                          top_p=args.top_p, top_k=args.top_k, on_batch=progress)
  return sampler, tokenizer


def main(argv: Sequence[str] | None = None, load: Callable = load_sampler) -> dict:
  """Evaluates as the flags say; prints the summary as one JSON line on stdout and returns it.

  Args:
    argv: the flags, without the program name (tests); None: flags app.run parsed.
    load: (parsed flags, examples) -> (Sampler, tokenizer); tests pass a fake model here.
  """
  args = parse_args(argv)
  if args.from_workdir:
    _log("from the run's config.json: " + ", ".join(
        f"--{name}={value if isinstance(value, str) else json.dumps(value)}"
        for name, value in args.from_workdir.items()))
  examples = args.task_obj.eval_examples(args.num_problems, allow_repeats=args.allow_repeats)
  distinct = len({ex["prompt"] for ex in examples})
  if distinct < len(examples):
    _log(f"--allow_repeats: {len(examples) - distinct} of the {len(examples)} problems repeat an "
         f"earlier one; {distinct} are distinct. The intervals count each distinct problem once.")
  elif len(examples) < args.num_problems:
    _log(f"warning: the task's eval split holds only {len(examples)} distinct problems; "
         f"evaluating those, not {args.num_problems} (--allow_repeats repeats them, which adds "
         "samples but no problems)")
  if args.temperature == 0 and args.num_samples > 1:
    _log(f"warning: greedy (--temperature=0): the {args.num_samples} samples are all the same")
  t = time.perf_counter()
  # Anything a library prints goes to stderr: stdout holds only the JSON.
  with contextlib.redirect_stdout(sys.stderr):
    sampler, tokenizer = load(args, examples)
    template = args.template or ("chat" if getattr(tokenizer, "chat_template", None)
                                 else "r1_zero")
    _log(f"{len(examples)} {args.task} problems x {args.num_samples} samples, template "
         f"{template}, reward {args.reward}, temperature {args.temperature}")
    prompts = [format_prompt(ex, template, tokenizer) for ex in examples]
    metrics, records = run(sampler, examples, prompts, num_samples=args.num_samples,
                           correct_fn=args.correct_fn)
  ungraded = sum(r["ungraded"] for r in records)
  if ungraded:
    _log(f"warning: reward {args.reward!r} could not grade {ungraded} of "
         f"{len(records) * args.num_samples} completions (it returned None, e.g. for a "
         "non-numeric answer); they count as wrong. Another --reward may fit the task.")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    _log(f"wrote {len(records)} records to {args.output}")
  k = args.num_samples
  summary = {"pass@1": metrics["eval/pass@1"],
             "pass@1_ci95": [metrics["eval/pass@1_ci95_low"], metrics["eval/pass@1_ci95_high"]],
             f"maj@{k}": metrics[f"eval/maj@{k}"],
             f"maj@{k}_ci95": [metrics[f"eval/maj@{k}_ci95_low"],
                               metrics[f"eval/maj@{k}_ci95_high"]],
             f"pass@{k}": metrics[f"eval/pass@{k}"], "num_problems": metrics["eval/num_problems"],
             "num_distinct_problems": metrics["eval/num_distinct_problems"],
             "mean_length": metrics["eval/mean_length"],
             "mean_length_chars": metrics["eval/mean_length_chars"],
             "model": args.model, "task": args.task, "task_kwargs": args.task_kwargs,
             "template": template, "reward": args.reward, "reward_kwargs": args.reward_kwargs,
             "num_samples": k,
             "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "max_new_tokens": args.max_new_tokens, "stop_strings": list(args.stop_strings),
             "seed": args.seed, "from_workdir": sorted(args.from_workdir),
             "time_s": round(time.perf_counter() - t, 3)}
  print(json.dumps(summary), flush=True)
  return summary


def _app_main(argv):
  cli.no_arguments(argv)
  main(None)  # returns the summary, which app.run would pass to sys.exit


if __name__ == "__main__":
  cli.run(_app_main)
