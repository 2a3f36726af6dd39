"""Per-device peak memory of a run's compiled programs, full fine-tuning vs LoRA, on this CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/lora_memory.py --config configs/smollm2_arithmetic.py \
        --rank 16 --set rl.beta=0.04

The programs a run compiles (`compiled.programs`: update, sampler, evaluation sampler) at the
config's largest shapes, compiled for one local device from shapes alone (nothing allocated),
with XLA's memory analysis of each (`compiled.compiled_peaks`: a sampler's peak includes what
stays on the device while it runs: the optimizer state, the reference, the training params
when it decodes from a copy). Prints one line per program and setting, in GiB.
"""

from __future__ import annotations

import argparse

from grpo_jax import compiled, config as config_lib, models, sharding


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/smollm2_arithmetic.py")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE (numbers only)")
  args = parser.parse_args()

  model_cfg = None
  for rank in (0, args.rank):
    cfg = config_lib.from_file(args.config)
    for item in args.set:
      key, value = item.split("=", 1)
      *sections, leaf = key.split(".")
      node = cfg
      for s in sections:
        node = node[s]
      node[leaf] = type(node[leaf])(value)
    cfg.model.lora.rank = rank
    config_lib.validate(cfg, data=False)
    if model_cfg is None:
      model_cfg = models.load(cfg.model.name)[0].cfg
    peaks = compiled.compiled_peaks(cfg, model_cfg, sharding.make_mesh(1, 1, 1))
    label = "full" if rank == 0 else f"LoRA r{rank}"
    for name, p in peaks.items():
      parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in p["parts"].items() if v)
      print(f"{label:9s} {name:12s} peak {p['peak_bytes'] / 2**30:7.3f} GiB  ({parts})",
            flush=True)


if __name__ == "__main__":
  main()
