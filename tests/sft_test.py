"""SFT (config.mode = "sft") on the tiny model: the loss against a float64 NumPy computation,
memorising a few rows, exact resume, the next stage (GRPO) from an SFT workdir, start-up errors.

The runs share train_test's persistent compilation cache fixture (autouse, per module).
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import config as config_lib, metrics_io, models, sft, sft_train, train
from grpo_jax.data import templates
from grpo_jax.generate import generate
from tests.train_test import compile_cache  # noqa: F401  (the fixture, autouse here too)
from tests.train_test import (REPO, assert_params_equal, initial_params, model_params,
                              saved_params, subprocess_env, tiny_config, training_records)

TINY_SFT = os.path.join(REPO, "configs", "tiny_sft.py")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
ROWS = [{"prompt": f"Spell {w} backwards.", "completion": f"<answer>{w[::-1]}</answer>"}
        for w in WORDS]
STEPS, LR = 60, 1e-2
# No evaluation of the task; the held-out loss on 10 rows (8 + 2: a last batch with fillers).
RUN = {"train.steps": STEPS, "train.prompts_per_step": 8, "opt.learning_rate": LR,
       "opt.schedule": "constant", "opt.warmup_steps": 0, "eval.num_problems": 0,
       "train.checkpoint_every": 100}


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def sft_config(path, overrides=None, eval_path=""):
  cfg = config_lib.from_file(TINY_SFT, str(path))
  cfg.sft.eval_path = eval_path
  for key, value in (overrides or {}).items():
    section, leaf = key.split(".")
    cfg[section][leaf] = value
  return cfg


def np_sft_loss(model, tokenizer, rows, template="plain", width=64):
  """-mean log p(completion tokens incl. EOS | prompt) over all rows' completion tokens, from the
  model's own full-sequence forward of each row's prompt + completion (fp32 logits, float64
  after). The rows go in one call, each followed by padding up to `width`: later tokens never
  change a causal model's logits at earlier positions."""
  pairs = []
  for row in rows:
    prompt, completion = sft.row_texts(row, template, tokenizer)
    pairs.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                  tokenizer(completion, add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id]))
  tokens = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
  for i, (p, c) in enumerate(pairs):
    tokens[i, :len(p) + len(c)] = p + c
  logits = np.asarray(models.jit_forward(model)(jnp.asarray(tokens)), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - (np.log(np.sum(np.exp(logits - top), -1, keepdims=True)) + top)
  picked = [logp[i, len(p) + j - 1, t] for i, (p, c) in enumerate(pairs) for j, t in enumerate(c)]
  return -np.sum(picked) / len(picked)


# -- the loss ----------------------------------------------------------------------------
def test_loss_equals_numpy_float64_with_and_without_grad_accumulation():
  model, tokenizer = models.load("tiny-random")
  rows = [{"prompt": "What is 3 + 4?", "completion": "<think>3 + 4 = 7</think><answer>7</answer>"},
          {"prompt": "Hi", "completion": "Hello there, how are you today?"},
          {"prompt": "A much longer prompt than the others, to pad the rest.", "completion": "ok"},
          {"prompt": "What is 9 - 2?", "completion": "7"}]
  encoded = [sft.encode(r, tokenizer, template="plain", stop_id=tokenizer.eos_token_id,
                        max_length=128) for r in rows]
  batch = jax.tree.map(jnp.asarray, sft.pad_batch(encoded, tokenizer.pad_token_id, 128))
  assert batch.prompts.shape == (4, 64) and batch.completions.shape == (4, 32)
  graphdef, params = nnx.split(model)
  want = np_sft_loss(model, tokenizer, rows)  # 4.6923
  got = jax.jit(lambda p, b: sft.loss_and_metrics(p, graphdef, b)[0])(params, batch)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # The loss the update reports with 2 micro-batches of 47 and 5 tokens: each weighs by its
  # share of the tokens (the mean of the two micro-batches' means would be 4.6113).
  # The update is the whole batch's, too (SGD with lr 1: new params = params - grads).
  sgd = optax.sgd(1.0)
  whole, _, _ = sft.make_update_step(graphdef, sgd)(
      jax.tree.map(jnp.copy, params), sgd.init(params), batch)
  split, _, metrics = sft.make_update_step(graphdef, sgd, grad_accum_steps=2)(
      jax.tree.map(jnp.copy, params), sgd.init(params), batch)
  np.testing.assert_allclose(metrics["loss"], want, rtol=2e-6)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), whole, params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the step changed the params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), split, whole)


def test_encode_appends_the_end_of_turn_token_and_cuts_long_rows():
  _, tokenizer = models.load("tiny-random")
  eos = tokenizer.eos_token_id
  p, c, cut = sft.encode({"prompt": "ab", "completion": "cd"}, tokenizer, template="plain",
                         stop_id=eos, max_length=10)
  assert (tokenizer.decode(p), tokenizer.decode(c[:-1]), c[-1], cut) == ("ab", "cd", eos, False)
  p, c, cut = sft.encode({"prompt": "ab", "completion": "cdefghijk"}, tokenizer,
                         template="plain", stop_id=eos, max_length=6)
  assert (tokenizer.decode(p), tokenizer.decode(c), cut) == ("ab", "cdef", True)  # no EOS
  # A "messages" row: the turns before the last under the chat template; the last is learned.
  row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  p, c, _ = sft.encode(row, tokenizer, template="chat", stop_id=eos, max_length=64)
  assert tokenizer.decode(p) == "<|user|>hi<|assistant|>" and tokenizer.decode(c) == "yo<eos>"
  # A chat template that ends a turn with <|im_end|> (a stop token of the sampler): that one.
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
  tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                             "{% endif %}")
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert templates.end_of_turn_id(tokenizer, "chat") == im_end != eos
  assert templates.end_of_turn_id(tokenizer, "plain") == eos


# -- training runs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  extra = [{"prompt": "Spell ox backwards.", "completion": "<answer>xo</answer>"},
           {"prompt": "Spell bee backwards.", "completion": "<answer>eeb</answer>"}]
  return write_jsonl(folder / "train.jsonl", ROWS), write_jsonl(folder / "eval.jsonl", ROWS + extra)


@pytest.fixture(scope="module")
def memorised(data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  records = sft_train.train_sft(sft_config(data[0], RUN, eval_path=data[1]), workdir)
  return workdir, records


def test_sft_memorises_the_rows_and_generates_them(memorised, data):
  workdir, records = memorised
  assert metrics_io.read_metrics(workdir) == records
  assert [r["step"] for r in records] == list(range(STEPS + 1))
  losses_ = [r["loss"] for r in records[1:]]
  assert losses_[-1] < 0.1 * losses_[0], losses_  # measured: 4.65 -> 0.011
  for key in ("loss", "perplexity", "entropy", "grad_norm", "learning_rate", "tokens", "epoch",
              "completions/mean_length", "completions/clipped_ratio", "time/step_s"):
    assert math.isfinite(records[1][key]), key
  # Completion tokens: <answer>, a character each, </answer>, EOS.
  assert records[1]["tokens"] == sum(len(w) + 3 for w in WORDS)
  assert records[1]["learning_rate"] == LR and records[-1]["epoch"] == STEPS
  # The held-out loss (10 rows, the last batch filled): the NumPy loss of the initial model.
  model, tokenizer = models.load("tiny-random")
  with open(data[1]) as f:
    eval_rows = [json.loads(line) for line in f]
  np.testing.assert_allclose(records[0]["eval/loss"], np_sft_loss(model, tokenizer, eval_rows),
                             rtol=1e-5)
  assert records[-1]["eval/loss"] < 0.3 * records[0]["eval/loss"]
  # The workdir is a model: greedy generation writes the trained completions.
  model, tokenizer = models.load(workdir)
  for row in ROWS:
    assert generate(model, tokenizer, row["prompt"], max_new_tokens=24) == row["completion"]


def test_restart_resumes_exactly(memorised, data, tmp_path):
  first = sft_train.train_sft(sft_config(data[0], dict(RUN, **{"train.steps": STEPS // 2}),
                                   eval_path=data[1]), str(tmp_path))
  sft_train.train_sft(sft_config(data[0], RUN, eval_path=data[1]), str(tmp_path))
  records = metrics_io.read_metrics(str(tmp_path))
  assert records[:STEPS // 2 + 1] == first
  # The first run's last step also has an evaluation: compare the training metrics.
  strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("eval/")}  # noqa: E731
                        for r in training_records(recs)]
  assert strip(records) == strip(memorised[1])
  assert_params_equal(saved_params(str(tmp_path)), saved_params(memorised[0]))


def test_grpo_starts_from_an_sft_workdir(memorised, tmp_path):
  sft_params = saved_params(memorised[0])
  cfg = tiny_config({"model.name": memorised[0], "train.steps": 1, "eval.num_problems": 0})
  records = train.train_and_evaluate(cfg, str(tmp_path))
  assert [r["step"] for r in records] == [1] and math.isfinite(records[0]["loss"])
  after = model_params(models.load(str(tmp_path))[0])
  start = initial_params()
  for name, value in after.items():
    # One Adam step (lr 3e-3) from the SFT params, which are far from the random start.
    assert np.abs(value - sft_params[name]).max() <= 1.5 * 3e-3, name
  assert max(np.abs(after[k] - start[k]).max() for k in after) > 0.05


def test_epochs_set_the_number_of_steps(data, tmp_path):
  records = sft_train.train_sft(sft_config(data[0], dict(RUN, **{"sft.epochs": 2.5})), str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]  # ceil(2.5 * 8 rows / 8 a step)
  assert records[-1]["epoch"] == 3


# -- start-up errors ---------------------------------------------------------------------
def test_validate_accepts_sft_and_rejects_bad_sft_keys(data, tmp_path):
  config_lib.validate(sft_config(data[0]))
  config_lib.validate(tiny_config({}))  # mode "grpo" as before
  with pytest.raises(config_lib.ConfigError, match="config.sft.path='/no/such.jsonl': no such"):
    config_lib.validate(sft_config("/no/such.jsonl"))
  with pytest.raises(config_lib.ConfigError, match="needs config.sft.path"):
    config_lib.validate(sft_config(data[0], {"sft.path": ""}))
  with pytest.raises(config_lib.ConfigError, match="config.sft.eval_path='nope.jsonl': no such"):
    config_lib.validate(sft_config(data[0], eval_path="nope.jsonl"))
  cfg = sft_config(data[0])
  cfg.mode = "dpo"
  with pytest.raises(config_lib.ConfigError, match=r"config.mode='dpo'; expected one of \['grpo', "
                                                   r"'sft'\]"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("lines, message", [
    ([ROWS[0], {"prompt": "no completion"}],
     r':2: an SFT row needs the string fields "prompt" and "completion" \(or "messages"\); it '
     r"has \['prompt'\]"),
    ([ROWS[0], "not json"], r":2: not a JSON object"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r':1: "messages" must be .* ending '
                                                         r"with the assistant's turn"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     r'"messages" rows need config.task.template="chat"'),
])
def test_bad_rows_stop_the_run_before_the_model_loads(lines, message, tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines))
  with pytest.raises(config_lib.ConfigError, match=message):
    sft_train.train_sft(sft_config(path), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_cli_reports_a_row_without_completion(tmp_path, compile_cache):  # noqa: F811
  path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "hi", "answer": "x"}])
  proc = subprocess.run([sys.executable, "-m", "grpo_jax.main", f"--config={TINY_SFT}:{path}",
                         f"--workdir={tmp_path / 'run'}"], env=subprocess_env(compile_cache),
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert f'{path}:1: an SFT row needs the string fields "prompt" and "completion"' in proc.stderr
  assert "loading model" not in proc.stderr and not os.path.exists(tmp_path / "run")


def test_remat_gives_the_same_update():
  """config.model.remat reaches the SFT update and changes no number of it (SGD with lr 1:
  new params = params - grads, so equal updates mean equal gradients)."""
  cfg = models.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)
  graphdef, params = nnx.split(models.init_model(cfg, seed=0))
  rng = np.random.default_rng(0)
  cmask = (np.arange(9)[None] < np.array([[9], [4], [6]])).astype(np.int32)
  batch = sft.Batch(jnp.asarray(rng.integers(1, 40, (3, 5)), jnp.int32),
                    jnp.ones((3, 5), jnp.int32),
                    jnp.asarray(rng.integers(1, 40, (3, 9)) * cmask, jnp.int32), jnp.asarray(cmask))
  sgd = optax.sgd(1.0)
  steps = {remat: sft.make_update_step(graphdef, sgd, remat=remat)
           for remat in ("none", "full", "dots_saveable")}
  traced = {k: str(jax.make_jaxpr(step)(params, sgd.init(params), batch))
            for k, step in steps.items()}
  assert "remat" not in traced["none"] and "remat" in traced["full"]  # the setting got there
  out = {k: step(jax.tree.map(jnp.copy, params), sgd.init(params), batch)
         for k, step in steps.items()}
  new, _, metrics = out["none"]
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new,
                                          params))) > 1e-3
  for remat in ("full", "dots_saveable"):
    np.testing.assert_allclose(out[remat][2]["loss"], metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 out[remat][0], new)
