"""Rewards on the host: rule-based reward functions (TRL's signature) and their weighted sum.

    parse.py      completion text, the answer it commits to (<answer>, \\boxed{}), numbers
    functions.py  rule rewards: accuracy, math-verify accuracy, format, tag count,
                  a regular-expression template, exact match, ROUGE-1 / ROUGE-L on any
                  script, DAPO's soft overlong penalty
    bertscore.py  BERTScore from a local encoder (optional: the bertscore extra)
    countdown.py  the Countdown equation checker and its reward
    language.py   script detection and the language-consistency reward
    combine.py    the name registry, error-handling scoring and the weighted sum

Everything here is plain Python and NumPy (no JAX), so the data pipeline and
TRL-side scripts can import it cheaply.
"""

from grpo_jax.rewards.bertscore import bertscore_reward
from grpo_jax.rewards.combine import (REWARD_FUNCTIONS, RUNTIME_REWARDS, RewardError, Scores,
                                      check_reward_kwargs, combine_rewards, format_rewards,
                                      get_reward_fns, kwargs_dict, parse_rewards, reward_fn,
                                      reward_fn_name, reward_keywords, score_rewards,
                                      weigh_scores)
from grpo_jax.rewards.countdown import countdown_equation, countdown_reward, countdown_value
from grpo_jax.rewards.functions import (TOKENIZATIONS, RewardFn, accuracy_reward,
                                        character_tokens, exact_match_reward,
                                        extract_with_pattern, format_reward,
                                        lenient_accuracy_reward, lenient_format_reward,
                                        math_accuracy_reward, regex_format_reward, rouge1_reward,
                                        rougeL_reward, soft_overlong_penalty, tag_count_reward,
                                        tokenize_fn, word_tokens)
from grpo_jax.rewards.language import SCRIPTS, language_consistency_reward, script_word_counts
from grpo_jax.rewards.parse import (TAGS, completion_text, extract_answer, extract_boxed,
                                    final_answer, lenient_final_answer, parse_number)

__all__ = [
    "bertscore_reward",
    "REWARD_FUNCTIONS", "RUNTIME_REWARDS", "RewardError", "Scores", "check_reward_kwargs",
    "combine_rewards", "format_rewards", "get_reward_fns", "kwargs_dict", "parse_rewards",
    "reward_fn",
    "reward_fn_name", "reward_keywords", "score_rewards", "weigh_scores",
    "countdown_equation", "countdown_reward", "countdown_value",
    "TOKENIZATIONS", "RewardFn", "accuracy_reward", "character_tokens", "exact_match_reward",
    "extract_with_pattern", "format_reward", "lenient_accuracy_reward", "lenient_format_reward",
    "math_accuracy_reward", "regex_format_reward", "rouge1_reward", "rougeL_reward",
    "soft_overlong_penalty", "tag_count_reward", "tokenize_fn", "word_tokens",
    "SCRIPTS", "language_consistency_reward", "script_word_counts",
    "TAGS", "completion_text", "extract_answer", "extract_boxed", "final_answer",
    "lenient_final_answer", "parse_number",
]
