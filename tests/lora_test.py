"""LoRA (config.model.lora, grpo_jax/lora.py): adapters start as the base and merge exactly,
only they train and hold optimizer state, the reference is the base with adapters off, SFT,
checkpoints of adapters only, exact resume, export to a folder transformers loads."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import (checkpointing, compiled, config as config_lib, grpo, lora, memory,
                      metrics_io, models, optim, sft, sharding, train)
from grpo_jax.models import transformer
from tests.grpo_test import G, make_batch
from tests.train_test import tiny_config

CFG = transformer.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False)


def lora_cfg(rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS):
  return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, dropout=0.0, targets=targets,
                                        quantize_base="none"))


def adapted(seed=0, b_scale=0.0, **kw):
  """(graphdef, params) of a small model with adapters; B drawn at `b_scale` (0: as attached)."""
  model = lora.attach(models.init_model(CFG, seed=seed), lora_cfg(**kw), seed=seed + 1)
  graphdef, params = nnx.split(model)
  if b_scale:
    trainable, frozen = lora.split(params)
    keys = iter(jax.random.split(jax.random.key(seed + 2), 64))
    trainable = {k: (v.replace(b_scale * jax.random.normal(next(keys), v.shape))
                     if k.endswith("_lora_b") else v) for k, v in trainable.items()}
    params = lora.join(trainable, frozen)
  return graphdef, params


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def logits(graphdef, params, tokens):
  return np.asarray(_logits(graphdef, params, tokens))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 9)), jnp.int32)


def test_adapters_start_as_the_base_and_merge_into_the_same_function():
  base = logits(*nnx.split(models.init_model(CFG, seed=0)), TOKENS)
  graphdef, params = adapted(seed=0)
  np.testing.assert_array_equal(logits(graphdef, params, TOKENS), base)
  graphdef, params = adapted(seed=0, b_scale=0.5)
  unmerged = logits(graphdef, params, TOKENS)
  assert np.abs(unmerged - base).max() > 1e-2  # the adapters do something
  merged_graphdef, merged = jax.jit(lora.merged, static_argnums=0)(graphdef, params)
  assert not lora.has_adapters(merged)
  np.testing.assert_allclose(logits(merged_graphdef, merged, TOKENS), unmerged, atol=2e-5)


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, "(q|v)_proj"])
def test_adapter_gradients_are_the_chain_rule_of_the_full_gradient(targets):
  """With B = 0, dL/dB = scale A^T dL/dW and dL/dA = 0: the unmerged adapters (and the plain
  MLP expression they use) differentiate like the full model's weights (swiglu's backward)."""
  graphdef, params = adapted(seed=1, targets=targets)
  batch, cfg = make_batch(seed=2), grpo.loss_config(G, beta=0.0)
  grads_fn = jax.jit(grpo.grads_and_metrics, static_argnums=(2, 4))
  grads, _ = grads_fn(params, None, graphdef, batch, cfg)
  _, base = lora.split(params)
  base_graphdef, _ = lora.base_of(graphdef, params)
  full, _ = grads_fn(base, None, base_graphdef, batch, cfg)
  names = lora.targets(targets)
  assert sorted(grads) == sorted(f"{n}{e}" for n in names for e in transformer.LORA_ENDS)
  scale = 8.0 / 4
  for name in names:
    a = np.asarray(params.raw_mapping["lora"][f"{name}_lora_a"][...])
    want = scale * np.einsum("lir,lio->lro", a, np.asarray(full[name][...]))
    np.testing.assert_allclose(np.asarray(grads[f"{name}_lora_b"][...]), want, rtol=2e-4,
                               atol=1e-7, err_msg=name)
    assert float(jnp.abs(grads[f"{name}_lora_a"][...]).max()) == 0.0


def test_update_trains_only_the_adapters_and_holds_their_optimizer_state_alone():
  graphdef, params = adapted(seed=3, rank=1, alpha=2.0)
  optimizer, _ = optim.make_optimizer(1e-2, total_steps=10)
  opt_state = optimizer.init(lora.trainable(params))
  adapters, model = lora.count(lora.trainable(params)), lora.count(params)
  # AdamW's two moments of the adapters and two step counts: nothing of the base's size.
  assert lora.count(opt_state) == 2 * adapters + 2
  assert adapters < model / 10
  before = jax.tree.map(np.array, params)
  step = grpo.make_update_step(graphdef, optimizer, grpo.loss_config(G, beta=0.04))
  new, opt_state, metrics = step(params, opt_state, None, make_batch(seed=4))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  assert lora.count(opt_state) == 2 * adapters + 2
  new_adapters, new_base = lora.split(new)
  old_adapters, old_base = lora.split(before)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_base), old_base)
  # B moves (A's gradient is B^T-weighted: 0 at the first step, B = 0).
  for name, old in old_adapters.items():
    moved = bool(np.abs(np.asarray(new_adapters[name][...]) - old[...]).max() > 0)
    assert moved == name.endswith("_lora_b"), name


def test_reference_is_the_loaded_base_model_with_adapters_off():
  """beta != 0 with LoRA: no reference params; the loss's reference log-probs are the base
  model's as loaded, whatever the adapters have learned."""
  graphdef, params = adapted(seed=0, b_scale=0.5)
  base_graphdef, base = nnx.split(models.init_model(CFG, seed=0))
  batch = make_batch(seed=5)
  args = (batch.prompts, batch.prompt_mask, batch.completions, batch.completion_mask)

  @jax.jit
  def logps(params, base):
    lp = lambda model: grpo.completion_logps(model, *args, num_generations=G)[0]  # noqa: E731
    return (lp(grpo.reference_model(graphdef, params, None)), lp(nnx.merge(base_graphdef, base)),
            lp(nnx.merge(graphdef, params)))

  ref, loaded, policy = logps(params, base)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(loaded))
  assert np.abs(np.asarray(policy) - np.asarray(ref)).max() > 1e-2
  # and the loss reads it: the KL of the adapted policy to it is positive, 0 with B = 0
  kl = jax.jit(lambda p: grpo.loss_and_metrics(p, None, graphdef, batch,
                                               grpo.loss_config(G, beta=0.04))[1]["kl"])
  assert float(kl(params)) > 1e-4
  assert float(kl(adapted(seed=0)[1])) == 0.0


def test_one_sft_step_changes_only_the_adapters():
  graphdef, params = adapted(seed=6)
  rng = np.random.default_rng(0)
  cmask = (np.arange(9)[None] < np.array([[9], [4], [6]])).astype(np.int32)
  batch = sft.Batch(jnp.asarray(rng.integers(1, 50, (3, 5)), jnp.int32),
                    jnp.ones((3, 5), jnp.int32),
                    jnp.asarray(rng.integers(1, 50, (3, 9)) * cmask, jnp.int32), jnp.asarray(cmask))
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(lora.trainable(params))
  before = jax.tree.map(np.array, params)
  new, _, metrics = sft.make_update_step(graphdef, optimizer)(params, opt_state, batch)
  assert np.isfinite(float(metrics["loss"]))
  new_adapters, new_base = lora.split(new)
  old_adapters, old_base = lora.split(before)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_base), old_base)
  for name, old in old_adapters.items():  # B moves; A's gradient is 0 while B = 0
    moved = bool(np.abs(np.asarray(new_adapters[name][...]) - old[...]).max() > 0)
    assert moved == name.endswith("_lora_b"), name


# -- config ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"model.lora.rank": -1}, r"lora.rank=-1 must be an integer >= 0"),
    ({"model.lora.rank": 4, "model.lora.alpha": 0.0}, r"lora.alpha=0.0 must be > 0"),
    ({"model.lora.rank": 4, "model.lora.targets": "(q_proj"}, r"lora.targets='\(q_proj' is not "
     "a regex"),
    ({"model.lora.rank": 4, "model.lora.targets": "embed|lm_head"}, r"matches none of the "
     "projections"),
    ({"model.lora.rank": 4, "model.lora.quantize_base": "nf4"}, r"quantize_base='nf4': QLoRA"),
    ({"model.lora.rank": 4, "model.lora.quantize_base": "fp8"}, r"expected one of \['none'\]"),
    ({"model.lora.rank": 4, "model.lora.dropout": 0.05}, r"lora.dropout=0.05: only 0"),
    ({"model.lora.rank": 4, "rl.advantage_estimator": "gae"}, r"PPO"),
])
def test_bad_lora_configs_are_rejected_at_start_up(overrides, message):
  cfg = tiny_config(overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg)


def test_compiled_update_holds_optimizer_state_of_the_adapters_only():
  """The programs a run compiles (memory check, python -m grpo_jax.aot): with LoRA the update's
  optimizer state is the adapters', no reference params are passed, and the sampler decodes
  the base's shapes (the merged rollout copy)."""
  cfg = tiny_config({"model.lora.rank": 4, "rl.beta": 0.04})
  model_cfg = models.load("tiny-random")[0].cfg
  progs = compiled.programs(cfg, model_cfg, sharding.make_mesh(1, 1, 1))
  params, opt_state, ref, _ = progs["update"][1]
  adapters = lora.count(lora.trainable(params))
  assert lora.count(opt_state) == 2 * adapters + 2 and ref is None
  assert adapters < lora.count(params) / 10
  rollout = progs["sample"][1][0]
  assert not lora.has_adapters(rollout) and lora.count(rollout) == lora.count(params) - adapters
  # While the sampler runs, the training params (base + adapters) and the adapters' optimizer
  # state stay on the device beside the merged copy.
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa
  assert compiled.held_while_sampling(cfg, progs) == nbytes(params) + nbytes(opt_state)


def test_memory_estimate_counts_gradients_and_optimizer_state_of_the_adapters():
  cfg = tiny_config({"model.lora.rank": 4, "rl.beta": 0.04})
  model_cfg, mesh = models.load("tiny-random")[0].cfg, sharding.make_mesh(1, 1, 1)
  full = memory.estimate(cfg, model_cfg, mesh, param_bytes=1000)
  adapted_ = memory.estimate(cfg, model_cfg, mesh, param_bytes=1000, trainable_bytes=10)
  assert full.persistent == {"params": 1000, "optimizer state": 2000, "reference params": 1000}
  assert adapted_.persistent == {"params": 1000, "optimizer state": 20}  # no reference copy
  assert (full.update["gradients"], adapted_.update["gradients"]) == (1000, 10)
  assert "weights (rollout copy)" in adapted_.sampling  # the merged copy, even on one CPU


# -- a run -----------------------------------------------------------------------------
RUN = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "rl.beta": 0.04, "eval.num_problems": 0,
       "opt.schedule": "constant", "opt.warmup_steps": 0, "opt.learning_rate": 3e-2}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  records = train.train_and_evaluate(tiny_config(dict(RUN, **{"train.steps": 2})), workdir)
  return workdir, records


def saved_state(workdir):
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    state, _ = ckpt.restore()
  return state


def test_checkpoint_holds_the_adapters_and_the_config_names_the_base(lora_run):
  workdir, records = lora_run
  state = saved_state(workdir)
  names = {f"{n}{e}" for n in transformer.LORA_TARGETABLE for e in transformer.LORA_ENDS}
  assert set(state["params"]) == names  # no base weight is saved
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)["model"]
  assert saved["name"] == "tiny-random" and saved["lora"]["rank"] == 4
  # Step 1 samples from the base itself: its KL to the reference (the base) is 0; then > 0.
  kl = [r["kl"] for r in records if "kl" in r]
  assert kl[0] == 0.0 and kl[-1] > 0


def test_export_of_a_lora_workdir_merges_the_adapters_and_transformers_agrees(lora_run, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM

  workdir, _ = lora_run
  merged, tokenizer = models.load(workdir)  # the workdir's adapters merged into the base
  assert merged.lora is None
  base, _ = models.load("tiny-random")
  ids = tokenizer("What is 3 + 4?", add_special_tokens=False)["input_ids"]
  tokens = jnp.asarray([ids], jnp.int32)
  ours = np.asarray(merged(tokens))
  assert np.abs(ours - np.asarray(base(tokens))).max() > 1e-3  # trained adapters are in it
  out = models.export(merged, tokenizer, str(tmp_path / "hf"))
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_restart_resumes_exactly(tmp_path):
  """2 + 1 steps = 3: by step 2 both A and B have moved (A's gradient is 0 while B = 0), so the
  restored adapters and AdamW moments are all the run's own."""
  uninterrupted = train.train_and_evaluate(tiny_config(dict(RUN, **{"train.steps": 3})),
                                           str(tmp_path / "a"))
  workdir = str(tmp_path / "b")
  first = train.train_and_evaluate(tiny_config(dict(RUN, **{"train.steps": 2})), workdir)
  train.train_and_evaluate(tiny_config(dict(RUN, **{"train.steps": 3})), workdir)
  records = metrics_io.read_metrics(workdir)
  assert records[:2] == first  # resumed, not redone: the first run's records, times included
  strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
                        for r in recs if "loss" in r]
  assert strip(records) == strip(uninterrupted)
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir)["params"],
               saved_state(str(tmp_path / "a"))["params"])


def test_adapters_alone_in_peft_format_merge_into_the_exported_weights(lora_run, tmp_path):
  """export --adapters: peft's tensors (lora_A [r, in], lora_B [out, r], torch layout) give
  W + (alpha / r) B A = the merged export's weights. (peft itself is not installed.)"""
  from safetensors.numpy import load_file

  workdir, _ = lora_run
  adapted, _ = models.load_workdir_adapted(workdir)
  out = lora.write_peft(str(tmp_path / "adapter"), adapted, "tiny-random")
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  merged = models.params_dict(models.load(workdir)[0])
  base = models.params_dict(models.load("tiny-random")[0])
  scale = config["lora_alpha"] / config["r"]
  assert len(tensors) == 2 * len(config["target_modules"]) * base["q_proj"].shape[0]
  for name in config["target_modules"]:
    for i in range(base[name].shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{lora.HF_MODULES[name]}.{name}"
      a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
      np.testing.assert_allclose(np.asarray(base[name][i]).T + scale * b @ a,
                                 np.asarray(merged[name][i]).T, atol=1e-6, err_msg=prefix)
