"""The entry points' shared flags (grpo_jax.cli), `python -m grpo_jax`, and generate's stdout."""

import ast
import importlib.util
import os
import subprocess
import sys

import pytest
from absl import app

from grpo_jax import cli, evaluate, generate, rejection  # all at once: no flag defined twice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")


def python_m(*args):
  return subprocess.run([sys.executable, "-m", *args], env=ENV, cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("name", cli.ENTRY_POINTS)
def test_every_entry_point_exists_and_has_a_main(name):
  spec = importlib.util.find_spec(f"grpo_jax.{name}")
  assert spec is not None, name
  # Read, not imported: grpo_jax.main marks its own flags required, for every parse after it.
  with open(spec.origin) as f:
    tree = ast.parse(f.read())
  assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
  assert cli.summary(name) and "\n" not in cli.summary(name)


def test_python_m_grpo_jax_lists_every_entry_point():
  proc = python_m("grpo_jax")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in cli.ENTRY_POINTS:
    assert f"python -m grpo_jax.{name}\n" in proc.stdout
    assert cli.summary(name) in proc.stdout


def test_defaults_are_per_entry_point_and_do_not_leak():
  cli.parse([], generate.DEFAULTS)
  assert cli.TEMPERATURE.value == 0.0 and cli.MAX_NEW_TOKENS.value == 128
  assert cli.MODEL.value == "smollm2-135m-instruct"
  cli.parse(["--num_samples=3"], rejection.DEFAULTS)
  assert cli.NUM_SAMPLES.value == 3 and cli.TEMPLATE.value == "chat"
  cli.parse([])  # evaluate's: the shared defaults
  assert (cli.TEMPERATURE.value, cli.MAX_NEW_TOKENS.value, cli.NUM_SAMPLES.value) == (1.0, 256, 4)
  assert cli.MODEL.value is None and cli.TEMPLATE.value is None
  with pytest.raises(ValueError, match="not shared flags"):
    cli.set_defaults({"prompt": "hi"})


@pytest.mark.parametrize("text,message", [("[1]", "must be a JSON object"),
                                          ("{", "not valid JSON")])
def test_task_kwargs_errors_are_one_usage_line(text, message):
  with pytest.raises(app.UsageError, match=message) as info:
    cli.parse_task_kwargs(text)
  assert "\n" not in str(info.value)
  assert cli.parse_task_kwargs('{"max_digits": 1}') == {"max_digits": 1}


@pytest.mark.slow  # ~40 s: a full CLI or multi-step run (the slow job)
def test_generate_prints_only_the_completion():
  """stdout is the completion alone, under the chat template by default (the tiny tokenizer has
  one) and on the raw text with --nochat; loading messages go to stderr."""
  from grpo_jax import models

  model, tokenizer = models.load("tiny-random")
  expected = {chat: generate.generate(model, tokenizer, "What is 2 + 3?", chat=chat,
                                      max_new_tokens=6) for chat in (True, False)}
  for flag, chat in (("--chat", True), ("--nochat", False), (None, True)):
    proc = python_m("grpo_jax.generate", "--model=tiny-random", "--prompt=What is 2 + 3?",
                    "--max_new_tokens=6", *([flag] if flag else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected[chat] + "\n", (flag, proc.stdout)
    assert "[generate] loading tiny-random" in proc.stderr


def test_generate_needs_a_prompt():
  proc = python_m("grpo_jax.generate", "--model=tiny-random")
  assert proc.returncode != 0 and "--prompt is required" in proc.stderr
