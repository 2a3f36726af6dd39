"""Sample a completion from a model; prints only the completion text.

    python -m grpo_jax.generate --model=smollm2-135m-instruct --prompt="What is 7*6?" --chat
    python -m grpo_jax.generate --model=path/to/hf_folder --prompt="def f(x):" --temperature=0.7
    python -m grpo_jax.generate --model=runs/smollm2 --prompt="What is 7*6?" --chat  # a trained run

--model: a known name, a Hugging Face checkpoint folder, a .gguf file, or a
training workdir (its latest checkpoint).
Greedy with --temperature=0. Progress and warnings go to stderr.
"""

from __future__ import annotations

import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                            "known name, Hugging Face folder, .gguf path, or training workdir")
_PROMPT = flags.DEFINE_string("prompt", None, "the prompt text", required=True)
_CHAT = flags.DEFINE_bool("chat", False, "wrap the prompt in the model's chat template")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "completion length limit")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_DTYPE = flags.DEFINE_string("dtype", None, "matmul operand dtype: float32 or bfloat16 "
                             "(default: a workdir's config.model.dtype, else float32)")


def generate(model, tokenizer, prompt: str, *, chat=False, max_new_tokens=128, temperature=0.0,
             top_k=0, top_p=1.0, seed=0) -> str:
  import jax
  from flax import nnx

  from grpo_jax import sampling
  from grpo_jax.data import batching, templates

  if chat:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
  else:
    ids = tokenizer(prompt)["input_ids"]
  tokens, mask = batching.left_pad([ids], tokenizer.pad_token_id)
  graphdef, params = nnx.split(model)
  out = sampling.sample_jit(graphdef, params, tokens, mask, jax.random.key(seed),
                            num_generations=1, max_new_tokens=max_new_tokens,
                            stop_ids=templates.stop_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                            temperature=temperature, top_k=top_k, top_p=top_p)
  n = int(out.lengths[0])
  return tokenizer.decode(list(map(int, out.tokens[0, :n])), skip_special_tokens=True)


def main(argv):
  del argv
  from grpo_jax import models

  print(f"[generate] loading {_MODEL.value}", file=sys.stderr)
  model, tokenizer = models.load(_MODEL.value, dtype=_DTYPE.value)
  print(generate(model, tokenizer, _PROMPT.value, chat=_CHAT.value, max_new_tokens=_MAX_NEW.value,
                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                 seed=_SEED.value))


if __name__ == "__main__":
  app.run(main)
