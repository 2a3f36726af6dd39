"""TRL's GRPOTrainer on the benchmark workload; bench.py runs it in its own process.

    python benchmarks/grpo_step/trl_run.py --model=HF_FOLDER --data=PROMPTS.json \\
        --steps=N --out=RESULT.json [--threads=2]

HF_FOLDER is the embedded SmolLM2 GGUF exported by grpo_jax (fp32); PROMPTS.json
({"rows": [{"prompt", "answer", "expression"}], "settings": {...}}) holds the
chat-templated prompts in the order grpo_jax trains on them, two per step, and
the shared settings. Writes per-step times (step, and the generate call
inside it) and completion lengths to RESULT.json.
"""

import json
import os
import time

import torch
from absl import app, flags
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from grpo_jax import rewards


flags.DEFINE_string("model", None, "HF folder (fp32 SmolLM2 exported by grpo_jax)")
flags.DEFINE_string("data", None, "prompts and settings written by bench.py")
flags.DEFINE_integer("steps", None, "optimizer steps", lower_bound=1)
flags.DEFINE_string("out", None, "the JSON result file")
flags.DEFINE_integer("threads", 2, "torch threads")
flags.DEFINE_string("output_dir", None, "TRL's output_dir (nothing is saved)")
flags.DEFINE_bool("gradient_checkpointing", False,
                  "TRL's default; off here as grpo_jax does not recompute activations")
flags.mark_flags_as_required(["model", "data", "steps", "out"])


class TimedGRPOTrainer(GRPOTrainer):
  """GRPOTrainer that records the wall time of each generate call."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.generate_s = []

  def _generate_single_turn(self, *args, **kwargs):
    t = time.perf_counter()
    out = super()._generate_single_turn(*args, **kwargs)
    self.generate_s.append(time.perf_counter() - t)
    return out


class StepTimer(TrainerCallback):
  """Wall time of each optimizer step (on_step_begin -> on_step_end) and its logged metrics."""

  def __init__(self):
    self.step_s, self.logs, self._t = [], [], None

  def on_step_begin(self, args, state, control, **kwargs):
    self._t = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.step_s.append(time.perf_counter() - self._t)

  def on_log(self, args, state, control, logs=None, **kwargs):
    if logs and "completions/mean_length" in logs:
      self.logs.append(dict(logs))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  torch.set_num_threads(args.threads)
  with open(args.data) as f:
    data = json.load(f)
  s = data["settings"]

  tokenizer = AutoTokenizer.from_pretrained(args.model)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  # Plain-string prompts: TRL tokenizes them with tokenizer(text=...), special tokens on;
  # this tokenizer adds none, so the ids are grpo_jax's (checked here, not assumed).
  for row in data["rows"][:2]:
    assert tokenizer(text=row["prompt"])["input_ids"] == row["prompt_ids"], "prompt ids differ"
  dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "answer", "expression")}
                               for r in data["rows"]])
  names = [name for name, _ in s["rewards"]]
  config = GRPOConfig(
      output_dir=args.output_dir or os.path.join(os.path.dirname(args.out), "trl_output"),
      use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=args.gradient_checkpointing,
      model_init_kwargs={"dtype": torch.float32},
      max_steps=args.steps,
      per_device_train_batch_size=s["prompts_per_step"] * s["num_generations"],
      gradient_accumulation_steps=1,
      num_generations=s["num_generations"],
      num_iterations=1,
      max_completion_length=s["max_completion_length"],
      temperature=s["temperature"], top_p=1.0, top_k=0,
      beta=s["beta"], epsilon=s["epsilon"], loss_type=s["loss_type"], scale_rewards="group",
      reward_weights=[w for _, w in s["rewards"]],
      learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
      weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=s["max_grad_norm"],
      shuffle_dataset=False,  # the dataset's order: grpo_jax's prompts, step for step
      seed=0, logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
      disable_tqdm=True, dataloader_num_workers=0,
  )
  timer = StepTimer()
  trainer = TimedGRPOTrainer(
      model=args.model, processing_class=tokenizer, args=config, train_dataset=dataset,
      reward_funcs=[rewards.REWARD_FUNCTIONS[n] for n in names], callbacks=[timer])
  trainer.train()
  assert len(trainer.generate_s) == len(timer.step_s) == args.steps, (
      len(trainer.generate_s), len(timer.step_s))
  result = {
      "step_s": timer.step_s,
      "sample_s": trainer.generate_s,
      "mean_length": [r["completions/mean_length"] for r in timer.logs],
      "reward": [r.get("reward") for r in timer.logs],
      "kl": [r.get("kl") for r in timer.logs],
      "torch_threads": torch.get_num_threads(),
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
