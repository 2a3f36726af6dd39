"""Device mesh and shardings: the one place that decides where arrays live.

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)        # -1: all remaining devices
    param_sh = param_shardings(mesh, params)           # same tree, NamedSharding leaves
    opt_sh = param_shardings(mesh, opt_state)          # mu / nu follow their params
    batch_sh = batch_sharding(mesh)                    # leading dim over data x fsdp

Mesh axes:
    data    pure data parallelism: params replicated, batch split
    fsdp    batch split too, and each param's big dim split (gathered per use)
    tensor  Megatron-style: column-parallel q/k/v/gate/up (output dim),
            row-parallel o/down (input dim), vocab-parallel embed/lm_head

Params get a PartitionSpec from the first rule in DEFAULT_RULES whose regex
fully matches the param's name, i.e. the last dict key on the path to the
leaf. Any pytree works, not just the params dict: optax states hold
params-shaped subtrees under the same names, so their moments are sharded like
their params, and everything else (step counts, scalars) is replicated.
The layer axis (leading, size num_layers) is never split: `lax.scan` runs over it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the param name, spec). Shapes in transformer.py: L = num_layers,
# D = hidden, F = intermediate, V = vocab, X = heads * head_dim.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"embed", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head", P("fsdp", "tensor")),  # [D, V]
    (r"(q|k|v)_proj", P(None, "fsdp", "tensor")),  # [L, D, X]  column-parallel
    (r"(gate|up)_proj", P(None, "fsdp", "tensor")),  # [L, D, F]  column-parallel
    (r"(o|down)_proj", P(None, "tensor", "fsdp")),  # [L, X|F, D]  row-parallel
    (r"(q|k|v)_bias", P(None, "tensor")),  # [L, X]  follows the output dim
    (r".*norm", P()),  # [L, D], [L, hd], [D]: small, replicated
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor"); one size may be -1 (the rest).

  Raises:
    ValueError: the sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)]
  if len(free) > 1 or bad:
    raise ValueError(f"mesh sizes must be positive ints with at most one -1; got {sizes} "
                     "(config.mesh.data / fsdp / tensor).")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free and n % fixed == 0:
    sizes[free[0]] = n // fixed
  if -1 in sizes.values() or math.prod(sizes.values()) != n:
    have = (f"the fixed sizes multiply to {fixed}, which does not divide" if free
            else f"they multiply to {fixed}, not")
    raise ValueError(
        f"mesh sizes {sizes}: {have} the {n} devices. Change config.mesh.data, "
        f"config.mesh.fsdp and config.mesh.tensor so that their product is {n}, "
        "or set one of them to -1 (all remaining devices).")
  # Auto axes: shardings are placed by jit's in/out shardings and propagated by
  # the compiler (jax.make_mesh now defaults to Explicit, sharding-in-types).
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _axis_size(mesh: Mesh, entry) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[a] for a in names)


def spec_for(name: str | None, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec of an array called `name` (None: no name, replicated).

  A rule whose spec has a different rank than the array (e.g. a factored
  optimizer statistic) does not apply, and a dim that its mesh axes do not
  divide is not split: both fall back to replicated, never to an error.
  """
  if name is None:
    return P()
  for pattern, spec in rules:
    if re.fullmatch(pattern, name):
      spec = tuple(spec)
      if spec and len(spec) != len(shape):
        return P()
      return P(*(e if e is None or dim % _axis_size(mesh, e) == 0 else None
                 for e, dim in zip(spec, shape)))
  return P()


def _param_name(path) -> str | None:
  """The last dict key on a tree path (nnx.State adds a trailing `.value`)."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
  return None


def param_shardings(mesh: Mesh, tree: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """A pytree of NamedSharding mirroring `tree` (arrays or ShapeDtypeStructs)."""

  def one(path, leaf):
    return NamedSharding(mesh, spec_for(_param_name(path), np.shape(leaf), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """For arrays whose leading dim is the batch: split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
