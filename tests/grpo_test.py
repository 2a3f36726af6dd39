"""Update-step tests: shared-prefix log-probs, gradient accumulation, one optimizer step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import grpo, models, optim
from grpo_jax.data import batching
from grpo_jax.models.transformer import ModelConfig

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
G = 3


def make_batch(seed=0, b=4, t=7):
  rng = np.random.default_rng(seed)
  prompts, pmask = batching.left_pad([list(rng.integers(2, 50, rng.integers(2, 6))) for _ in range(b)],
                                     pad_id=0, length=6)
  n = b * G
  lengths = rng.integers(1, t + 1, n)
  cmask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  completions = np.where(cmask, rng.integers(2, 50, (n, t)), 0).astype(np.int32)
  return grpo.Batch(prompts=jnp.asarray(prompts), prompt_mask=jnp.asarray(pmask),
                    completions=jnp.asarray(completions), completion_mask=jnp.asarray(cmask),
                    old_logps=jnp.asarray(rng.normal(-3, 0.3, (n, t)), jnp.float32),
                    advantages=jnp.asarray(rng.normal(0, 1, n), jnp.float32))


def test_completion_logps_equal_a_plain_forward_of_prompt_plus_completion():
  model = models.init_model(CFG, seed=0)
  batch = make_batch()
  logps, entropy = jax.jit(lambda b: grpo.completion_logps(
      model, b.prompts, b.prompt_mask, b.completions, b.completion_mask, num_generations=G,
      temperature=0.7, chunk_size=3))(batch)
  forward = models.jit_forward(model)
  for row in range(batch.completions.shape[0]):
    prompt = np.asarray(batch.prompts[row // G])[np.asarray(batch.prompt_mask[row // G]) == 1]
    n = int(batch.completion_mask[row].sum())
    comp = np.asarray(batch.completions[row, :n])
    logits = np.asarray(forward(np.concatenate([prompt, comp])[None]))[0].astype(np.float64) / 0.7
    logits = logits[len(prompt) - 1:-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(np.asarray(logps[row, :n]), logits[np.arange(n), comp] - logz,
                               atol=2e-5)
    p = np.exp(logits - logz[:, None])
    np.testing.assert_allclose(np.asarray(entropy[row, :n]), -(p * np.log(p)).sum(-1), atol=2e-5)


ACCUMULATION_CASES = [
    ("grpo", {}),
    ("dapo", {}),
    ("dr_grpo", {}),
    # The loss types whose aggregation makes accumulation exact, with the options that keep it
    # exact: an entropy bonus under cispo's global token mean, elementwise rollout weights
    # (old = the trainer's own log-probs, so the weights are not all 1), the bias-corrected KL.
    ("cispo", dict(entropy_coef=0.01)),
    pytest.param("cispo", dict(use_old_logps=False, rollout_correction="token_truncate",
                               rollout_correction_threshold=1.2), marks=pytest.mark.slow),
    ("gmpo", {}),
    pytest.param("gmpo", dict(use_old_logps=False, rollout_correction="sequence_mask"),
                 marks=pytest.mark.slow),
    ("sapo", dict(use_bias_correction_kl=True)),
    pytest.param("sapo", dict(use_old_logps=False, rollout_correction="token_mask",
                              rollout_correction_threshold=1.2), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("loss_type,options", ACCUMULATION_CASES)
def test_gradient_accumulation_equals_one_batch(loss_type, options):
  model = models.init_model(CFG, seed=1)
  graphdef, params = nnx.split(model)
  ref = jax.tree.map(lambda x: x * 1.01, params)
  batch = make_batch(seed=2)
  kw = dict(loss_type=loss_type, max_completion_length=7, use_old_logps=True, beta=0.1,
            chunk_size=4)
  cfg = grpo.loss_config(G, **{**kw, **options})
  g1, m1 = jax.jit(lambda p: grpo.grads_and_metrics(p, ref, graphdef, batch, cfg, 1))(params)
  g2, m2 = jax.jit(lambda p: grpo.grads_and_metrics(p, ref, graphdef, batch, cfg, 2))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  assert float(jnp.abs(jax.tree.leaves(g1)[0]).max()) > 0
  # A maximum is combined by a max, not averaged.
  assert float(m2["mismatch/max_abs_log_ratio"]) == float(m1["mismatch/max_abs_log_ratio"])
  if "rollout_correction" in options:  # the correction did something on this batch
    assert 0 < float(m1["mismatch/weight_mean"]) < 1


def _micro_batches(batch, parts):
  stacked = optim.split_micro_batches(batch, parts)
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(parts)]


@pytest.mark.slow  # about a minute on 2 cores: the slow job runs it
def test_bnpo_averages_micro_batch_token_means_and_dapo_keeps_the_global_one():
  """TRL's bnpo under accumulation is (1/K) sum_k (token mean of micro-batch k); dapo is the
  token mean of the whole batch. They differ when the micro-batches' token counts do."""
  graphdef, params = nnx.split(models.init_model(CFG, seed=1))
  batch = make_batch(seed=2)
  micro = _micro_batches(batch, 2)
  counts = [int(mb.completion_mask.sum()) for mb in micro]
  assert counts[0] != counts[1]
  out = {}
  for loss_type in ("bnpo", "dapo"):
    cfg = grpo.loss_config(G, loss_type=loss_type, use_old_logps=True, beta=0.0, chunk_size=4)
    grad_fn = jax.jit(jax.grad(grpo.loss_and_metrics, has_aux=True), static_argnums=(2, 4))
    g_full, m_full = grad_fn(params, None, graphdef, batch, cfg)
    parts = [grad_fn(params, None, graphdef, mb, cfg) for mb in micro]
    g2, m2 = jax.jit(lambda p, c=cfg: grpo.grads_and_metrics(p, None, graphdef, batch, c, 2))(
        params)
    if loss_type == "bnpo":
      want_loss = np.mean([float(m["loss"]) for _, m in parts])
      want_grads = jax.tree.map(lambda *g: (g[0] + g[1]) / 2, *[g for g, _ in parts])
    else:
      want_loss, want_grads = float(m_full["loss"]), g_full
    np.testing.assert_allclose(float(m2["loss"]), want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
    out[loss_type] = float(m2["loss"]), float(m_full["loss"])
  assert out["bnpo"][1] == out["dapo"][1]  # without accumulation, the same formula
  assert abs(out["bnpo"][0] - out["dapo"][0]) > 1e-3 * abs(out["dapo"][0])


@pytest.mark.slow  # about a minute on 2 cores: the slow job runs it
def test_entropy_options_and_mismatch_metrics_reach_the_loss():
  """loss_and_metrics passes the entropies (bonus: minus coef x the logged mean entropy under
  dapo) and the sampler's log-probs (mismatch against the trainer's, the batch's old_logps)."""
  model = models.init_model(CFG, seed=5)
  graphdef, params = nnx.split(model)
  batch = make_batch(seed=6)
  run = lambda **kw: jax.value_and_grad(grpo.loss_and_metrics, has_aux=True)(  # noqa: E731
      params, None, graphdef, batch, grpo.loss_config(G, loss_type="dapo", beta=0.0, **kw))
  (loss0, m0), g0 = run()
  (loss1, m1), g1 = run(entropy_coef=0.05)
  (loss2, _), _ = run(top_entropy_quantile=0.3)
  np.testing.assert_allclose(float(loss1), float(loss0) - 0.05 * float(m0["entropy"]), rtol=1e-5)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
  assert abs(float(loss2) - float(loss0)) > 1e-6
  logps, _ = grpo.completion_logps(model, batch.prompts, batch.prompt_mask, batch.completions,
                                   batch.completion_mask, num_generations=G)
  mask = np.asarray(batch.completion_mask) > 0
  d = (np.asarray(logps, np.float64) - np.asarray(batch.old_logps, np.float64))[mask]
  np.testing.assert_allclose(float(m0["mismatch/mean_abs_log_ratio"]), np.abs(d).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m0["mismatch/max_abs_log_ratio"]), np.abs(d).max(), rtol=1e-5)
  np.testing.assert_allclose(float(m0["mismatch/kl"]), np.mean(np.exp(d) - d - 1), rtol=1e-4)
  # With several updates per rollout old_logps are the sampler's own: no mismatch to report.
  (_, m_old), _ = run(use_old_logps=True)
  assert float(m_old["mismatch/max_abs_log_ratio"]) == 0.0


def test_update_step_changes_params_and_gives_finite_metrics():
  model = models.init_model(CFG, seed=3)
  graphdef, params = nnx.split(model)
  ref = jax.tree.map(jnp.copy, params)
  optimizer, _ = optim.make_optimizer(1e-2, total_steps=10)
  opt_state = optimizer.init(params)
  before = jax.tree.map(np.asarray, params)
  step = grpo.make_update_step(graphdef, optimizer, grpo.loss_config(G))
  params, opt_state, metrics = step(params, opt_state, ref, make_batch(seed=4))
  for k in ("loss", "kl", "entropy", "grad_norm", "clip_ratio/region_mean"):
    assert np.isfinite(float(metrics[k])), k
  assert float(metrics["grad_norm"]) > 0
  changed = [not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before),
                                                               jax.tree.leaves(params))]
  assert all(changed)
  # After one step the policy moved away from the reference: the KL term is positive.
  _, m2 = jax.jit(lambda p: grpo.loss_and_metrics(p, ref, graphdef, make_batch(seed=4),
                                                  grpo.loss_config(G)))(params)
  assert float(m2["kl"]) > 0


def test_beta_zero_needs_no_reference():
  model = models.init_model(CFG, seed=5)
  graphdef, params = nnx.split(model)
  cfg = grpo.loss_config(G, beta=0.0)
  loss, metrics = grpo.loss_and_metrics(params, None, graphdef, make_batch(seed=6), cfg)
  assert np.isfinite(float(loss)) and float(metrics["kl"]) == 0.0


def test_optimizer_schedule_warmup_then_cosine():
  _, lr = optim.make_optimizer(1.0, total_steps=110, warmup_steps=10, schedule="cosine")
  assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6 and abs(float(lr(10)) - 1.0) < 1e-6
  assert abs(float(lr(60)) - 0.5) < 1e-3 and float(lr(110)) < 1e-6
  with pytest.raises(ValueError, match="constant.*cosine"):
    optim.make_optimizer(1.0, total_steps=10, schedule="linear")


@pytest.mark.slow  # ~40 s: a full CLI or multi-step run (the slow job)
def test_several_iterations_use_the_sampling_logps_and_clip():
  """num_iterations > 1: old log-probs are the sampler's; a moved policy gets clipped."""
  model = models.init_model(CFG, seed=7)
  graphdef, params = nnx.split(model)
  batch = make_batch(seed=8)
  logps, _ = grpo.completion_logps(model, batch.prompts, batch.prompt_mask, batch.completions,
                                   batch.completion_mask, num_generations=G)
  batch = batch.replace(old_logps=logps)  # what the sampler returns for the same params
  on_policy = grpo.loss_config(G, beta=0.0)
  with_old = dataclasses.replace(on_policy, use_old_logps=True)
  g1, _ = jax.grad(grpo.loss_and_metrics, has_aux=True)(params, None, graphdef, batch, on_policy)
  g2, m2 = jax.grad(grpo.loss_and_metrics, has_aux=True)(params, None, graphdef, batch, with_old)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
  assert float(m2["clip_ratio/region_mean"]) == 0.0
  # A second update on the same rollout, after a big step: ratios leave [1 - eps, 1 + eps].
  optimizer, _ = optim.make_optimizer(0.05, total_steps=2)
  step = grpo.make_update_step(graphdef, optimizer, with_old)
  opt_state = optimizer.init(params)
  params, opt_state, _ = step(params, opt_state, None, batch)
  _, _, metrics = step(params, opt_state, None, batch)
  assert float(metrics["clip_ratio/region_mean"]) > 0.05


REMAT_KW = dict(loss_type="dapo", beta=0.1, use_old_logps=True, chunk_size=4)


@pytest.fixture(scope="module")
def without_remat():
  """(graphdef, params, ref, batch, grads and metrics of the update without remat)."""
  graphdef, params = nnx.split(models.init_model(CFG, seed=7))
  ref = jax.tree.map(lambda x: x * 1.01, params)
  batch = make_batch(seed=8)
  cfg = grpo.loss_config(G, **REMAT_KW)
  out = jax.jit(lambda p: grpo.grads_and_metrics(p, ref, graphdef, batch, cfg))(params)
  return graphdef, params, ref, batch, out


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients(without_remat, remat):
  """Recomputing the layers in the backward changes what is stored, not what is computed."""
  graphdef, params, ref, batch, (g0, m0) = without_remat
  cfg = grpo.loss_config(G, remat=remat, **REMAT_KW)
  g1, m1 = jax.jit(lambda p: grpo.grads_and_metrics(p, ref, graphdef, batch, cfg))(params)
  np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(jax.tree.leaves(g0)[0]).max()) > 0
  # The setting reached the layer scan: the traced loss holds a remat, the plain one not.
  trace = lambda c: str(jax.make_jaxpr(  # noqa: E731
      lambda p: grpo.loss_and_metrics(p, ref, graphdef, batch, c)[0])(params))
  assert "remat" in trace(cfg) and "remat" not in trace(grpo.loss_config(G, **REMAT_KW))


def test_unknown_remat_is_refused():
  graphdef, params = nnx.split(models.init_model(CFG, seed=7))
  with pytest.raises(ValueError, match="remat='some'"):
    grpo.loss_and_metrics(params, None, graphdef, make_batch(),
                          grpo.loss_config(G, beta=0.0, remat="some"))
