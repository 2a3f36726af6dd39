"""Processes: the one module that knows a run may span several hosts.

    rows = local_rows(batch_sharding, n)           # the rows of an n-row batch this host feeds
    r = padded_rows(n, batch_sharding)             # n rounded up to a multiple of the shards
    x = to_global(x_local, batch_sharding)         # host-local numpy rows -> one global jax.Array
    y_local = to_local(y, batch_sharding)          # a global array -> this host's rows (numpy)
    whole = gather_rows({"rewards": r_local}, rows)  # every host's rows, in batch order
    n = global_max(n_local)                        # one number agreed by every host

With one process each of these is the identity (or a plain device_put), so the
loops are written once for both cases. The conversions are jax's
`multihost_utils`; what is ours is the bookkeeping of which rows a host holds
(a host's devices hold a contiguous block of the batch) and keeping a host that
holds the same rows as another (the batch replicated across them) from
counting them twice.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def is_multi_process() -> bool:
  return jax.process_count() > 1


def is_main() -> bool:
  """Process 0 writes the run's files (metrics, plots, samples)."""
  return jax.process_index() == 0


def local_rows(sharding: NamedSharding, n: int) -> slice:
  """The rows [start, stop) of an n-row batch placed with `sharding` that this process holds."""
  spans = [idx[0] for idx in sharding.addressable_devices_indices_map((n,)).values()]
  return slice(min(s.start or 0 for s in spans), max(n if s.stop is None else s.stop for s in spans))


def padded_rows(n: int, sharding: NamedSharding | None) -> int:
  """`n` rounded up to a multiple of the pieces `sharding` splits a batch's leading dim into
  (data x fsdp for the batch sharding; no sharding: `n`), the rows a batch of n items is
  filled up to so that it can be split evenly."""
  if sharding is None or not sharding.spec or sharding.spec[0] is None:
    return n
  entry = sharding.spec[0]
  pieces = math.prod(sharding.mesh.shape[a] for a in (entry if isinstance(entry, tuple)
                                                      else (entry,)))
  return -(-n // pieces) * pieces


def to_global(tree, sharding: NamedSharding):
  """Global jax.Arrays placed with `sharding` from each process's rows of them (numpy leaves,
  leading dim = this process's `local_rows`)."""
  spec = jax.tree.map(lambda _: sharding.spec, tree)
  return multihost_utils.host_local_array_to_global_array(
      jax.tree.map(np.asarray, tree), sharding.mesh, spec)


def to_local(tree, sharding: NamedSharding):
  """This process's rows of global arrays (laid out with `sharding` if they are not), numpy."""
  spec = jax.tree.map(lambda _: sharding.spec, tree)
  return jax.tree.map(np.asarray,
                      multihost_utils.global_array_to_host_local_array(tree, sharding.mesh, spec))


def gather_rows(tree, rows: slice):
  """The whole batch from every process's `rows` of it (numpy leaves), in row order.

  Processes that hold the same rows (the batch replicated across them) count once.
  """
  if jax.process_count() == 1:
    return tree
  starts = multihost_utils.process_allgather(np.int64(rows.start))
  order = sorted({int(s): p for p, s in reversed(list(enumerate(starts)))}.items())
  everyone = multihost_utils.process_allgather(tree)  # leaves [processes, rows, ...]
  return jax.tree.map(lambda x: np.concatenate([x[p] for _, p in order]), everyone)


def global_max(value: int) -> int:
  """The largest of every process's `value` (e.g. a padded length all hosts must agree on)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int64(value))))
