"""generate on a training workdir: the run's prompt template by default, --chat/--nochat win."""

import pytest

from grpo_jax import cli, generate, models
from grpo_jax.data import format_prompt
from tests.conftest import write_tiny_workdir

PROMPT = "What is 2 + 3?"


def run_generate(capsys, *flags):
  cli.parse([*flags, f"--prompt={PROMPT}", "--max_new_tokens=6"], generate.DEFAULTS)
  generate.main(["generate"])
  captured = capsys.readouterr()
  return captured.out[:-1], captured.err  # the completion, without print's newline


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
  """{template or chat flag: the greedy completion} of one workdir's model, computed in-process."""
  workdir = write_tiny_workdir(tmp_path_factory.mktemp("run"), template="r1_zero")
  model, tokenizer = models.load(workdir)
  texts = {name: generate.generate(model, tokenizer, PROMPT, template=name, max_new_tokens=6)
           for name in ("r1_zero", "plain", "chat")}
  texts.update({flag: generate.generate(model, tokenizer, PROMPT, chat=chat, max_new_tokens=6)
                for flag, chat in (("--chat", True), ("--nochat", False))})
  # Distinct completions, so each check below tells the prompts apart; "plain" is the raw text,
  # as --nochat is (the tiny tokenizer adds no BOS).
  assert texts["plain"] == texts["--nochat"]
  assert len({texts[k] for k in ("r1_zero", "plain", "chat", "--chat")}) == 4, texts
  return workdir, texts


def test_template_formats_and_tokenises_as_training_does():
  model, tokenizer = models.load("tiny-random")
  seen = []
  real = tokenizer.__class__.__call__

  def spy(self, text, *args, **kwargs):
    seen.append((text, kwargs.get("add_special_tokens", True)))
    return real(self, text, *args, **kwargs)

  tokenizer.__class__.__call__ = spy
  try:
    generate.generate(model, tokenizer, PROMPT, template="r1_zero", max_new_tokens=1)
  finally:
    tokenizer.__class__.__call__ = real
  assert (format_prompt({"prompt": PROMPT}, "r1_zero"), False) in seen


@pytest.mark.parametrize("template", ["r1_zero", "plain", "chat"])
def test_workdir_defaults_to_its_runs_template(template, expected, capsys, tmp_path):
  workdir, texts = expected
  if template != "r1_zero":  # the same params, another run config
    import shutil

    shutil.copytree(workdir, tmp_path / "run")
    workdir = str(tmp_path / "run")
    config = (tmp_path / "run" / "config.json")
    config.write_text(config.read_text().replace('"r1_zero"', f'"{template}"'))
  out, err = run_generate(capsys, f"--model={workdir}")
  assert out == texts[template]
  assert f"template {template} (the run's config.json task.template)" in err


@pytest.mark.parametrize("flag", ["--chat", "--nochat"])
def test_chat_flags_win_over_the_runs_template(flag, expected, capsys):
  workdir, texts = expected
  out, err = run_generate(capsys, f"--model={workdir}", flag)
  assert out == texts[flag]
  assert "task.template" not in err


def test_a_workdir_without_a_known_template_falls_back_to_chat(expected, capsys, tmp_path):
  import shutil

  workdir, texts = expected
  shutil.copytree(workdir, tmp_path / "run")
  config = tmp_path / "run" / "config.json"
  config.write_text(config.read_text().replace('"r1_zero"', '"unknown"'))
  out, _ = run_generate(capsys, f"--model={tmp_path / 'run'}")
  assert out == texts["--chat"]  # the tokenizer has a chat template: the plain default
