"""A tiny randomly initialised model with a character-level tokenizer, built offline.

For tests and smoke runs: `models.load("tiny-random")`. The tokenizer is a real
`transformers` tokenizer (PreTrainedTokenizerFast over a `tokenizers`
WordLevel model): one token per printable ASCII character, plus special tokens
for the chat roles and the R1 tags, so a random policy emits `<answer>` often
enough for RL to have a signal within a few steps.
"""

from __future__ import annotations

import string

from grpo_jax.models.transformer import ModelConfig

SPECIAL = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]  # ordinary tokens: they decode
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _characters() -> list[str]:
  return [c for c in string.printable if c not in "\t\r\x0b\x0c"]


def vocab_size() -> int:
  return len(SPECIAL) + len(TAGS) + len(_characters())


def tokenizer():
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  chars = _characters()
  vocab = {tok: i for i, tok in enumerate(SPECIAL + TAGS + chars)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(SPECIAL)
  tok.add_tokens(TAGS)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                 unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def config(vocab_size: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                     max_position_embeddings=1024, tie_word_embeddings=True)
