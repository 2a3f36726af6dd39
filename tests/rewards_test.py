"""Tests for grpo_jax.rewards on hand-written (and malformed) completions."""

import threading

import numpy as np
import pytest

from grpo_jax import rewards

NAN = np.nan


def call(fn, completions, **columns):
  return fn(prompts=["q"] * len(completions), completions=completions, **columns)


# ----------------------------------------------------------------------------
# Reward functions.
# ----------------------------------------------------------------------------

ACCURACY_CASES = [  # (completion, gold, expected)
    ("<think>2+3</think><answer>5</answer>", "5", 1.0),
    ("<think>2+3</think><answer>5</answer>", 6, 0.0),
    ("<answer> 5.0 </answer>", 5, 1.0),
    ("<answer>\\boxed{5}</answer>", "5", 1.0),
    ("so the answer is \\boxed{5}.", "5", 1.0),                 # no tags: last \boxed
    ("\\boxed{4} then \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("<answer>4</answer> wait <answer>5</answer>", "5", 1.0),     # the last answer counts
    ("<answer>3<answer>5</answer></answer>", "5", 1.0),          # nested: innermost
    ("<answer>5</answer> <answer>6", "5", 1.0),                  # unclosed last block skipped
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>-3</answer>", -3, 1.0),
    ("<answer>0.1</answer>", 0.1, 1.0),                          # float gold read as written
    ("<answer>72</answer>", "She pays 8 * 9 = 72.\n#### 72", 1.0),  # GSM8K gold
    ("<answer>five</answer>", "5", 0.0),                         # non-numeric
    ("<answer></answer>", "5", 0.0),                             # empty
    ("<answer>5", "5", 0.0),                                     # never closed
    ("5", "5", 0.0),                                             # neither tags nor \boxed
    ("\\boxed{5", "5", 0.0),                                     # unbalanced brace
    ("<answer>5</answer>", "not a number", None),                # unusable gold
    ("<answer>5</answer>", None, None),
]


def test_accuracy_reward():
  completions, golds, want = zip(*ACCURACY_CASES)
  assert call(rewards.accuracy_reward, list(completions), answer=list(golds)) == list(want)


def test_conversational_completions_are_read_like_strings():
  chat = [[{"role": "assistant", "content": "<think>x</think><answer>5</answer>"}],
          [{"role": "assistant", "content": [{"type": "text", "text": "<answer>7</answer>"}]}]]
  assert call(rewards.accuracy_reward, chat, answer=[5, 5]) == [1.0, 0.0]
  assert call(rewards.format_reward, chat) == [1.0, 0.0]


MATH_CASES = [
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
    ("<answer>1/2</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>\\sqrt{2}</answer>", "$\\sqrt{2}$", 1.0),        # bare LaTeX in the tag
    ("<answer>2^{1/2}</answer>", "\\sqrt{2}", 1.0),            # bare LaTeX gold
    ("<answer>x = 5</answer>", "5", 1.0),
    ("<answer>x^2+1</answer>", "1 + x^2", 1.0),
    ("The result is $\\boxed{12}$.", "12", 1.0),
    ("<think>3+4=7</think><answer>12</answer>", "7", 0.0),     # the reasoning's 7 is not the answer
    ("<answer>banana</answer>", "7", 0.0),
    ("<answer></answer>", "7", 0.0),
    ("<answer>7</answer>", "", None),
]


def test_math_accuracy_reward():
  completions, golds, want = zip(*MATH_CASES)
  assert call(rewards.math_accuracy_reward, list(completions), answer=list(golds)) == list(want)


def test_math_accuracy_reward_works_off_the_main_thread():
  # math-verify's signal-based timeout raises ValueError outside the main thread.
  completions, golds, want = zip(*MATH_CASES[:3])
  result = {}
  thread = threading.Thread(target=lambda: result.update(
      got=call(rewards.math_accuracy_reward, list(completions), answer=list(golds))))
  thread.start()
  thread.join()
  assert result["got"] == list(want)


FORMAT_CASES = [  # (completion, strict, lenient, tag_count)
    ("<think>r</think><answer>a</answer>", 1.0, 1.0, 1.0),
    (" <think>\nr\n</think>\n<answer>\na\n</answer>\n", 1.0, 1.0, 1.0),
    ("<think></think><answer>a</answer>", 0.0, 1.0, 1.0),             # empty reasoning
    ("<think>r</think><answer> </answer>", 0.0, 1.0, 1.0),            # empty answer
    ("<think>r</think>", 0.0, 0.0, 0.5),                              # no answer
    ("<answer>a</answer><think>r</think>", 0.0, 0.0, 1.0),            # wrong order
    ("<think>r<think>x</think></think><answer>a</answer>", 0.0, 1.0, 0.5),  # nested
    ("hi <think>r</think><answer>a</answer>", 0.0, 1.0, 1.0),         # text before
    ("<think>r</think><answer>a</answer> bye", 0.0, 1.0, 1.0),        # text after
    ("r</think><answer>a</answer>", 0.0, 1.0, 0.75),                  # <think> opened in the prompt
    ("<think>r</think><answer>a", 0.0, 0.0, 0.75),                    # truncated
    ("", 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("fn,column", [(rewards.format_reward, 1), (rewards.lenient_format_reward, 2),
                                       (rewards.tag_count_reward, 3)])
def test_format_rewards(fn, column):
  completions = [case[0] for case in FORMAT_CASES]
  assert call(fn, completions) == [case[column] for case in FORMAT_CASES]


def test_script_word_counts():
  assert rewards.script_word_counts("cafe\u0301 au lait, 3+2") == {"latin": 3}  # combining accent
  assert rewards.script_word_counts("so 3x+2") == {"latin": 2}
  assert rewards.script_word_counts("我们 the sum") == {"cjk": 2, "latin": 2}
  assert rewards.script_word_counts("Привет,world αβ") == {"cyrillic": 1, "latin": 1, "greek": 1}
  assert rewards.script_word_counts("2 + 3 = 5 ∑ 𝑥") == {}  # maths only


def test_language_consistency_reward():
  completions = [
      "<think>The sum is five.</think><answer>5</answer>",
      "<think>我们计算 the sum</think><answer>5</answer>",
      "<think>2+3=5</think><answer>5</answer>",
      "<think>Привет world</think>",
      "no tags, plain English",
      "<think>你好</think><answer>hello hello hello</answer>",  # the answer is not reasoning
  ]
  got = call(rewards.language_consistency_reward, completions)
  np.testing.assert_allclose(got, [1.0, 2 / 6, 1.0, 0.5, 1.0, 0.0])
  got = call(rewards.language_consistency_reward, completions, language=["zh"] * 6)
  np.testing.assert_allclose(got, [0.0, 4 / 6, 1.0, 0.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="'klingon'.*latin"):
    call(rewards.language_consistency_reward, completions[:1], language="klingon")


def test_exact_match_reward():
  completions = ["<answer> Paris </answer>", "PARIS", "<answer>Paris, France</answer>", "Paris", "<answer></answer>"]
  got = call(rewards.exact_match_reward, completions, reference=["paris", "Paris", "Paris", None, "x"])
  assert got == [1.0, 1.0, 0.0, None, 0.0]
  assert call(rewards.exact_match_reward, ["<answer>4</answer>"], answer=["4"]) == [1.0]
  with pytest.raises(ValueError, match="'reference' or an 'answer' column"):
    call(rewards.exact_match_reward, ["4"])


def test_rouge1_reward():
  completions = ["<answer>the cat sat</answer>", "the cat sat on the mat", "dogs bark", "x"]
  got = call(rewards.rouge1_reward, completions, reference=["the cat sat on the mat"] * 3 + [None])
  # Precision 3/3, recall 3/6 (reference has "the" twice) -> F1 = 2/3.
  assert got[3] is None
  np.testing.assert_allclose(got[:3], [2 / 3, 1.0, 0.0])


def test_soft_overlong_penalty():
  fn = rewards.soft_overlong_penalty(max_completion_length=10, soft_cache_length=4)
  lengths = [3, 6, 7, 8, 10, 12]
  want = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
  np.testing.assert_allclose(call(fn, ["c"] * 6, completion_lengths=lengths), want)
  np.testing.assert_allclose(call(fn, ["c"] * 6, completion_ids=[[1] * n for n in lengths]), want)
  assert fn.__name__ == "soft_overlong_penalty"
  with pytest.raises(ValueError, match="completion_lengths"):
    call(fn, ["c"])
  with pytest.raises(ValueError, match="soft_cache_length"):
    rewards.soft_overlong_penalty(10, 11)


COUNTDOWN_CASES = [  # (completion, expected) for the numbers [3, 5, 2] and the target 16
    ("<think>8 * 2</think><answer>(3 + 5) * 2</answer>", 1.0),
    ("<answer>2*(5+3)</answer>", 1.0),
    ("<answer>(3 + 5) * 2 = 16</answer>", 1.0),                   # "= target" allowed
    ("<answer>\\boxed{(3+5)*2}</answer>", 1.0),
    ("\\boxed{(3+5)*2}", 1.0),
    ("First 3 + 5 = 8.\nThen (3 + 5) * 2 = 16, done.", 1.0),        # no tags: the last equation
    ("<answer>5 * 3 + 2 - 2 / 2</answer>", 0.0),                  # 2 used twice
    ("<answer>(3 + 5) * 2 = 17</answer>", 0.0),                   # a wrong claimed result
    ("<answer>(3 + 5) * 2 = 16 = 4 * 4</answer>", 0.0),
    ("<answer>3 * 5 + 2</answer>", 0.0),                          # 17: wrong value
    ("<answer>3 * 3 + 5 + 2</answer>", 0.0),                      # 3 reused
    ("<answer>4 * 4</answer>", 0.0),                              # 4 was not given
    ("<answer>8 * 2</answer>", 0.0),                              # nor 8: no intermediates
    ("<answer>16</answer>", 0.0),
    ("<answer>2 ** 3 * 2</answer>", 0.0),                         # only + - * /
    ("<answer>(5 - 3) // 2</answer>", 0.0),
    ("<answer>-(3 - 5) * 2 * 4</answer>", 0.0),                   # no unary signs
    ("<answer>(3 + 5) x 2</answer>", 0.0),
    ("<answer>2 / (5 - 5)</answer>", 0.0),                        # invalid and 5 reused
    ("<answer>__import__('os').system('touch /tmp/pwned')</answer>", 0.0),
    ("<answer>(lambda: 16)()</answer>", 0.0),
    ("<answer>" + "(" * 100 + "(3 + 5) * 2" + ")" * 100 + "</answer>", 1.0),
    ("<answer>" + "(" * 240 + "(3 + 5) * 2" + ")" * 240 + "</answer>", 0.0),  # parser's limit
    ("<answer>" + "(" * 300 + "(3 + 5) * 2" + ")" * 300 + "</answer>", 0.0),  # too long
    ("<answer>(3 + 5) * 2", 1.0),                                 # unclosed tag: the equation
    ("The answer is 16.", 0.0),                                   # no equation at all
    ("", 0.0),
]


def test_countdown_reward():
  completions, want = zip(*COUNTDOWN_CASES)
  n = len(completions)
  got = call(rewards.countdown_reward, list(completions), numbers=[[3, 5, 2]] * n, target=[16] * n)
  assert got == list(want)
  assert rewards.REWARD_FUNCTIONS["countdown"] is rewards.countdown_reward


def test_countdown_reward_is_exact_and_reads_columns_per_row():
  # 7 / 2 * 4 is exactly 14 in fractions (floats would also get it; 1 / 3 * 3 needs them exact).
  got = call(rewards.countdown_reward,
             ["<answer>7 / 2 * 4</answer>", "<answer>1 / 3 * 3 + 9</answer>",
              "<answer>6 + 6</answer>", "<answer>6 + 6</answer>", "<answer>1</answer>"],
             numbers=[[7, 2, 4], [1, 3, 3, 9], [6, 6], ["6", "1"], None],
             target=[14, "10", 12, 12, 1])
  assert got == [1.0, 1.0, 1.0, 0.0, None]  # repeated numbers may each be used once
  assert rewards.countdown_value("1 / 3 * 3", [1, 3, 3]) == 1
  assert rewards.countdown_value("3 / (2 - 2)", [3, 2, 2]) is None


# ----------------------------------------------------------------------------
# combine_rewards and the config registry.
# ----------------------------------------------------------------------------


def first(prompts, completions, **columns):
  return [1.0, None, None, 0.5]


def second(prompts, completions, **columns):
  return [0.0, 2, None, None]


def test_combine_rewards_weights_and_skips_none():
  got, metrics = rewards.combine_rewards([first, ("other", second)], [2.0, 0.5], ["p"] * 4, ["c"] * 4)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [2.0, 1.0, NAN, 1.0])  # none rewarded row 2: missing
  assert metrics == {"rewards/first/mean": 0.75, "rewards/other/mean": 1.0}
  got, _ = rewards.combine_rewards([first, second], None, ["p"] * 4, ["c"] * 4)
  np.testing.assert_array_equal(got, [1.0, 2.0, NAN, 0.5])


def test_combine_rewards_calls_trl_style_functions_with_columns():
  def length_reward(completions, **kwargs):  # TRL functions often take no `prompts`
    return [len(c) * w for c, w in zip(completions, kwargs["scale"])]

  got, metrics = rewards.combine_rewards([length_reward], [1.0], ["p", "q"], ["ab", "abc"], scale=[1.0, 2.0])
  np.testing.assert_array_equal(got, [2.0, 6.0])
  assert metrics["rewards/length_reward/mean"] == 4.0


def fragile(prompts, completions, answer, **columns):
  if any("boom" in c for c in completions):
    raise KeyError("no parse")
  return [float(a) for a in answer]


def test_combine_rewards_reports_the_raising_function_and_completion():
  completions = ["ok", "x" * 500 + "boom", "fine"]
  with pytest.raises(rewards.RewardError, match=r"'fragile'.*KeyError.*completion 1: 'xxxx.*\.\.\.$") as info:
    rewards.combine_rewards([fragile], [1.0], ["p"] * 3, completions, answer=["1", "2", "3"])
  assert isinstance(info.value.__cause__, KeyError)
  assert len(str(info.value)) < 400  # the 500-char completion is truncated


def test_combine_rewards_on_error_zero_keeps_the_other_rows():
  completions = ["ok", "boom", "fine"]
  got, metrics = rewards.combine_rewards([fragile], [1.0], ["p"] * 3, completions, on_error="zero",
                                         answer=["1", "2", "3"])
  # Rows 0 and 2 are re-scored alone, each with its own row of the `answer` column.
  np.testing.assert_array_equal(got, [1.0, 0.0, 3.0])
  assert metrics == {"rewards/fragile/mean": 4 / 3, "rewards/fragile/errors": 1}


def test_combine_rewards_missing_column_names_the_function():
  with pytest.raises(rewards.RewardError, match="'accuracy_reward'.*answer"):
    rewards.combine_rewards([rewards.accuracy_reward], [1.0], ["p"], ["<answer>1</answer>"])


@pytest.mark.parametrize("bad", [NAN, float("inf"), "1.0"])
def test_combine_rewards_rejects_non_finite_values(bad):
  def sloppy(prompts, completions, **columns):
    return [1.0, bad]

  with pytest.raises(rewards.RewardError, match=r"'sloppy'.*completion 1: 'second'"):
    rewards.combine_rewards([sloppy], [1.0], ["p"] * 2, ["first", "second"])
  got, metrics = rewards.combine_rewards([sloppy], [1.0], ["p"] * 2, ["first", "second"], on_error="zero")
  np.testing.assert_array_equal(got, [1.0, 0.0])
  assert metrics["rewards/sloppy/errors"] == 1


def test_combine_rewards_rejects_wrong_length_even_with_on_error_zero():
  def short(prompts, completions, **columns):
    return [1.0]

  for on_error in ("raise", "zero"):
    with pytest.raises(rewards.RewardError, match="'short' returned 1 values for 3 completions"):
      rewards.combine_rewards([short], [1.0], ["p"] * 3, ["a", "b", "c"], on_error=on_error)


def test_combine_rewards_argument_checks():
  with pytest.raises(ValueError, match="unique names"):
    rewards.combine_rewards([first, first], None, ["p"] * 4, ["c"] * 4)
  with pytest.raises(ValueError, match="1 weights for 2"):
    rewards.combine_rewards([first, second], [1.0], ["p"] * 4, ["c"] * 4)
  with pytest.raises(ValueError, match=r"\['raise', 'zero'\]"):
    rewards.combine_rewards([first], None, ["p"] * 4, ["c"] * 4, on_error="ignore")


def test_get_reward_fns_resolves_config_names():
  named, weights = rewards.get_reward_fns([("accuracy", 1.0), ("format", 0.5), "rouge1", (second, 2)])
  assert named == [("accuracy", rewards.accuracy_reward), ("format", rewards.format_reward),
                   ("rouge1", rewards.rouge1_reward), ("second", second)]
  assert weights == [1.0, 0.5, 1.0, 2.0]
  got, metrics = rewards.combine_rewards(named[:2], weights[:2], ["p"], ["<think>r</think><answer>3</answer>"],
                                         answer=["3"])
  np.testing.assert_array_equal(got, [1.5])
  assert set(metrics) == {"rewards/accuracy/mean", "rewards/format/mean"}
  with pytest.raises(ValueError, match="unknown reward 'acc'.*'accuracy'.*'tag_count'"):
    rewards.get_reward_fns([("acc", 1.0)])


def test_rewards_string_form_of_the_command_line():
  """"name:weight,name:weight" (a bare name weighs 1) resolves as the list of pairs does, and
  format_rewards writes it back."""
  assert rewards.parse_rewards(" accuracy:1, format:0.5,rouge1 ") == [
      ("accuracy", 1.0), ("format", 0.5), ("rouge1", 1.0)]
  assert (rewards.get_reward_fns("accuracy:2,judge:-1e-1") ==
          ([("accuracy", rewards.accuracy_reward), ("judge", None)], [2.0, -0.1]))
  assert rewards.format_rewards([("accuracy", 1.0), (second, 0.25)]) == "accuracy:1,second:0.25"
  assert rewards.parse_rewards(rewards.format_rewards("format:0.5,tag_count:3")) == [
      ("format", 0.5), ("tag_count", 3.0)]
  for text, message in (("accuracy:1,,format", "expected name:weight pairs"), ("", "expected"),
                        ("accuracy:one", "the weight of 'accuracy' is 'one', not a number")):
    with pytest.raises(ValueError, match=message):
      rewards.parse_rewards(text)
  with pytest.raises(ValueError, match="unknown reward 'acc'"):
    rewards.get_reward_fns("acc:1")  # not the characters 'a', 'c', 'c' as names


def test_lenient_accuracy_falls_back_to_the_last_number():
  completions = ["4 + 4 = 8", "so it is -3.", "<answer>7</answer> then 9", "no number",
                 "about 1,234 apples", "\\boxed{12} and 13", "3/4"]
  gold = ["8", "-3", "7", "1", "1234", "12", "0.75"]
  assert rewards.lenient_accuracy_reward(None, completions, gold) == [1.0, 1.0, 1.0, 0.0, 1.0,
                                                                       1.0, 1.0]
  # The strict reward needs the tags or a box.
  assert rewards.accuracy_reward(None, completions, gold) == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
  assert "accuracy_lenient" in rewards.REWARD_FUNCTIONS
