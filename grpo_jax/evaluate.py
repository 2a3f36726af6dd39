"""Evaluation on held-out problems: pass@1, maj@k and pass@k over k samples per problem.

    metrics = evaluate(graphdef, params, tokenizer, examples, template="chat",
                       num_samples=4, temperature=1.0, max_new_tokens=128)

pass@1 is the mean accuracy over all k samples (GRPO.md); maj@k the accuracy
of the most frequent answer among the k; pass@k the unbiased estimator of the
probability that at least one of k samples is right (with n = k samples drawn,
it is the fraction of problems with any correct sample).
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Sequence

import jax
import numpy as np

from grpo_jax import rewards, sampling
from grpo_jax.data import format_prompt


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def score(examples: Sequence[dict], completions: Sequence[Sequence[str]],
          correct_fn: Callable = rewards.accuracy_reward) -> dict:
  """Metrics from k completions per example (a fake model's outputs in tests).

  Args:
    examples: problems with "answer" (and any columns correct_fn reads).
    completions: completions[i] are the k texts sampled for examples[i].
    correct_fn: a TRL-signature reward returning 1.0 for a right answer.
  """
  k = len(completions[0])
  accs, majs, passes, lengths = [], [], [], []
  for ex, texts in zip(examples, completions, strict=True):
    columns = {key: [value] * k for key, value in ex.items() if key != "prompt"}
    right = [float(r or 0.0) for r in correct_fn(prompts=[ex["prompt"]] * k, completions=list(texts),
                                                 **columns)]
    accs.append(np.mean(right))
    passes.append(pass_at_k(k, int(sum(right)), k))
    # Majority vote over the parsed answers (unparseable ones do not vote).
    votes = collections.Counter()
    first_right = {}
    for text, r in zip(texts, right):
      answer = rewards.parse_number(rewards.lenient_final_answer(text))
      if answer is not None:
        votes[answer] += 1
        first_right.setdefault(answer, r)
    majs.append(first_right[votes.most_common(1)[0][0]] if votes else 0.0)
    lengths.extend(len(t) for t in texts)
  return {"eval/accuracy": float(np.mean(accs)), f"eval/maj@{k}": float(np.mean(majs)),
          f"eval/pass@{k}": float(np.mean(passes)), "eval/num_problems": len(examples),
          "eval/mean_length_chars": float(np.mean(lengths))}


def sample_texts(graphdef, params, tokenizer, prompts: Sequence[str], *, num_samples: int,
                 max_new_tokens: int, temperature: float, key, stop_ids, prompts_per_batch: int = 16,
                 prompt_length: int | None = None, top_p: float = 1.0, top_k: int = 0):
  """k completions (text) per prompt, and their token lengths [len(prompts), k].

  Prompts go in fixed-size batches (the last one padded with repeats), so one
  program serves every batch.
  """
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  length = prompt_length or sampling.bucket_length(max(len(i) for i in ids))
  texts, lengths = [], []
  for start in range(0, len(ids), prompts_per_batch):
    chunk = ids[start:start + prompts_per_batch]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (prompts_per_batch - real)
    tokens, mask = sampling.left_pad(chunk, tokenizer.pad_token_id, length)
    out = sampling.sample_jit(graphdef, params, tokens, mask, jax.random.fold_in(key, start),
                              num_generations=num_samples, max_new_tokens=max_new_tokens,
                              stop_ids=tuple(stop_ids), pad_id=tokenizer.pad_token_id,
                              temperature=temperature, top_p=top_p, top_k=top_k)
    toks, lens = jax.device_get((out.tokens, out.lengths))
    for i in range(real * num_samples):
      texts.append(tokenizer.decode(toks[i, :lens[i]], skip_special_tokens=True))
      lengths.append(int(lens[i]))
  k = num_samples
  return ([texts[i * k:(i + 1) * k] for i in range(len(prompts))],
          np.asarray(lengths).reshape(len(prompts), k))


def evaluate(graphdef, params, tokenizer, examples: Sequence[dict], *, template: str,
             num_samples: int, temperature: float, max_new_tokens: int, key, stop_ids,
             prompts_per_batch: int = 16, prompt_length: int | None = None,
             correct_fn: Callable = rewards.accuracy_reward) -> dict:
  """Samples k completions per held-out example and scores them (see `score`)."""
  prompts = [format_prompt(ex, template, tokenizer) for ex in examples]
  texts, lengths = sample_texts(graphdef, params, tokenizer, prompts, num_samples=num_samples,
                                max_new_tokens=max_new_tokens, temperature=temperature, key=key,
                                stop_ids=stop_ids, prompts_per_batch=prompts_per_batch,
                                prompt_length=prompt_length)
  metrics = score(examples, texts, correct_fn)
  metrics["eval/mean_length"] = float(lengths.mean())
  return metrics
