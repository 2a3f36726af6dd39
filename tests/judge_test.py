"""LLM-as-judge: rank rewards against a reference, scores against a full forward, a fake judge;
the policy as judge on a device mesh."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import judge, models, rewards
from grpo_jax.models import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- rank rewards -------------------------------------------------------------------
def reference_ranks(scores, g):
  """Sort each group, give runs of equal scores the mean of their positions (pure Python)."""
  out = []
  for start in range(0, len(scores), g):
    group = [float(s) for s in scores[start:start + g]]
    order = sorted(range(g), key=lambda i: group[i])
    ranks = [0.0] * g
    i = 0
    while i < g:
      j = i
      while j + 1 < g and group[order[j + 1]] == group[order[i]]:
        j += 1
      for t in range(i, j + 1):
        ranks[order[t]] = (i + j) / 2
      i = j + 1
    out.extend(r / (g - 1) for r in ranks)
  return out


def test_rank_rewards_known_values():
  np.testing.assert_allclose(judge.rank_rewards([3.0, 1.0, 2.0], 3), [1.0, 0.0, 0.5])
  np.testing.assert_allclose(judge.rank_rewards([5.0, 5.0, 5.0, 5.0], 4), [0.5] * 4)
  np.testing.assert_allclose(judge.rank_rewards([1.0, 2.0, 2.0, 0.0], 4), [1 / 3, 5 / 6, 5 / 6, 0])
  np.testing.assert_allclose(judge.rank_rewards([-1.0, 4.0, 4.0, -1.0, 2.0, 2.0], 2),
                             [0, 1, 1, 0, 0.5, 0.5])


@pytest.mark.parametrize("g", [2, 3, 5, 8])
def test_rank_rewards_match_the_reference_with_ties_and_several_groups(g):
  rng = np.random.default_rng(g)
  scores = rng.integers(0, 4, size=6 * g).astype(np.float32)  # few values: many ties
  got = judge.rank_rewards(scores, g)
  np.testing.assert_allclose(got, reference_ranks(scores, g), atol=1e-7)
  groups = got.reshape(-1, g)
  assert groups.min() >= 0 and groups.max() <= 1
  np.testing.assert_allclose(groups.sum(1), g / 2, atol=1e-6)  # ranks average to 1/2


def test_rank_rewards_reject_bad_groups():
  with pytest.raises(ValueError, match="num_generations"):
    judge.rank_rewards([1.0, 2.0], 1)
  with pytest.raises(ValueError, match="groups of 4"):
    judge.rank_rewards([1.0, 2.0, 3.0], 4)


# -- a fake judge with known scores -------------------------------------------------------
class CountingJudge(nnx.Module):
  """Sampler-protocol fake: logit(Yes) = how many `target` tokens the prompt holds, logit(No) = 0.5.

  So its score log P(Yes) - log P(No) is that count - 0.5, read at the last position.
  """

  def __init__(self, vocab_size, target, yes, no):
    head = np.zeros((2, vocab_size), np.float32)
    head[0, yes], head[1, no] = 1.0, 0.5
    self.head = nnx.Param(jnp.asarray(head))
    self.target = target

  def prefill(self, tokens, attention_mask_BxL):
    hits = jnp.cumsum((tokens == self.target) & (attention_mask_BxL > 0), axis=1)
    hidden = jnp.stack([hits.astype(jnp.float32), jnp.ones(hits.shape, jnp.float32)], axis=-1)
    return hidden, None

  def logits(self, hidden):
    return hidden @ self.head[...]


def counting_judge():
  tok = tiny.tokenizer()
  yes, no = tok.convert_tokens_to_ids("Y"), tok.convert_tokens_to_ids("N")
  model = CountingJudge(len(tok), tok.convert_tokens_to_ids("7"), yes, no)
  return nnx.split(model), tok


def test_fake_judge_prefers_answers_with_the_right_number():
  (graphdef, params), tok = counting_judge()
  questions = ["What is 3 + 4?"] * 4 + ["What is 9 - 2?"] * 4
  answers = ["7", "8", "77, I mean 7", "9", "It is 6", "7", "The answer: 7", "1"]
  # batch_size 3: the last batch is padded with repeats.
  scores = judge.judge_scores(graphdef, params, tok, questions, answers, batch_size=3)
  np.testing.assert_allclose(scores, [0.5, -0.5, 2.5, -0.5, -0.5, 0.5, 0.5, -0.5])
  np.testing.assert_allclose(judge.rank_rewards(scores, 4),
                             [2 / 3, 1 / 6, 1, 1 / 6, 1 / 6, 5 / 6, 5 / 6, 1 / 6])
  # As a reward function: the raw question comes from a column, the prompts are templated.
  reward = judge.judge_reward_from_params(graphdef, params, tok, num_generations=4)
  assert reward.__name__ == "judge"
  prompts = [f"<|user|>{q} (think first)<|assistant|>" for q in questions]
  got = reward(prompts=prompts, completions=answers, question=questions, answer=["7"] * 8)
  np.testing.assert_allclose(got, judge.rank_rewards(scores, 4))
  # Through the reward machinery; rank rewards always average 1/2.
  total, metrics = rewards.combine_rewards([reward], None, prompts,
                                           [[{"role": "assistant", "content": a}] for a in answers],
                                           question=questions)
  np.testing.assert_allclose(total, got)
  assert metrics["rewards/judge/mean"] == pytest.approx(0.5)
  # params may be a function: the policy judging itself with its current params.
  lazy = judge.judge_reward_from_params(graphdef, lambda: params, tok, num_generations=4)
  assert lazy(prompts=prompts, completions=answers, question=questions) == got


def test_question_texts():
  n = 2
  templated = ["<|user|>a<|assistant|>", "<|user|>b<|assistant|>"]
  assert judge._question_texts(templated, {"question": ["a", "b"]}, n) == ["a", "b"]
  assert judge._question_texts(["a", "b"], {"answer": ["1", "2"]}, n) == ["a", "b"]
  chat = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}],
          [{"role": "user", "content": "q2"}]]
  assert judge._question_texts(chat, {}, n) == ["q1", "q2"]


# -- a real model: scores equal an independent forward; left padding changes nothing ------------
@pytest.fixture(scope="module")
def tiny_judge():
  model, tok = models.load("tiny-random")
  # Weights larger than the init's (std 0.02): different prompts get clearly different scores.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  return model, tok


QUESTIONS = ["What is 3 + 4?", "What is 12 + 30 - 5?",
             "A farmer has 17 sheep and buys 25 more, then sells a third of the flock at the "
             "market on Sunday morning. How many sheep are left?"]
ANSWERS = ["7", "<think>12 + 30 = 42, 42 - 5 = 37</think><answer>37</answer>", "28"]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_scores_equal_the_yes_no_log_prob_difference_of_a_full_forward(tiny_judge, template):
  model, tok = tiny_judge
  graphdef, params = nnx.split(model)
  scores = judge.judge_scores(graphdef, params, tok, QUESTIONS, ANSWERS, template=template)
  forward = models.jit_forward(model)
  yes, no = tok.convert_tokens_to_ids("Y"), tok.convert_tokens_to_ids("N")
  for q, a, score in zip(QUESTIONS, ANSWERS, scores):
    ids = tok(judge.judge_prompt(q, a, template, tok), add_special_tokens=False)["input_ids"]
    logits = np.asarray(forward(np.asarray([ids], np.int32))[0, -1], np.float64)
    logps = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    assert score == pytest.approx(logps[yes] - logps[no], abs=2e-5)
  assert np.ptp(scores) > 0.05  # the test can tell the prompts apart


def test_left_padding_does_not_change_scores(tiny_judge):
  model, tok = tiny_judge
  graphdef, params = nnx.split(model)
  lengths = [len(tok(judge.judge_prompt(q, a, "chat", tok))["input_ids"])
             for q, a in zip(QUESTIONS, ANSWERS)]
  assert min(lengths) <= 128 < max(lengths)  # alone, the short prompts get a shorter bucket
  batched = judge.judge_scores(graphdef, params, tok, QUESTIONS, ANSWERS, batch_size=4)
  alone = [judge.judge_scores(graphdef, params, tok, [q], [a], batch_size=1)[0]
           for q, a in zip(QUESTIONS, ANSWERS)]
  np.testing.assert_allclose(batched, alone, atol=2e-5)


def test_make_judge_reward_ranks_each_group():
  g = 4
  reward = judge.make_judge_reward("tiny-random", num_generations=g)
  assert reward.__name__ == "judge"
  questions = [QUESTIONS[0]] * g + [QUESTIONS[1]] * g
  answers = ["7", "8", "six", "<answer>7</answer>", "37", "47", "-3", "thirty-seven"]
  got = np.asarray(reward(prompts=questions, completions=answers, answer=["7"] * g + ["37"] * g))
  assert got.shape == (2 * g,) and got.min() >= 0 and got.max() <= 1
  for group in got.reshape(-1, g):
    ranks = group * (g - 1)
    np.testing.assert_allclose(ranks * 2, np.round(ranks * 2), atol=1e-5)  # half-integers
    assert ranks.sum() == pytest.approx(g * (g - 1) / 2)  # a permutation of 0..G-1, ties averaged
  model, tok = models.load("tiny-random")  # the same judge, scored directly
  graphdef, params = nnx.split(model)
  np.testing.assert_allclose(
      got, judge.rank_rewards(judge.judge_scores(graphdef, params, tok, questions, answers), g))


# -- the policy as judge, its params on a device mesh ---------------------------------------
MESH_JUDGE = """
import jax, numpy as np
from flax import nnx
from grpo_jax import judge, models, sharding
assert jax.device_count() == 8
model, tok = models.load("tiny-random")
graphdef, params = nnx.split(model)
leaves, treedef = jax.tree.flatten(params)  # larger weights: answers get different scores
keys = jax.random.split(jax.random.key(1), len(leaves))
params = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])
mesh = sharding.make_mesh(data=2, fsdp=4)
batch_sh = sharding.batch_sharding(mesh)
on_mesh = jax.device_put(params, sharding.param_shardings(mesh, params))
passed = []  # the prompts the forward is given
preference = judge._preference
def spy(graphdef, params, tokens, mask, yes_no):
  passed.append(tokens)
  return preference(graphdef, params, tokens, mask, yes_no)
judge._preference = spy
questions = ["What is 3 + 4?"] * 4 + ["What is 12 + 30 - 5?"] * 4
answers = ["7", "8", "seven", "<answer>7</answer>", "37", "It is 37.", "-3", "thirty-seven"]
want = judge.judge_scores(graphdef, params, tok, questions, answers, batch_size=3)
passed.clear()
got = judge.judge_scores(graphdef, on_mesh, tok, questions, answers, batch_size=3,
                         batch_sh=batch_sh)
np.testing.assert_allclose(got, want, atol=1e-5)
assert np.ptp(want) > 0.05
assert len(passed) == 1  # 3 rows filled up to 8: all 8 answers in one forward
for x in passed:
  assert x.shape[0] == 8 and x.sharding.is_equivalent_to(batch_sh, 2), x.sharding
reward = judge.judge_reward_from_params(graphdef, lambda: on_mesh, tok, num_generations=4,
                                        batch_size=3, batch_sh=batch_sh)
np.testing.assert_allclose(reward(prompts=questions, completions=answers),
                           judge.rank_rewards(want, 4))
print("OK")
"""


@pytest.mark.slow
def test_judge_on_a_mesh_splits_its_batch_and_scores_like_one_device():
  """The policy's params on data=2 x fsdp=4 (8 host devices): the judge's forward gets its
  prompts split over the batch axes (3 per forward filled up to 8 rows), and its scores and
  rank rewards are those of the unsharded judge."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", MESH_JUDGE], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
