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
leaf. A rule is (regex, spec) or (regex, spec, optional axes): a dim whose
mesh axes do not divide it is an error naming the param, unless all of those
axes are optional in the rule, in which case that dim is replicated. So a
mesh that would silently leave a param whole on every device (FSDP that
shards nothing) fails at start-up instead, while a vocabulary or a head count
that the tensor axis does not divide costs only memory. Any pytree works, not
just the params dict: optax states hold params-shaped subtrees under the same
names, so their moments are sharded like their params, and everything else
(step counts, scalars) is replicated.
The layer axis (leading, size num_layers) is never split: `lax.scan` runs over it.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the param name, spec[, optional axes]). Shapes in transformer.py: L = num_layers,
# D = hidden, F = intermediate, V = vocab, X = heads * head_dim (kv_heads * head_dim for k/v).
# fsdp always splits D and is required: a D it does not divide would leave FSDP sharding
# nothing. tensor is optional where it splits V (vocabularies have odd sizes: 151665, a
# character tokenizer's) or X (few kv heads), and required on the MLP's F.
TENSOR_OPTIONAL = frozenset({"tensor"})
DEFAULT_RULES: tuple[tuple, ...] = (
    (r"embed", P("tensor", "fsdp"), TENSOR_OPTIONAL),  # [V, D]
    (r"lm_head", P("fsdp", "tensor"), TENSOR_OPTIONAL),  # [D, V]
    (r"(q|k|v)_proj", P(None, "fsdp", "tensor"), TENSOR_OPTIONAL),  # [L, D, X] column-parallel
    (r"(gate|up)_proj", P(None, "fsdp", "tensor")),  # [L, D, F]  column-parallel
    (r"o_proj", P(None, "tensor", "fsdp"), TENSOR_OPTIONAL),  # [L, X, D]  row-parallel
    (r"down_proj", P(None, "tensor", "fsdp")),  # [L, F, D]  row-parallel
    (r"(q|k|v)_bias", P(None, "tensor"), TENSOR_OPTIONAL),  # [L, X]  follows the output dim
    (r".*norm", P()),  # [L, D], [L, hd], [D]: small, replicated
    (r"value_(head|bias)", P()),  # [D, 1], [1]: a critic's head (models/value.py), replicated
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


def _axis_names(entry) -> tuple[str, ...]:
  return entry if isinstance(entry, tuple) else (entry,)


def spec_for(name: str | None, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple] = DEFAULT_RULES) -> P:
  """PartitionSpec of an array called `name` (None: no name, replicated).

  A rule whose spec has a different rank than the array (e.g. a factored
  optimizer statistic) does not apply: replicated. A dim that its mesh axes do
  not divide is replicated when the rule marks all of those axes optional.

  Raises:
    ValueError: a dim that its mesh axes do not divide, under a required axis.
  """
  if name is None:
    return P()
  for rule in rules:
    pattern, spec, *optional = rule
    optional = frozenset(optional[0]) if optional else frozenset()
    if not re.fullmatch(pattern, name):
      continue
    spec = tuple(spec)
    if spec and len(spec) != len(shape):
      return P()
    out = []
    for i, (entry, dim) in enumerate(zip(spec, shape)):
      if entry is None or dim % _axis_size(mesh, entry) == 0:
        out.append(entry)
      elif set(_axis_names(entry)) <= optional:
        out.append(None)  # e.g. a vocabulary the tensor axis does not divide
      else:
        raise ValueError(
            f"param {name!r} of shape {tuple(shape)}: the sharding rule ({pattern!r}, "
            f"{P(*spec)}) splits its dim {i} ({dim}) over mesh axis {entry!r} of size "
            f"{_axis_size(mesh, entry)}, which does not divide it (mesh "
            f"{dict(mesh.shape)}). Choose config.mesh sizes that divide {dim}, or mark "
            f"{entry!r} optional in the rule (that dim is then replicated).")
    return P(*out)
  return P()


def param_name(path) -> str | None:
  """The last dict key on a tree path (nnx.State adds a trailing `.value`)."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
  return None


def param_shardings(mesh: Mesh, tree: Any, rules: Sequence[tuple] = DEFAULT_RULES):
  """A pytree of NamedSharding mirroring `tree` (arrays or ShapeDtypeStructs)."""

  def one(path, leaf):
    return NamedSharding(mesh, spec_for(param_name(path), np.shape(leaf), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, tree)


def _without_axes(rules: Sequence[tuple], axes: Sequence[str]) -> tuple[tuple, ...]:
  """`rules` with `axes` taken out of every spec (those dims replicated over them)."""

  def drop(entry):
    kept = tuple(a for a in _axis_names(entry) if a not in axes) if entry is not None else ()
    return None if not kept else kept[0] if len(kept) == 1 else kept

  return tuple((pattern, P(*(drop(e) for e in spec)), *rest)
               for pattern, spec, *rest in rules)


def rollout_shardings(mesh: Mesh, tree: Any, rules: Sequence[tuple] = DEFAULT_RULES):
  """Layout of the sampler's copy of the weights: the training layout without the batch axes.

  Each device holds every weight whole, but for the tensor split: the decode loop then reads
  its weights where they are, instead of all-gathering the FSDP shards at every token.
  """
  return param_shardings(mesh, tree, _without_axes(rules, BATCH_AXES))


def constrain(x: jax.Array, spec: Sequence) -> jax.Array:
  """`x` constrained to `spec` on the mesh that the trace runs under (`jax.set_mesh`); unchanged
  without one. A None entry means whole (replicated) on every device. A dim whose mesh axes
  do not divide it, or an axis the mesh lacks, is left to the compiler (unconstrained), so a
  constraint never fails: a micro-batch of 4 rows on 8 devices still runs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  out = []
  for entry, dim in zip(spec, x.shape):
    names = () if entry is None else _axis_names(entry)
    ok = all(a in mesh.axis_names for a in names)
    ok = ok and dim % math.prod(mesh.shape[a] for a in names) == 0
    out.append(entry if ok else P.UNCONSTRAINED)
  return jax.lax.with_sharding_constraint(x, P(*out))


def on_mesh(jitted, mesh: Mesh | None):
  """`jitted` (a `jax.jit` function) called and lowered under `jax.set_mesh(mesh)`, so that
  `constrain` applies inside it; only the call is on the mesh, nothing around it."""
  if mesh is None:
    return jitted

  @functools.wraps(jitted)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return jitted(*args, **kwargs)

  def lower(*args, **kwargs):
    with jax.set_mesh(mesh):
      return jitted.lower(*args, **kwargs)

  call.lower = lower
  return call


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first array (or ShapeDtypeStruct) in `tree` placed by a NamedSharding."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


# Layouts of activations (`constrain` specs): rows over the batch axes; KV heads over tensor.
ACTIVATIONS = (BATCH_AXES, None, None)  # [B, L, D] residual stream
KV = (BATCH_AXES, "tensor", None, None)  # [B, KV, L, hd] a call's keys / values
KV_CACHE = (None, *KV)  # [layers, B, KV, S, hd]


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch axes (data x fsdp) split a batch into."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """For arrays whose leading dim is the batch: split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
