"""The accelerators `grpo_jax.aot` compiles for, and their peak numbers for a roofline bound.

A topology is "KIND:SHAPE": a TPU generation and its chip grid ("v5e:2x4",
"v4:2x2x1", "v5p:2x2x1", "v6e:2x2"), or "h100:1x1x8" for eight H100 GPUs (the
last number is the GPU count). TPUs need the `libtpu` wheel that `jax[tpu]`
pins; GPUs need `jax-cuda12-plugin` (no CUDA libraries) and the H100 target
description in `targets/h100.txtpb` (SM count, shared memory, HBM size and
bandwidth, compute capability 9.0: NVIDIA's H100 SXM5 80 GB datasheet values).
"cpu" is this machine's own CPU devices (XLA's memory analysis for the CPU
backend, the host's RAM as the limit); it has no peak numbers, so no roofline.

Peaks (dense, per chip) and their sources:
| chip | bf16 FLOP/s | fp32 matmul FLOP/s | HBM bytes/s | HBM | source |
|---|---|---|---|---|---|
| TPU v4 | 275e12 | 275e12 | 1.2e12 | 32 GiB | Google Cloud TPU v4 docs |
| TPU v5e | 197e12 | 197e12 | 8.19e11 | 16 GiB | Google Cloud TPU v5e docs |
| TPU v5p | 459e12 | 459e12 | 2.765e12 | 95 GiB | Google Cloud TPU v5p docs |
| TPU v6e | 918e12 | 918e12 | 1.64e12 | 32 GiB | Google Cloud TPU v6e (Trillium) docs |
| H100 SXM | 989e12 | 494e12 (TF32) | 3.35e12 | 80 GB | NVIDIA H100 datasheet |
fp32 matmuls run at the bf16 rate on TPUs (XLA's default precision passes
them through the MXU in bf16) and as TF32 on H100s (JAX's default precision on
GPUs). The HBM column is what XLA may use: for v5e it compiles against 15.75
GiB of the 16 GiB, and that is the limit the tool reports.
"""

from __future__ import annotations

import dataclasses
import os

GIB = 2 ** 30
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "tpu" | "cuda" | "cpu"
  bf16_flops: float
  fp32_flops: float
  hbm_bandwidth: float  # bytes/s
  hbm_bytes: int

  def peak_flops(self, dtype: str) -> float:
    return self.bf16_flops if dtype == "bfloat16" else self.fp32_flops


CHIPS = {
    "v4": Chip("TPU v4", "tpu", 275e12, 275e12, 1.2e12, 32 * GIB),
    "v5e": Chip("TPU v5 lite", "tpu", 197e12, 197e12, 8.19e11, int(15.75 * GIB)),
    "v5p": Chip("TPU v5p", "tpu", 459e12, 459e12, 2.765e12, 95 * GIB),
    "v6e": Chip("TPU v6 lite", "tpu", 918e12, 918e12, 1.64e12, 32 * GIB),
    "h100": Chip("NVIDIA H100 80GB HBM3", "cuda", 989e12, 494e12, 3.35e12, 84929347584),
    # This machine: peaks unknown (0: no roofline), its RAM as the memory.
    "cpu": Chip("cpu", "cpu", 0.0, 0.0, 0.0,
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
}


def parse(topology: str) -> tuple[Chip, str]:
  """"v5e:2x4" -> (the chip, "2x4"); "cpu" -> (this machine's CPU, ""); ValueError naming the
  known kinds otherwise."""
  kind, _, shape = topology.partition(":")
  if kind == "cpu" and not shape:
    return CHIPS[kind], shape
  if kind not in CHIPS or kind == "cpu" or not shape:
    raise ValueError(f"unknown topology {topology!r}: expected KIND:SHAPE with KIND one of "
                     f"{sorted(set(CHIPS) - {'cpu'})}, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, "
                     "v6e:2x2, h100:1x1x8; or cpu (this machine)")
  return CHIPS[kind], shape


def devices(topology: str):
  """The abstract devices of a topology (nothing needs to be attached). Set JAX_PLATFORMS=cpu
  before jax is imported: the GPU plugin otherwise looks for a driver."""
  from jax.experimental import topologies

  chip, shape = parse(topology)
  kind = topology.partition(":")[0]
  if chip.platform == "cpu":
    import jax

    return jax.devices("cpu")
  try:
    if chip.platform == "tpu":
      os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
      desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    else:
      with open(os.path.join(HERE, "targets", f"{kind}.txtpb")) as f:
        target = f.read()
      desc = topologies.get_topology_desc(kind, "cuda", target_config=target, topology=shape)
  except Exception as e:  # the plugins raise RuntimeError / XlaRuntimeError / ImportError
    extra = "jax[tpu] (libtpu)" if chip.platform == "tpu" else "jax-cuda12-plugin"
    raise RuntimeError(f"cannot describe topology {topology!r} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); it needs {extra}: "
                       "pip install -e '.[aot]'") from e
  return list(desc.devices)
