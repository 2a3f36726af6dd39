"""Real scale: Qwen2.5-1.5B-Instruct on GSM8K, for a GPU or a TPU slice.

    python -m grpo_jax.main --config=configs/qwen25_gsm8k.py:/ckpt/Qwen2.5-1.5B-Instruct \\
        --config.task.kwargs.path=/data/gsm8k_train.jsonl \\
        --config.task.kwargs.eval_path=/data/gsm8k_test.jsonl --workdir=runs/qwen25_gsm8k
    python -m grpo_jax.aot --config=configs/qwen25_gsm8k.py --topology=v5e:2x4   # memory, cost

Without the argument the model is the shape preset "qwen2.5-1.5b": enough for
`grpo_jax.aot` (shapes only), while training needs the checkpoint folder.

The argument after ":" is the Hugging Face checkpoint folder (config.json +
safetensors; nothing is downloaded). GSM8K as JSON lines with "question" and
"answer" (the answer ending in "#### N", as the dataset ships it); export it
once, e.g. with `datasets`: ds.to_json(path). The mesh puts every device on
the FSDP axis; on a multi-host TPU pod run the same command on every host
(see grpo_jax/main.py). The settings follow DeepSeekMath / TRL defaults:
64 prompts x 8 completions, beta 0.04, lr 1e-6, completions up to 512 tokens.
Expected: GSM8K pass@1 rising from ~0.6 to ~0.7 over a few hundred steps
(not measured here: the development machines have no accelerator).
"""

from grpo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.defaults()
  c.model.name = arg or "qwen2.5-1.5b"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"  # without it the update needs 214 GiB a chip on v5e:2x4 (README)
  c.task.name = "jsonl"
  c.task.template = "chat"
  c.task.kwargs.path = ""  # --config.task.kwargs.path=/data/gsm8k_train.jsonl
  c.task.kwargs.eval_path = ""
  c.task.kwargs.prompt_key = "question"
  c.task.kwargs.answer_key = "answer"
  c.rewards = [("accuracy", 1.0), ("format", 0.5)]
  c.rl.num_generations = 8
  c.rl.beta = 0.04
  c.rl.max_prompt_length = 256
  c.rl.max_completion_length = 512
  c.rl.temperature = 1.0
  c.opt.learning_rate = 1e-6
  c.opt.warmup_steps = 10
  c.opt.schedule = "cosine"
  c.train.steps = 500
  c.train.prompts_per_step = 64
  c.train.grad_accum_steps = 8
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.eval.num_problems = 500
  c.eval.num_samples = 4
  c.eval.temperature = 1.0
  c.eval.prompts_per_batch = 64
  return c
