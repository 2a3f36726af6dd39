"""A switch for counting FLOPs: how many iterations one step of the package's scans runs.

XLA's cost analysis counts a loop body once, whatever its trip count. The
package's scans (the layers, the micro-batches of gradient accumulation, the
chunks of the LM head) read `SCAN_UNROLL` for their `unroll`: 1 (a loop)
always, except inside `unrolled()`, where they unroll fully so that the cost
analysis of a lowered program counts every iteration (`grpo_jax.aot` does
this; nothing else should).
"""

from __future__ import annotations

import contextlib
import contextvars

SCAN_UNROLL: contextvars.ContextVar[int | bool] = contextvars.ContextVar("scan_unroll", default=1)


@contextlib.contextmanager
def unrolled():
  """Within the block, programs traced have their scans fully unrolled."""
  token = SCAN_UNROLL.set(True)
  try:
    yield
  finally:
    SCAN_UNROLL.reset(token)
