"""Text rewards in any script: ROUGE-1 / ROUGE-L tokenisations, the regular-expression template
reward, answers read through a pattern, keywords from config.reward_kwargs, and the Korean
target of the language-consistency reward. Expected values are counted by hand in the
comments (tokens, overlaps, longest common subsequences)."""

import functools
import random
import re

import ml_collections
import numpy as np
import pytest

from grpo_jax import config as config_lib, config_cli, rewards

# The Korean answer template of docs/maths.md (section 9.6): "the corrected sentence"가 옳다.
# and a one-line reason. The same pattern as configs/data/korean_correction.jsonl's test.
KOREAN_PATTERN = r'"(?P<sentence>[^"\n]+)"[이가] 옳다\. (?P<reason>[^\n]+)'


def call(fn, completions, **columns):
  return fn(prompts=["q"] * len(completions), completions=completions, **columns)


def f1(overlap, predicted, reference):
  """F1 of `overlap` matching tokens out of `predicted` and `reference` tokens."""
  p, r = overlap / predicted, overlap / reference
  return 2 * p * r / (p + r) if overlap else 0.0


# ----------------------------------------------------------------------------
# Tokenisations.
# ----------------------------------------------------------------------------

def test_word_tokens_in_every_script():
  assert rewards.word_tokens("Hello, World! it's café_au") == ["hello", "world", "it", "s",
                                                               "café", "au"]
  assert rewards.word_tokens("cafe\u0301 ＡＢＣ") == ["café", "abc"]  # NFKC: composed, ASCII
  assert rewards.word_tokens("나는 학교에 갔다. 2024년!") == ["나는", "학교에", "갔다", "2024년"]
  assert rewards.word_tokens("我喜欢猫。") == ["我", "喜", "欢", "猫"]
  assert rewards.word_tokens("猫がすき ﾈｺ") == ["猫", "が", "す", "き", "ネ", "コ"]  # half-width
  assert rewards.word_tokens("Привет, МИР") == ["привет", "мир"]
  assert rewards.word_tokens(" ... !? ") == []


def test_character_tokens():
  assert rewards.character_tokens("학교에 갔다.") == ["학", "교", "에", "갔", "다"]
  assert rewards.character_tokens("Ab 1!") == ["a", "b", "1"]
  assert rewards.character_tokens("e\u0301!") == ["é"]


def test_tokenize_fn_choices():
  assert rewards.tokenize_fn("words") is rewards.word_tokens
  assert rewards.tokenize_fn(None) is rewards.word_tokens
  assert rewards.tokenize_fn("characters") is rewards.character_tokens

  class Subwords:
    def tokenize(self, text):
      return [text[i:i + 2] for i in range(0, len(text), 2)]

  assert rewards.tokenize_fn(Subwords())("abcde") == ["ab", "cd", "e"]
  assert rewards.tokenize_fn(str.split)("a b") == ["a", "b"]
  with pytest.raises(ValueError, match="policy's tokenizer"):
    rewards.tokenize_fn("policy")
  with pytest.raises(ValueError, match="'words', 'characters', 'policy'"):
    rewards.tokenize_fn(3)


# ----------------------------------------------------------------------------
# ROUGE-1 and ROUGE-L.
# ----------------------------------------------------------------------------

# (language, reference, completion, tokenizer, ROUGE-1 F1, ROUGE-L F1), counted by hand.
ROUGE_CASES = [
    # Identical strings: 1.0; nothing in common: 0.0.
    ("ko", "나는 오늘 학교에 갔다.", "나는 오늘 학교에 갔다.", "words", 1.0, 1.0),
    ("ko", "나는 오늘 학교에 갔다.", "비가 내린다", "words", 0.0, 0.0),
    ("ja", "猫が好きです", "猫が好きです", "words", 1.0, 1.0),
    ("ja", "猫が好き", "犬を見る", "words", 0.0, 0.0),
    ("zh", "我喜欢猫", "我喜欢猫", "words", 1.0, 1.0),
    ("zh", "我喜欢猫", "他们走了", "words", 0.0, 0.0),
    ("en", "the cat sat", "the cat sat", "words", 1.0, 1.0),
    ("en", "the cat sat", "dogs bark", "words", 0.0, 0.0),
    # Korean words: 3 of 4 words shared, in order -> 3/4 both.
    ("ko", "나는 오늘 학교에 갔다", "나는 어제 학교에 갔다", "words", 0.75, 0.75),
    # Same 3 words, two in order: ROUGE-1 1.0, LCS 2 of 3.
    ("ko", "고양이가 개를 쫓았다", "개를 고양이가 쫓았다", "words", 1.0, 2 / 3),
    # One particle differs: words 1 of 2; characters 4 of 5 (학 교 갔 다).
    ("ko", "학교에 갔다", "학교로 갔다", "words", 0.5, 0.5),
    ("ko", "학교에 갔다", "학교로 갔다", "characters", 0.8, 0.8),
    # Japanese, one token each for 猫 が 好 き で す: 5 of 6 shared.
    ("ja", "猫が好きです", "犬が好きです", "words", 5 / 6, 5 / 6),
    # Chinese: 喜 欢 猫 shared; precision 3/6, recall 3/4; LCS 喜欢猫 = 3 as well.
    ("zh", "我喜欢猫", "他喜欢狗和猫", "words", f1(3, 6, 4), f1(3, 6, 4)),
    # Chinese reversed: all 4 shared, LCS 喜欢 = 2.
    ("zh", "猫喜欢我", "我喜欢猫", "words", 1.0, 0.5),
    # English: "the" twice in the reference; precision 3/3, recall 3/6; LCS 3.
    ("en", "the cat sat on the mat", "the cat sat", "words", f1(3, 3, 6), f1(3, 3, 6)),
]


@pytest.mark.parametrize("language, reference, completion, tokenizer, want1, wantL", ROUGE_CASES)
def test_rouge_in_korean_japanese_chinese_english(language, reference, completion, tokenizer,
                                                  want1, wantL):
  del language
  got1 = call(rewards.rouge1_reward, [completion], reference=[reference], tokenizer=tokenizer)
  gotL = call(rewards.rougeL_reward, [completion], reference=[reference], tokenizer=tokenizer)
  assert isinstance(got1[0], float) and isinstance(gotL[0], float)
  np.testing.assert_allclose([got1[0], gotL[0]], [want1, wantL], rtol=1e-12, atol=0)


def test_korean_rouge_is_not_zero_any_more():
  """rouge-score's default tokenizer keeps [a-z0-9] only: every Korean pair scored 0."""
  from rouge_score import rouge_scorer

  ref, pred = "문장을 바르게 고쳐 쓰세요", "문장을 바르게 쓰세요"
  assert rouge_scorer.RougeScorer(["rouge1"]).score(ref, pred)["rouge1"].fmeasure == 0.0
  assert call(rewards.rouge1_reward, [pred], reference=[ref]) == [pytest.approx(f1(3, 3, 4))]


def test_rouge_matches_rouge_score_on_english():
  """Where the tokenisations agree (ASCII English, no stemming) the numbers are rouge-score's
  own, for both ROUGE-1 and ROUGE-L, on random sentences."""
  from rouge_score import rouge_scorer

  words = "the a cat dog sat ran on under mat rug big small 42 it's Don't, over. THE".split()
  rng = random.Random(0)
  pairs = [(" ".join(rng.choices(words, k=rng.randint(1, 12))),
            " ".join(rng.choices(words, k=rng.randint(1, 12)))) for _ in range(50)]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
  refs, preds = zip(*pairs)
  for kind, fn in (("rouge1", rewards.rouge1_reward), ("rougeL", rewards.rougeL_reward)):
    want = [scorer.score(r, p)[kind].fmeasure for r, p in pairs]
    assert call(fn, list(preds), reference=list(refs)) == want
  assert len({round(x, 6) for x in want}) > 10  # a spread of overlaps, not only 0 and 1


def test_rouge_with_a_tokenizer_object_or_function():
  class Syllables:
    def tokenize(self, text):
      return [ch for ch in text if not ch.isspace()]

  got = call(rewards.rouge1_reward, ["학교로 갔다"], reference=["학교에 갔다"],
             tokenizer=Syllables())
  assert got == [pytest.approx(0.8)]
  got = call(rewards.rougeL_reward, ["b a"], reference=["a b"], tokenizer=str.split)
  assert got == [pytest.approx(0.5)]


def test_rouge_reads_answer_tags_and_references():
  completions = ["<answer>나는 학교에 갔다</answer> 설명", "x"]
  got = call(rewards.rouge1_reward, completions, answer=["나는 학교에 갔다", None])
  assert got == [1.0, None]


# ----------------------------------------------------------------------------
# The template reward and answers read through a pattern.
# ----------------------------------------------------------------------------

KOREAN_COMPLETIONS = [
    '"나는 학교에 갔다."가 옳다. 과거의 일이므로 과거 시제를 쓴다.',          # the template
    '  "나는 학교에 갔다."가 옳다. 과거의 일이다.\n',                          # stripped
    '"나는 학교에 갔다."가 옳다.',                                             # no reason
    '나는 학교에 갔다.가 옳다. 이유',                                          # no quotes
    '"나는 학교에 갔다."가 옳다. 이유\n그리고 덧붙이는 말',                    # a second line
    '"나는 학교에 간다."가 옳다. 현재의 일이다.',                              # other sentence
    '"책상이 있다"이 옳다. 이유가 있다.',                                      # 이 after a batchim
]


def test_regex_format_reward_on_the_korean_template():
  got = call(rewards.regex_format_reward, KOREAN_COMPLETIONS, pattern=KOREAN_PATTERN)
  assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
  # The answer group must hold something other than spaces.
  got = call(rewards.regex_format_reward, ["<a> </a>", "<a>x</a>"], pattern=r"<a>(.*)</a>",
             answer_group=1)
  assert got == [0.0, 1.0]


def test_exact_match_and_rouge_through_the_pattern():
  gold = '"나는 학교에 갔다."가 옳다. 어제의 일이기 때문이다.'
  completions = KOREAN_COMPLETIONS[:6]
  em = call(rewards.exact_match_reward, completions, answer=[gold] * 6, pattern=KOREAN_PATTERN,
            answer_group="sentence")
  # Same sentence whatever the reason; no match (broken format) is 0.0.
  assert em == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
  # A bare reference (the sentence alone) is compared as it is; a group index works too.
  em = call(rewards.exact_match_reward, completions[:1], reference=["나는 학교에 갔다."],
            pattern=KOREAN_PATTERN, answer_group="1")
  assert em == [1.0]
  # ROUGE-1 on the reason: "과거의 일이므로 과거 시제를 쓴다" vs "어제의 일이기 때문이다"
  # share no word; the last completion's reason "현재의 일이다" neither.
  r1 = call(rewards.rouge1_reward, completions, answer=[gold] * 6, pattern=KOREAN_PATTERN,
            answer_group="reason")
  assert r1 == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  # On the sentence, characters: 나 는 학 교 에 갔/간 다 -> 6 of 7.
  r1 = call(rewards.rouge1_reward, completions[5:6], answer=[gold], pattern=KOREAN_PATTERN,
            answer_group="sentence", tokenizer="characters")
  assert r1 == [pytest.approx(6 / 7)]
  # Without an answer group, the whole (stripped) completion against the whole reference:
  # words of the gold: "나는 학교에 갔다 가 옳다 어제의 일이기 때문이다" (8); completion 2's
  # "나는 학교에 갔다 가 옳다 과거의 일이다" (7) shares 5.
  rl = call(rewards.rouge1_reward, completions[1:2], answer=[gold], pattern=KOREAN_PATTERN)
  assert rl == [pytest.approx(f1(5, 7, 8))]


# ----------------------------------------------------------------------------
# Keywords from config.reward_kwargs.
# ----------------------------------------------------------------------------

def test_reward_kwargs_bind_keywords():
  named, weights = rewards.get_reward_fns(
      "regex_format:0.5,exact_match,rouge1,rougeL",
      {"regex_format": {"pattern": KOREAN_PATTERN},
       "exact_match": {"pattern": KOREAN_PATTERN, "answer_group": "sentence"},
       "rougeL": {"tokenizer": "characters"}})
  assert [name for name, _ in named] == ["regex_format", "exact_match", "rouge1", "rougeL"]
  assert weights == [0.5, 1.0, 1.0, 1.0]
  assert isinstance(named[0][1], functools.partial)
  assert named[2][1] is rewards.rouge1_reward  # no keywords: the function itself
  gold = '"나는 학교에 갔다."가 옳다. 어제의 일이다.'
  total, metrics = rewards.combine_rewards(named, weights, ["q"] * 2, KOREAN_COMPLETIONS[:2],
                                           answer=[gold] * 2)
  assert metrics["rewards/regex_format/mean"] == 1.0
  assert metrics["rewards/exact_match/mean"] == 1.0
  assert metrics["rewards/rouge1/mean"] < 1.0 and total[1] == pytest.approx(
      0.5 + 1 + sum(fn(prompts=None, completions=KOREAN_COMPLETIONS[1:2], answer=[gold])[0]
                    for _, fn in named[2:]))


def test_policy_tokenizer_is_put_in_place_of_policy():
  class Tok:
    def tokenize(self, text):
      return list(text.replace(" ", ""))

  kwargs = {"rouge1": {"tokenizer": "policy"}}
  (name, fn), = rewards.get_reward_fns(["rouge1"], kwargs, tokenizer=Tok())[0]
  assert call(fn, ["ab"], reference=["abcd"]) == [pytest.approx(f1(2, 2, 4))]
  (_, unbound), = rewards.get_reward_fns(["rouge1"], kwargs)[0]  # start-up: checked, unbound
  with pytest.raises(ValueError, match="policy's tokenizer"):
    call(unbound, ["ab"], reference=["abcd"])
  fn = rewards.reward_fn("rouge1", kwargs, Tok())  # what config.eval.reward uses
  assert call(fn, ["ab"], reference=["abcd"]) == [pytest.approx(f1(2, 2, 4))]


@pytest.mark.parametrize("kwargs, message", [
    ({"regex_fromat": {"pattern": "x"}}, "no reward is named 'regex_fromat'; did you mean "
     "'regex_format'"),
    ({"rouge1": {"tokeniser": "words"}}, "reward 'rouge1' takes no keyword 'tokeniser'; did you "
     "mean 'tokenizer'"),
    ({"rouge1": {"tokenizer": "spaces"}}, "tokenizer='spaces'; expected one of"),
    ({"exact_match": {"pattern": "(unclosed"}}, "is not a regular expression"),
    ({"exact_match": {"pattern": "(a)", "answer_group": 2}}, "has no such group"),
    ({"exact_match": {"pattern": "(?P<x>a)", "answer_group": "y"}}, "has no such group"),
    ({"exact_match": {"answer_group": 1}}, "needs a pattern"),
    ({"language_consistency": {"language": "klingon"}}, "unknown target language 'klingon'"),
    ({}, "reward 'regex_format' needs the keyword 'pattern': set "
     "--config.reward_kwargs.regex_format.pattern=VALUE"),
])
def test_reward_kwargs_errors_name_the_fix(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    rewards.get_reward_fns("regex_format" if not kwargs else "rouge1", kwargs)


def test_config_reward_kwargs_validate_and_command_line():
  cfg = config_lib.defaults()
  cfg.rewards = [("regex_format", 1.0), ("exact_match", 1.0)]
  with pytest.raises(config_lib.ConfigError, match="needs the keyword 'pattern'"):
    config_lib.validate(cfg)
  cfg.reward_kwargs = {"regex_format": {"pattern": KOREAN_PATTERN}}
  config_lib.validate(cfg)
  cfg.reward_kwargs.regex_format.answer_group = "name"
  with pytest.raises(config_lib.ConfigError, match="config.reward_kwargs.regex_format: "
                     "answer_group='name'"):
    config_lib.validate(cfg)
  # Command-line text becomes the declared type: group index int, a name str, idf bool.
  assert config_lib.parse_reward_keyword("exact_match", "answer_group", "1") == 1
  assert config_lib.parse_reward_keyword("exact_match", "answer_group", "sentence") == "sentence"
  assert config_lib.parse_reward_keyword("bertscore", "idf", "true") is True
  assert config_lib.parse_reward_keyword("bertscore", "num_layers", "none") is None
  with pytest.raises(config_lib.ConfigError, match="takes int or None there"):
    config_lib.parse_reward_keyword("bertscore", "num_layers", "six")
  # The overrides as grpo_jax.main applies them: a keyword at a time, a reward or all as a dict.
  cfg = config_lib.defaults()
  cfg.reward_kwargs = {"rouge1": {"tokenizer": "characters"}}
  config_cli.apply_own(cfg, [
      ("reward_kwargs.regex_format.pattern", KOREAN_PATTERN),
      ("reward_kwargs.exact_match", '{"pattern": "(a)b", "answer_group": 1}'),
      ("reward_kwargs.language_consistency.language", "ko")], task_renamed=False)
  assert cfg.reward_kwargs.to_dict() == {
      "rouge1": {"tokenizer": "characters"}, "regex_format": {"pattern": KOREAN_PATTERN},
      "exact_match": {"pattern": "(a)b", "answer_group": 1},
      "language_consistency": {"language": "ko"}}
  # What --print_config shows (a Python dict) reads back as the whole of reward_kwargs.
  shown = repr(cfg.reward_kwargs.to_dict())
  again = config_lib.defaults()
  config_cli.apply_own(again, [("reward_kwargs", shown)], task_renamed=False)
  assert again.reward_kwargs.to_dict() == cfg.reward_kwargs.to_dict()
  for own in ([("reward_kwargs.rouge1.tokeniser", "words")],
              [("reward_kwargs.rogue1.tokenizer", "words")],
              [("reward_kwargs", "{'rouge1': {'x': 1}}")], [("reward_kwargs.rouge1", "[1]")]):
    with pytest.raises(SystemExit):
      config_cli.apply_own(config_lib.defaults(), own, task_renamed=False)


def test_reward_kwargs_is_one_key_of_the_schema():
  cfg = config_lib.defaults()
  assert isinstance(cfg.reward_kwargs, ml_collections.ConfigDict)
  cfg.reward_kwargs = {"regex_format": {"pattern": "x"}}
  assert "reward_kwargs" in config_lib._flat_keys(cfg)
  assert "reward_kwargs.regex_format.pattern" not in config_lib._flat_keys(cfg)


# ----------------------------------------------------------------------------
# Language consistency with a Korean target.
# ----------------------------------------------------------------------------

def test_language_consistency_in_korean():
  completions = [
      "<think>문장을 다시 읽어 보면 맞춤법이 틀렸다</think>",   # 5 Hangul words
      "<think>이 문장은 wrong 이다</think>",                 # 3 Hangul words, 1 Latin
      "<think>学校 에 간다</think>",                         # 2 Han characters, 2 Hangul words
      "<think>The sentence is wrong</think>",
      "<think>2 + 3 = 5</think>",
  ]
  want = [1.0, 3 / 4, 2 / 4, 0.0, 1.0]
  np.testing.assert_allclose(call(rewards.language_consistency_reward, completions,
                                  language="ko"), want)
  np.testing.assert_allclose(call(rewards.language_consistency_reward, completions,
                                  language=["korean"] * 5), want)
  # From the config, one keyword for every row.
  (_, fn), = rewards.get_reward_fns(["language_consistency"],
                                    {"language_consistency": {"language": "ko"}})[0]
  np.testing.assert_allclose(call(fn, completions), want)
  # The cjk target still counts every Han, Kana and Hangul character a word.
  assert rewards.script_word_counts("학교 学校") == {"cjk": 4}
  assert rewards.script_word_counts("학교에 学校 go", hangul=True) == {"hangul": 1, "cjk": 2,
                                                                    "latin": 1}
