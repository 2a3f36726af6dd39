"""LLM-as-judge reward: a model ranks the G answers of a group; the rank is the reward.

    judge = make_judge_reward("smollm2-135m-instruct", num_generations=8)
    judge(prompts=prompts, completions=completions, answer=answers)  # -> N floats in [0, 1]

    scores = judge_scores(graphdef, params, tokenizer, questions, answers)   # [N]
    rewards = rank_rewards(scores, num_generations=8)                      # [N]

The judge reads a prompt asking whether a proposed answer to a question is
correct (`JUDGE_PROMPT`, in the judge's chat template, or as plain text) and
its preference for the answer is

    score = log P("Yes") - log P("No")

over its next token (the first token of each word; the softmax normaliser
cancels, so it is the difference of the two logits). Scores are only compared
within a group of G answers to one question: the answer with the lowest score
gets reward 0, the highest 1, in steps of 1 / (G - 1), tied answers the mean of
their ranks. A rank reward does not depend on the judge's calibration, and a
group the judge cannot tell apart gets 0.5 throughout (no advantage, no gradient).

The judge can be another model (`make_judge_reward`) or the policy itself
(`judge_reward_from_params`, with the policy's current params). One jitted,
batched forward per call: prompts left-padded to one length bucket, the last
position's logits. The policy's params live on the training mesh, so its judge
takes the run's batch sharding (`batch_sh`): the rows of each forward are split
over the batch axes, as in training.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import distributed, rewards
from grpo_jax.data import batching

JUDGE_PROMPT = ("Question: {question}\n"
                "Proposed answer: {answer}\n"
                "Is the proposed answer correct? Answer Yes or No.")
JUDGE_TEMPLATES = ("chat", "plain")
# Columns that hold the raw question (TRL passes the templated prompt as `prompts`).
QUESTION_COLUMNS = ("prompt", "question", "problem", "raw_prompt", "query")


def judge_prompt(question: str, answer: str, template: str = "chat", tokenizer=None) -> str:
  """The text the judge continues with "Yes" or "No".

  Args:
    question: the raw question.
    answer: the answer to judge (the whole completion).
    template: "chat" (the tokenizer's chat template, one user message, the
      assistant's turn opened) or "plain" (the text and a new line).
    tokenizer: needed for "chat".
  """
  text = JUDGE_PROMPT.format(question=question, answer=answer)
  if template == "plain":
    return text + "\n"
  if template == "chat":
    if getattr(tokenizer, "chat_template", None) is None:
      raise ValueError('judge template "chat" needs a tokenizer with a chat template; use "plain"')
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
  raise ValueError(f"unknown judge template {template!r}; expected one of {list(JUDGE_TEMPLATES)}")


def yes_no_ids(tokenizer) -> tuple[int, int]:
  """Token ids of "Yes" and "No" (the first token of each word as it starts a turn or a line)."""
  yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
  no = tokenizer("No", add_special_tokens=False)["input_ids"]
  if not yes or not no or yes[0] == no[0]:
    raise ValueError(f"the tokenizer does not tell 'Yes' ({yes}) from 'No' ({no}) by their "
                     "first token")
  return yes[0], no[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _preference(graphdef, params, tokens_BxL, mask_BxL, yes_no_2):
  """logit(Yes) - logit(No) [B] at the last position of left-padded prompts."""
  model = nnx.merge(graphdef, params)
  hidden_BxLxD, _ = model.prefill(tokens_BxL, mask_BxL)  # the unused cache is compiled away
  logits_BxV = model.logits(hidden_BxLxD[:, -1]).astype(jnp.float32)
  return logits_BxV[:, yes_no_2[0]] - logits_BxV[:, yes_no_2[1]]


def judge_scores(graphdef, params, tokenizer, questions: Sequence[str], answers: Sequence[str], *,
                 template: str = "chat", batch_size: int = 16, batch_sh=None) -> np.ndarray:
  """The judge's preference log P("Yes") - log P("No") for each answer: float32 [N].

  Args:
    graphdef, params: the judge (`nnx.split` of a model, or any model with the
      sampler's protocol: `prefill(tokens, mask) -> (hidden, cache)`, `logits`).
    tokenizer: the judge's tokenizer.
    questions: N raw questions.
    answers: N answers (completion texts).
    template: see `judge_prompt`.
    batch_size: prompts per forward; the last batch is padded with repeats,
      so every batch runs the same compiled program.
    batch_sh: for params placed on a mesh (the policy judging itself in training): the run's
      batch sharding. Each forward is then a global batch of `batch_size` rows rounded up to a
      multiple of the batch shards (data x fsdp), split over them; with several processes
      each one passes its own N rows (its completions), fills its share of every forward with
      them, and gets their N scores back. The prompt length is agreed by every process, so
      all of them run one program; call it on every process.
  """
  if len(questions) != len(answers):
    raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
  if not answers:
    return np.zeros((0,), np.float32)
  yes_no = jnp.asarray(yes_no_ids(tokenizer), jnp.int32)
  ids = [tokenizer(judge_prompt(q, a, template, tokenizer), add_special_tokens=False)["input_ids"]
         for q, a in zip(questions, answers)]
  longest = max(len(i) for i in ids)
  if batch_sh is None:
    length, per_forward, forwards = batching.bucket_length(longest), batch_size, None
  else:
    length = batching.bucket_length(distributed.global_max(longest))
    mine = distributed.local_rows(batch_sh, distributed.padded_rows(batch_size, batch_sh))
    per_forward = mine.stop - mine.start  # this process's rows of each forward
    forwards = distributed.global_max(-(-len(ids) // per_forward))  # every process runs each
  chunks = list(batching.fixed_size_chunks(ids, per_forward))
  if forwards is not None:  # a process with fewer rows than another fills forwards with repeats
    chunks += [(len(ids), [ids[-1]] * per_forward, 0)] * (forwards - len(chunks))
  scores = []
  for _, chunk, real in chunks:
    tokens_BxL, mask_BxL = batching.left_pad(chunk, tokenizer.pad_token_id, length)
    if batch_sh is not None:
      tokens_BxL, mask_BxL = distributed.to_global((tokens_BxL, mask_BxL), batch_sh)
    preference_B = _preference(graphdef, params, tokens_BxL, mask_BxL, yes_no)
    if batch_sh is not None:
      preference_B = distributed.to_local(preference_B, batch_sh)
    scores.append(np.asarray(preference_B)[:real])
  return np.concatenate(scores).astype(np.float32)


def rank_rewards(scores, num_generations: int) -> np.ndarray:
  """Each score's rank within its group of G, scaled to [0, 1]: float32 [N].

  Rows i*G .. i*G + G - 1 are one group (GRPO's layout). Rank 0 is the lowest
  score, G - 1 the highest; tied scores share the mean of their ranks.
  """
  g = num_generations
  scores = np.asarray(scores, np.float64)
  if g < 2:
    raise ValueError(f"num_generations must be >= 2 to rank answers; got {g}")
  if scores.ndim != 1 or scores.size % g:
    raise ValueError(f"need a flat array of groups of {g} scores; got shape {scores.shape}")
  s_GxG = scores.reshape(-1, g)
  below = (s_GxG[:, None, :] < s_GxG[:, :, None]).sum(-1)  # [groups, G]: scores lower than each
  ties = (s_GxG[:, None, :] == s_GxG[:, :, None]).sum(-1)  # including itself
  return ((below + (ties - 1) / 2) / (g - 1)).reshape(-1).astype(np.float32)


def _question_texts(prompts, columns: dict, n: int) -> list[str]:
  """The raw question of each row: a question-like column, else the prompt's text."""
  for name in QUESTION_COLUMNS:
    values = columns.get(name)
    if isinstance(values, (list, tuple)) and len(values) == n:
      return [str(v) for v in values]
  if prompts is None:
    raise ValueError(f"the judge needs prompts or one of the columns {list(QUESTION_COLUMNS)}")
  texts = []
  for prompt in prompts:
    if isinstance(prompt, str):
      texts.append(prompt)
    else:  # conversational: the last user message
      users = [m for m in prompt if m.get("role") == "user"] or list(prompt)
      texts.append(rewards.completion_text(users[-1:]))
  return texts


def judge_reward_from_params(graphdef, params: Any | Callable[[], Any], tokenizer,
                             num_generations: int, *, template: str = "chat",
                             batch_size: int = 16, batch_sh=None) -> rewards.RewardFn:
  """A TRL-signature reward function `judge(prompts, completions, **columns)`.

  The judge's rank rewards (`rank_rewards` of `judge_scores`) of each group of
  `num_generations` consecutive completions. The question is a question-like
  column (QUESTION_COLUMNS) when one is passed, else the prompt as given.

  Args:
    graphdef, params: the judge. `params` may be a function returning the
      params to use at each call, so that the policy judges itself with its
      current params.
    tokenizer: the judge's tokenizer.
    num_generations: G, the group size.
    template, batch_size: see `judge_scores`.
    batch_sh: the run's batch sharding when `params` are placed on its mesh (see
      `judge_scores`); the reward function is then called with this process's completions, on
      every process.
  """
  judge_prompt("", "", template, tokenizer)  # a bad template fails now, not at the first step
  yes_no_ids(tokenizer)

  def judge(prompts, completions, **columns):
    n = len(completions)
    questions = _question_texts(prompts, columns, n)
    answers = [rewards.completion_text(c) for c in completions]
    current = params() if callable(params) else params
    scores = judge_scores(graphdef, current, tokenizer, questions, answers, template=template,
                          batch_size=batch_size, batch_sh=batch_sh)
    return rank_rewards(scores, num_generations).tolist()

  judge.__name__ = "judge"
  return judge


def make_judge_reward(model_name_or_path: str, *, num_generations: int, template: str = "chat",
                      dtype: Any = None, batch_size: int = 16) -> rewards.RewardFn:
  """Loads a judge (`models.load`: a name, a Hugging Face folder, a .gguf, a workdir) as a reward.

  See `judge_reward_from_params`; the returned function is named "judge".
  """
  from grpo_jax import models

  model, tokenizer = models.load(model_name_or_path, dtype=dtype)
  graphdef, params = nnx.split(model)
  return judge_reward_from_params(graphdef, params, tokenizer, num_generations,
                                  template=template, batch_size=batch_size)
