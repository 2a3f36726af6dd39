"""Token lists -> fixed-shape numpy batches: length buckets, left padding, fixed-size chunks.

    length = bucket_length(longest, PROMPT_BUCKETS)
    tokens_BxL, mask_BxL = left_pad(token_lists, pad_id, length)
    for chunk, real in fixed_size_chunks(items, size): ...   # last chunk padded with repeats

Shapes are static per bucket, so a run compiles a small, known set of programs.
Every padded batch in the package (prompts for the sampler, evaluation and the
judge; SFT rows; completions trimmed for the update) goes through here.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import numpy as np

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Completions also get a 16-token bucket: short answers are common and the update's cost
# grows with the padded completion length.
COMPLETION_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

T = TypeVar("T")


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  """The smallest bucket >= n; past the largest, the next multiple of it."""
  for b in buckets:
    if n <= b:
      return b
  return -(-n // buckets[-1]) * buckets[-1]


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
  """Left-pads token lists to `length` (default: the bucket of the longest).

  Returns (tokens [B, L] int32, mask [B, L] int32) as numpy arrays.
  """
  longest = max(len(t) for t in token_lists)
  length = length or bucket_length(longest)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the length {length}")
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  mask = np.zeros((len(token_lists), length), np.int32)
  for i, t in enumerate(token_lists):
    if len(t):
      tokens[i, length - len(t):] = t
      mask[i, length - len(t):] = 1
  return tokens, mask


def fixed_size_chunks(items: Sequence[T], size: int) -> Iterator[tuple[int, list[T], int]]:
  """(start, chunk, real) for consecutive chunks of `size` items; the last chunk is filled
  with repeats of its last item so that every chunk has the same shape (one compiled
  program), and `real` says how many of its items are genuine."""
  for start in range(0, len(items), size):
    chunk = list(items[start:start + size])
    real = len(chunk)
    yield start, chunk + [chunk[-1]] * (size - real), real
