r"""Compile a run's programs ahead of time for TPUs or GPUs that are not here: memory, cost.

    python -m grpo_jax.aot --config=configs/qwen25_gsm8k.py --topology=v5e:2x4
    python -m grpo_jax.aot --config=configs/qwen3_8b_gsm8k.py --topology=h100:1x1x8 \
        --config.rl.max_completion_length=8192
    python -m grpo_jax.aot --config=configs/smollm2_arithmetic.py:two_digit --topology=cpu

(`--topology=cpu`: this machine's CPU devices, XLA's CPU memory analysis, no roofline.)

From shapes alone (no weights read, no tokenizer): the model's shapes come from
`config.model.name` when it is a preset of `models.presets` or a folder with a
Hugging Face config.json, or from `--model_shapes`. It lowers and compiles the
programs a training run with that config compiles, with the config's mesh and
sharding rules laid over the topology's devices:

- `sample`: the rollout sampler (B prompts of rl.max_prompt_length, G
  completions of up to rl.max_completion_length);
- `update`: the GRPO update at the longest completion bucket (policy, reference
  when beta != 0, AdamW state, gradient accumulation; params and optimizer state
  donated); the SFT update in SFT mode;
- with PPO (config.rl.advantage_estimator="gae"), the critic's programs
  (`grpo_jax.critic`): `critic_values`, the rollout pass (the critic's values,
  the reference's log-probs with rl.kl_in_reward, GAE), and `critic_update`,
  the critic's update (its params and AdamW state donated); the policy's
  `update` then takes per-token advantages;
- `eval_sample`: the evaluation sampler (eval.prompts_per_batch prompts, or
  eval.num_problems when fewer, filled up to a multiple of data x fsdp and
  split over them as the run's evaluator does; eval.num_samples each), when
  config.eval.num_problems > 0.

Each program gets a table row and one JSON line (stdout) with XLA's memory
analysis per device (argument, output, temp, peak = argument + output + temp +
code - aliased; "held": the training state that stays on the chip while a program
runs without being its argument, which counts in whether it fits: for a sampler
the training params, optimizer state and reference; with PPO the critic's params
and optimizer state in the policy's programs and the policy's in the critic's),
whether it fits the chip's HBM, its FLOPs and bytes accessed
per device per call, the collectives in the compiled HLO (for a sampler also
those of one decode step, "per decode" in the table: what runs inside the
decode loop; the weights' all-gathers would show here), the compile time,
and a roofline lower bound on its time: max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth). FLOPs and bytes come from XLA's cost analysis of the same program
lowered for one CPU device with every scan unrolled (the analysis counts a
loop body once), divided by the number of devices; a sampler is counted as
its prefill plus max_completion_length one-token model steps (every row
running to the limit: an upper bound; see `compiled.total_cost`). Exit 0 when
every program fits; otherwise one line per program that does not, with the
shortfall and what to change. The work itself is in `grpo_jax.compiled`.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: the GPU plugin must not probe
# The tool only compiles for a described topology and never opens a chip, so it need not take
# libtpu's one-process lock (two compiles at once would otherwise refuse each other).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "KIND:SHAPE, e.g. v5e:2x4 or h100:1x1x8; "
                                "or cpu (this machine)")
_SHAPES = flags.DEFINE_string("model_shapes", None, "a models.presets name or a folder with a "
                              "Hugging Face config.json (default: config.model.name)")
_PROGRAMS = flags.DEFINE_list("programs", None, "only these programs (sample, update, "
                              "critic_values, critic_update, eval_sample; default all the run "
                              "compiles)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from grpo_jax import aot_targets, compiled, config as config_lib
  from grpo_jax.models import presets

  cfg = _CONFIG.value
  if cfg is None or not _TOPOLOGY.value:
    raise app.UsageError("give --config=configs/NAME.py[:ARG] and --topology=KIND:SHAPE")
  try:
    config_lib.validate(cfg, data=False)
    aot_targets.parse(_TOPOLOGY.value)
    model_cfg = presets.shapes(_SHAPES.value or cfg.model.name)
    config_lib.validate_with_model(cfg, model_cfg)
    records = compiled.analyze(cfg, _TOPOLOGY.value, model_cfg, only=_PROGRAMS.value)
  except (config_lib.ConfigError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(compiled.table(records), file=sys.stderr)
  for r in records:
    print(json.dumps(r), flush=True)
  problems = compiled.shortfalls(records)
  for line in problems:
    print(line, file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  app.run(main)
