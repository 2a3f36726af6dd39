"""Sample a completion from a model; prints only the completion text.

    python -m grpo_jax.generate --model=smollm2-135m-instruct --prompt="What is 7*6?"
    python -m grpo_jax.generate --model=path/to/hf_folder --prompt="def f(x):" --nochat \\
        --temperature=0.7
    python -m grpo_jax.generate --model=runs/smollm2 --prompt="What is 7*6?"  # a trained run

--model: a known name, a Hugging Face checkpoint folder, a .gguf file, or a
training workdir (its latest checkpoint). The prompt goes through the model's
chat template when its tokenizer has one (--nochat: raw text; --chat insists).
A workdir's prompt is instead formatted as its run formatted prompts, with
config.json's task.template (chat: the chat template with the training system
message; r1_zero: the R1-Zero template; plain: the raw text); --chat and
--nochat still win.
Greedy by default (--temperature=0), up to 128 new tokens. stdout carries the
completion alone; progress, warnings and library logs go to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from absl import app, flags

from grpo_jax import cli

_PROMPT = flags.DEFINE_string("prompt", None, "the prompt text (required)")
_CHAT = flags.DEFINE_bool("chat", None, "wrap the prompt in the model's chat template (default: "
                          "a workdir's task.template, else when the tokenizer has one; --nochat "
                          "for raw text)")
for _name in ("model", "temperature", "top_k", "top_p", "max_new_tokens", "stop_strings", "seed",
              "dtype"):
  flags.declare_key_flag(_name)

# generate's own defaults for shared flags: a quick greedy look at a model.
DEFAULTS = {"model": "smollm2-135m-instruct", "temperature": 0.0, "max_new_tokens": 128}


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def run_template(workdir: str) -> str | None:
  """The prompt template (data.TEMPLATES) a training workdir's run used, or None."""
  from grpo_jax.data import TEMPLATES
  from grpo_jax.evaluate import run_config

  template = (run_config(workdir).get("task") or {}).get("template")
  return template if template in TEMPLATES else None


def generate(model, tokenizer, prompt: str, *, chat=False, template=None, max_new_tokens=128,
             temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_strings=()) -> str:
  """The completion of `prompt`: under the bare chat template (`chat`), or, given `template` (a
  data.TEMPLATES name), formatted and tokenised exactly as training formats its prompts; cut
  before the first of `stop_strings` (which also end it: `templates.stop_ids`)."""
  import jax
  from flax import nnx

  from grpo_jax import sampling
  from grpo_jax.data import batching, format_prompt, templates

  if template is not None:
    ids = tokenizer(format_prompt({"prompt": prompt}, template, tokenizer),
                    add_special_tokens=False)["input_ids"]
  elif chat:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
  else:
    ids = tokenizer(prompt)["input_ids"]
  tokens, mask = batching.left_pad([ids], tokenizer.pad_token_id)
  graphdef, params = nnx.split(model)
  out = sampling.sample_jit(graphdef, params, tokens, mask, jax.random.key(seed),
                            num_generations=1, max_new_tokens=max_new_tokens,
                            stop_ids=templates.stop_ids(tokenizer, stop_strings),
                            pad_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k,
                            top_p=top_p)
  n = int(out.lengths[0])
  return templates.decode_completion(tokenizer, list(map(int, out.tokens[0, :n])), stop_strings)


def main(argv):
  cli.no_arguments(argv)
  cli.require(_PROMPT)
  cli.check_sampling()
  stop_strings = cli.parse_stop_strings(cli.STOP_STRINGS.value)
  for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Libraries print while loading and compiling; only the completion may reach stdout.
  with contextlib.redirect_stdout(sys.stderr):
    from grpo_jax import models

    print(f"[generate] loading {cli.MODEL.value}")
    model, tokenizer = models.load(cli.MODEL.value, dtype=cli.DTYPE.value)
    chat = has_chat_template(tokenizer) if _CHAT.value is None else _CHAT.value
    if chat and not has_chat_template(tokenizer):
      raise app.UsageError(f"--chat: {cli.MODEL.value}'s tokenizer has no chat template")
    template = None
    if _CHAT.value is None and cli.model_kind(cli.MODEL.value) == "workdir":
      # The trained model knows its run's prompts: the same template, system message included.
      template = run_template(cli.MODEL.value)
      if template:
        print(f"[generate] template {template} (the run's config.json task.template)")
    text = generate(model, tokenizer, _PROMPT.value, chat=chat, template=template,
                    max_new_tokens=cli.MAX_NEW_TOKENS.value, temperature=cli.TEMPERATURE.value,
                    top_k=cli.TOP_K.value, top_p=cli.TOP_P.value, seed=cli.SEED.value,
                    stop_strings=stop_strings)
  print(text, flush=True)


if __name__ == "__main__":
  cli.run(main, DEFAULTS)
