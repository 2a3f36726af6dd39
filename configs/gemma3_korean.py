"""Korean sentence correction with template rewards: Gemma 3 270M (base) learns with GRPO.

    python -m grpo_jax.main --config=configs/gemma3_korean.py --workdir=runs/gemma3_korean

The setting of a Korean-language competition entry that used TRL: each answer must follow
the template

    "the corrected sentence"가 옳다. a one-line reason

(이 instead of 가 after a final consonant), and the rewards are the competition's metrics:
the template (regex_format), exact match of the corrected sentence (exact_match, read
through the template's `sentence` group), ROUGE-1 of the whole answer on Unicode words
(rouge1), plus DeepSeek-R1's language-consistency reward with a Korean (Hangul) target.
Every keyword is config.reward_kwargs, so each can be changed with a flag, e.g.
--config.reward_kwargs.rouge1.tokenizer=characters.

Data: configs/data/korean_correction.jsonl, about 300 sentences written for this project,
each with one error (되/돼, 안/않, 로서/로써, spacing, particles, honorifics, spelling, loanword
spelling), its correction and a one-line reason; the `answer` column is the template answer.
A hashed 30% of the rows (93) is held out for evaluation.
The prompt (Korean) asks for the template and ends with "답:", for a base model (template
"plain"). A completion ends at its first line break (rl.stop_strings), as a one-line answer
should: the base model seldom ends one on its own (without the stop, 357 of its 372 held-out
answers went on past a line break, most with made-up "답:" lines, and 337 ran to the
96-token limit), and the template's whole-answer match would fail them all. Gemma 3 is
multilingual; the other embedded model, SmolLM2-135M-Instruct, was
trained on English and is not a fit for Korean.
"""

import os

from grpo_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "korean_correction.jsonl")

# "corrected sentence"이/가 옳다. reason: one line, the sentence in straight double quotes.
TEMPLATE = r'"(?P<sentence>[^"\n]+)"[이가] 옳다\. (?P<reason>[^\n]+)'


def get_config(arg: str | None = None):
  del arg
  c = config_lib.defaults()
  c.model.name = "gemma3-270m"
  c.task.name = "jsonl"
  c.task.template = "plain"
  c.task.kwargs.path = DATA
  c.task.kwargs.eval_fraction = 0.3  # 93 held-out sentences, 213 to train on
  c.rewards = [("regex_format", 0.5), ("exact_match", 1.0), ("rouge1", 1.0),
               ("language_consistency", 0.25)]
  c.reward_kwargs = {
      "regex_format": {"pattern": TEMPLATE},
      "exact_match": {"pattern": TEMPLATE, "answer_group": "sentence"},
      "rouge1": {"tokenizer": "words"},
      "language_consistency": {"language": "ko"},
  }
  c.rl.num_generations = 8
  c.rl.beta = 0.0
  c.rl.max_prompt_length = 256
  c.rl.max_completion_length = 96
  c.rl.stop_strings = ("\n",)  # the answer is one line: a base model's line break ends it
  c.rl.temperature = 1.0
  c.opt.learning_rate = 2e-5
  c.train.steps = 30
  c.train.prompts_per_step = 4
  c.train.eval_every = 15
  c.train.checkpoint_every = 15
  c.eval.num_problems = 93  # the whole held-out split
  c.eval.num_samples = 4
  c.eval.temperature = 1.0
  c.eval.prompts_per_batch = 8
  c.eval.reward = "exact_match"
  return c
