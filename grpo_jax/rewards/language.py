"""Language consistency: which scripts a completion's reasoning is written in.

DeepSeek-R1 rewards reasoning that stays in one target language; without a
language detector we count words per Unicode script (Latin, CJK, Cyrillic, ...).
"""

from __future__ import annotations

import re
import unicodedata

from grpo_jax.rewards.parse import completion_text

SCRIPTS = ("latin", "cjk", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai",
           "hangul")
# Korean is "hangul": Korean reasoning that drifts into Chinese characters or Japanese kana
# leaves its target, which the "cjk" target (every Han, Kana and Hangul character) cannot see.
_SCRIPT_ALIASES = {"en": "latin", "english": "latin", "zh": "cjk", "chinese": "cjk",
                   "ja": "cjk", "japanese": "cjk", "ko": "hangul", "korean": "hangul",
                   "ru": "cyrillic"}
_CJK_NAMES = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO")
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _char_script(ch: str, hangul: bool = False) -> str | None:
  """Script of a letter; "mark" for combining marks; None for anything else. With `hangul`,
  Hangul is a script of its own rather than part of "cjk"."""
  if unicodedata.category(ch).startswith("M"):
    return "mark"
  if not ch.isalpha():
    return None
  name = unicodedata.name(ch, "").removeprefix("FULLWIDTH ")
  if name.startswith("MATHEMATICAL"):  # italic x and friends: maths, not language
    return None
  if hangul and name.startswith("HANGUL"):
    return "hangul"
  if name.startswith(_CJK_NAMES):
    return "cjk"
  script = name.split(" ", 1)[0].lower()
  return script if script in SCRIPTS else "other"


def script_word_counts(text: str, hangul: bool = False) -> dict[str, int]:
  """Words per script: runs of letters of one script (combining marks join
  the run), except that each CJK character is a word of its own.

  With `hangul`, Hangul is the script "hangul" and, written with spaces as it
  is, a run of Hangul letters is one word ("사과를" is one word); Han and Kana
  characters stay "cjk", one word each."""
  counts: dict[str, int] = {}
  previous = None
  for ch in text:
    script = _char_script(ch, hangul)
    if script == "mark":
      continue
    if script is not None and (script == "cjk" or script != previous):
      counts[script] = counts.get(script, 0) + 1
    previous = script
  return counts


def _target_script(language) -> str:
  """The script a `language` value names (None: latin); ValueError for an unknown one."""
  target = (language or "latin").lower()
  target = _SCRIPT_ALIASES.get(target, target)
  if target not in SCRIPTS:
    raise ValueError(f"unknown target language {target!r}; expected one of "
                     f"{list(SCRIPTS)} or {sorted(_SCRIPT_ALIASES)}.")
  return target


def _check_kwargs(language=None) -> None:
  """Start-up check of config.reward_kwargs.language_consistency: a known language."""
  if language is None or isinstance(language, str):
    _target_script(language)


def language_consistency_reward(prompts, completions, language=None, **unused_columns):
  """Share of the reasoning's words written in the target script (DeepSeek-R1).

  The reasoning is the content of the <think> blocks or, when there is none,
  the whole completion; tags never count as words. A CJK character counts as
  a word. Reasoning with no words at all (pure maths) cannot mix languages
  and gets 1.0.

  Args:
    language: optional column (or one value for all rows; from the config:
      --config.reward_kwargs.language_consistency.language=ko) naming the
      target: a script in SCRIPTS or an alias ("en", "zh", "ko", ...). Default
      "latin". Korean ("ko") is "hangul": a Hangul word (a run of Hangul
      letters) counts once, and Han or Kana characters count against it.
  """
  del prompts, unused_columns
  if language is None or isinstance(language, str):
    language = [language or "latin"] * len(completions)
  rewards = []
  for completion, target in zip(completions, language, strict=True):
    target = _target_script(target)
    text = completion_text(completion)
    thoughts = _THINK_RE.findall(text)
    counts = script_word_counts(_TAG_RE.sub(" ", " ".join(thoughts) if thoughts else text),
                                hangul=target == "hangul")
    total = sum(counts.values())
    rewards.append(counts.get(target, 0) / total if total else 1.0)
  return rewards


language_consistency_reward.check_kwargs = _check_kwargs
