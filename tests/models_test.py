"""Model and checkpoint tests: parity with transformers on PyTorch, caches, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from grpo_jax import models
from grpo_jax.models import checkpoints
from grpo_jax.models.transformer import ModelConfig

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Question: what is 17 * 23? Think step by step. <think>17 * 20 = 340",
    "Wie spät ist es? 今日は良い天気ですね。 🙂 " * 3,
]


def torch_logits(hf_model, ids: np.ndarray, attention_mask=None) -> np.ndarray:
  with torch.no_grad():
    out = hf_model(torch.tensor(np.asarray(ids)),
                   attention_mask=None if attention_mask is None else torch.tensor(attention_mask))
  return out.logits.float().numpy()


# -- the embedded SmolLM2 -------------------------------------------------------------
def test_smollm2_logits_match_transformers(smollm2, smollm2_torch):
  model, tokenizer = smollm2
  ref_model, ref_tokenizer = smollm2_torch
  forward = models.jit_forward(model)
  worst = 0.0
  for text in TEXTS:
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    ours, ref = np.asarray(forward(ids)), torch_logits(ref_model, ids)
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    worst = max(worst, float(np.abs(ours - ref).max()))
    assert (ours[0].argmax(-1) == ref[0].argmax(-1)).mean() > 0.99
  print(f"SmolLM2 max |logit diff| vs transformers: {worst:.2e}")
  assert worst < 2e-3


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_torch):
  """Ours is built from the GGUF without torch (checkpoints.read_gguf_tokenizer); the reference
  is AutoTokenizer's, which needs torch."""
  tokenizer, ref = smollm2[1], smollm2_torch[1]
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
    ids = tokenizer(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    assert tokenizer.decode(ids) == ref.decode(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
  assert tokenizer.all_special_ids == ref.all_special_ids and len(tokenizer) == len(ref)
  chat = [{"role": "user", "content": "What is 2+2?"}]
  ours = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  assert ours == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  assert ours.endswith("<|im_start|>assistant\n")  # the model's own template, not a default
  assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 == tokenizer.eos_token_id


def test_smollm2_config_from_gguf(smollm2):
  cfg = smollm2[0].cfg
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
      (30, 576, 9, 3, 64)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
  assert abs(cfg.num_params() - 134_515_008) < 1000


def test_bf16_compute_stays_close(smollm2):
  """bf16 matmul operands (fp32 accumulation) keep the logits near the fp32 ones."""
  model, tokenizer = smollm2
  ids = tokenizer(TEXTS[0], return_tensors="np")["input_ids"]
  fp32 = np.asarray(models.jit_forward(model)(ids))
  bf16_model = models.model_from_params(model.cfg, models.params_dict(model), dtype=jnp.bfloat16)
  bf16 = np.asarray(models.jit_forward(bf16_model)(ids))
  assert bf16.dtype == np.float32
  assert np.abs(bf16 - fp32).max() < 0.5
  assert (bf16[0].argmax(-1) == fp32[0].argmax(-1)).mean() >= 0.8


# -- Hugging Face folders: Qwen2 (bias), Qwen3 (q/k norm), Llama-3 RoPE, sharded ----
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, smollm2):
  path = str(tmp_path_factory.mktemp("tok"))
  smollm2[1].save_pretrained(path)
  return path


def make_hf_model(kind, folder, tokenizer_dir, max_shard_size="5GB", **kw):
  """A tiny random transformers model saved as a checkpoint folder."""
  import shutil

  import transformers

  common = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                rms_norm_eps=1e-5, max_position_embeddings=256)
  common.update(kw)
  cls_cfg, cls_model = {
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
  }[kind]
  torch.manual_seed(0)
  model = cls_model(cls_cfg(**common)).eval()
  with torch.no_grad():  # random norms and biases, so a missed one shows
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
  model.save_pretrained(folder, max_shard_size=max_shard_size)
  for f in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, f), folder)
  return model


CASES = {
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3_qk_norm": ("qwen3", dict(head_dim=24, tie_word_embeddings=False)),
    "llama3_rope_untied": ("llama", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_folder_logits_match_transformers(case, tmp_path, tokenizer_dir):
  kind, kw = CASES[case]
  ref = make_hf_model(kind, str(tmp_path), tokenizer_dir, **kw)
  model, tokenizer = models.load(str(tmp_path))
  assert model.cfg.architecture == kind
  assert model.cfg.attention_bias == (kind == "qwen2") and model.cfg.qk_norm == (kind == "qwen3")
  ids = np.random.default_rng(0).integers(0, 49152, (2, 40))  # 40 > 16: RoPE scaling matters
  diff = np.abs(np.asarray(models.jit_forward(model)(ids)) - torch_logits(ref, ids)).max()
  assert diff < 1e-4, diff


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_torch_autograd(case, tmp_path, tokenizer_dir):
  """The training gradient (hand-written VJPs of the SwiGLU MLP and of the chunked
  log-prob/entropy head) against PyTorch autograd on the transformers model."""
  from flax import nnx

  from grpo_jax import losses

  kind, kw = CASES[case]
  ref = make_hf_model(kind, str(tmp_path), tokenizer_dir, **kw)
  model, _ = models.load(str(tmp_path))
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 49152, (2, 24))
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding
  targets = rng.integers(0, 49152, (2, 24))
  w_logp, w_ent = rng.normal(size=(2, 2, 24)) * mask

  graphdef, params = nnx.split(model)

  def objective(params):
    m = nnx.merge(graphdef, params)
    hidden = m.hidden_states(jnp.asarray(ids), attention_mask_BxL=jnp.asarray(mask))
    logps, entropy = losses.token_logps_and_entropy(hidden, jnp.asarray(targets), m.logits,
                                                    chunk_size=10)
    return jnp.sum(logps * w_logp) + jnp.sum(entropy * w_ent)

  grads = jax.jit(jax.grad(objective))(params)
  ours = checkpoints.params_to_hf(nnx.to_pure_dict(grads), model.cfg)

  ref.zero_grad()
  logits = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.double()
  logp_all = torch.log_softmax(logits, -1)
  logps = logp_all.gather(-1, torch.tensor(targets)[..., None])[..., 0]
  entropy = -(logp_all.exp() * logp_all).sum(-1)
  (torch.sum(logps * torch.tensor(w_logp)) + torch.sum(entropy * torch.tensor(w_ent))).backward()
  theirs = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
  assert set(ours) == set(theirs)
  for name, want in theirs.items():
    scale = np.abs(want).max()
    assert scale > 0, name
    np.testing.assert_allclose(ours[name], want, atol=2e-4 * scale, rtol=0, err_msg=name)


def test_sharded_safetensors_with_index(tmp_path, tokenizer_dir):
  ref = make_hf_model("llama", str(tmp_path), tokenizer_dir, max_shard_size="2MB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert not os.path.exists(tmp_path / "model.safetensors")
  model, _ = models.load(str(tmp_path))
  ids = np.arange(12)[None] * 7
  assert np.abs(np.asarray(models.jit_forward(model)(ids)) - torch_logits(ref, ids)).max() < 1e-4


# -- export -------------------------------------------------------------------------
def test_export_round_trip_through_transformers(smollm2, tmp_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer

  model, tokenizer = smollm2
  out = models.export(model, tokenizer, str(tmp_path / "hf"))
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  hf_tok = AutoTokenizer.from_pretrained(out)
  ids = tokenizer(TEXTS[2], return_tensors="np")["input_ids"]
  assert hf_tok(TEXTS[2])["input_ids"] == ids[0].tolist()
  diff = np.abs(np.asarray(models.jit_forward(model)(ids)) - torch_logits(hf, ids)).max()
  assert diff < 2e-4, diff
  # ... and back into grpo_jax, bit for bit.
  again, _ = models.load(out)
  for name, value in models.params_dict(model).items():
    np.testing.assert_array_equal(np.asarray(models.params_dict(again)[name]), np.asarray(value))


def test_export_untied_qwen3_round_trip(tmp_path, tokenizer_dir):
  make_hf_model("qwen3", str(tmp_path / "src"), tokenizer_dir, head_dim=24, tie_word_embeddings=False)
  model, tokenizer = models.load(str(tmp_path / "src"))
  models.export(model, tokenizer, str(tmp_path / "dst"))
  with open(tmp_path / "dst" / "config.json") as f:
    assert json.load(f)["architectures"] == ["Qwen3ForCausalLM"]
  from transformers import AutoModelForCausalLM

  hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst"), dtype=torch.float32).eval()
  ids = np.arange(30)[None] * 11
  assert np.abs(np.asarray(models.jit_forward(model)(ids)) - torch_logits(hf, ids)).max() < 1e-4


# -- KV cache ---------------------------------------------------------------------
TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, attention_bias=True, qk_norm=True,
                   tie_word_embeddings=False)


def test_cached_decode_equals_uncached_forward():
  """Left-padded prefill, then one token at a time, gives the full forward's logits."""
  model = models.init_model(TINY, seed=1)
  rng = np.random.default_rng(0)
  b, prompt_len, new = 3, 6, 5
  tokens = rng.integers(1, 97, (b, prompt_len + new))
  pad = np.array([0, 2, 4])  # left padding per row
  mask = (np.arange(prompt_len)[None] >= pad[:, None]).astype(np.int32)
  forward = models.jit_forward(model)
  # Reference: each row alone, without padding or cache.
  refs = [np.asarray(forward(tokens[i:i + 1, pad[i]:])) for i in range(b)]

  from flax import nnx

  graphdef, state = nnx.split(model)
  step = jax.jit(lambda st, t, m, c: nnx.merge(graphdef, st)(t, attention_mask_BxL=m, cache=c))
  cache = model.init_cache(b, prompt_len + new)
  logits, cache = step(state, tokens[:, :prompt_len], mask, cache)
  got = [np.asarray(logits)]
  for t in range(prompt_len, prompt_len + new):
    logits, cache = step(state, tokens[:, t:t + 1], np.ones((b, 1), np.int32), cache)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  for i in range(b):
    np.testing.assert_allclose(got[i, pad[i]:], refs[i][0], atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == prompt_len + new


def test_prefill_equals_forward_into_an_empty_cache():
  model = models.init_model(TINY, seed=4)
  tokens = np.random.default_rng(1).integers(1, 97, (2, 5))
  mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  h1, c1 = jax.jit(lambda t, m: model.prefill(t, m, max_len=9))(tokens, mask)
  h2, c2 = jax.jit(lambda t, m: model.hidden_states(t, attention_mask_BxL=m,
                                                    cache=model.init_cache(2, 9)))(tokens, mask)
  np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), atol=1e-5)
  for key in ("k", "v", "mask", "index"):
    np.testing.assert_allclose(np.asarray(c1[key]), np.asarray(c2[key]), atol=1e-5)
  assert c1["k"].shape[3] == 9 and int(c1["index"]) == 5


def test_padding_does_not_change_real_positions():
  """A right-padded row's real tokens get the same logits as the unpadded row."""
  model = models.init_model(TINY, seed=2)
  tokens = np.array([[5, 6, 7, 8, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 0, 0]])
  forward = models.jit_forward(model)
  np.testing.assert_allclose(np.asarray(forward(tokens, attention_mask_BxL=mask))[:, :4],
                             np.asarray(forward(tokens[:, :4])), atol=1e-5)


# -- attention in blocks of queries --------------------------------------------------
def scans(fn, *args) -> int:
  """Scans in fn's trace: the layer scan, plus one per forward whose attention is blocked."""
  return str(jax.make_jaxpr(fn)(*args)).count(" scan[")


def assert_grads_close(got, want, rtol=1e-4, atol=1e-5):
  """Two gradients (nnx.State of the model's params) are equal, parameter by parameter.

  float32 sums taken in another order differ by ~1e-7 of the largest terms, not of each entry,
  so the absolute tolerance grows with the parameter's largest gradient (an entry of 0.006 in a
  matrix whose entries reach 87 may move by 1e-5 between CPUs)."""
  got, want = nnx.to_pure_dict(got), nnx.to_pure_dict(want)
  assert got.keys() == want.keys()
  for name in want:
    w = np.asarray(want[name])
    np.testing.assert_allclose(np.asarray(got[name]), w, rtol=rtol,
                               atol=max(atol, 1e-6 * float(np.abs(w).max())), err_msg=name)


@pytest.mark.parametrize("block", [4, 5])
def test_blocked_attention_gives_the_same_values_and_gradients(block):
  """13 left-padded tokens with their queries in blocks of 4 or 5 (the last block padded):
  hidden states and parameter gradients equal those of all scores at once (attention_block=0,
  the unblocked path)."""
  graphdef, params = nnx.split(models.init_model(TINY, seed=3))
  rng = np.random.default_rng(3)
  b, l = 3, 13
  tokens = jnp.asarray(rng.integers(1, 97, (b, l)))
  mask = jnp.asarray((np.arange(l)[None] >= np.array([0, 3, 6])[:, None]).astype(np.int32))
  weights = jnp.asarray(rng.normal(size=(b, l, TINY.hidden_size)), jnp.float32) * mask[..., None]

  def loss(params, attention_block):
    hidden = nnx.merge(graphdef, params).hidden_states(tokens, attention_mask_BxL=mask,
                                                       attention_block=attention_block)
    return jnp.sum(jnp.sin(hidden) * weights), hidden

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (g_all, h_all), (g_blocked, h_blocked) = grad(params, 0), grad(params, block)
  np.testing.assert_allclose(np.asarray(h_blocked), np.asarray(h_all), rtol=1e-5, atol=1e-5)
  assert_grads_close(g_blocked, g_all)
  assert float(jnp.abs(g_all["q_proj"][...]).max()) > 1e-3  # attention has a gradient to compare
  # The blocked forward did run in blocks: one more scan than the unblocked one.
  assert scans(lambda p: loss(p, block), params) == scans(lambda p: loss(p, 0), params) + 1


@pytest.mark.parametrize("remat", ["none", "full"])
def test_blocked_attention_in_the_updates_log_probs(remat):
  """grpo.completion_logps: 2 completions per left-padded prompt attend to their prompt as a
  shared prefix. With the model's attention_block = 4 (the 6-token prompts and the 11
  completion queries in blocks, the last one padded), log-probs, entropies and gradients equal
  those of attention_block = 0, with and without remat of the layers."""
  from grpo_jax import grpo

  rng = np.random.default_rng(5)
  g, t = 2, 12
  prompts = jnp.asarray(rng.integers(1, 97, (2, 6)))
  prompt_mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  completion_mask = jnp.asarray((np.arange(t)[None] < np.array([12, 7, 3, 10])[:, None])
                                .astype(np.int32))
  completions = jnp.asarray(rng.integers(1, 97, (4, t))) * completion_mask
  models_by_block = {blk: nnx.split(models.init_model(TINY, seed=5, attention_block=blk))
                     for blk in (0, 4)}
  params = models_by_block[0][1]

  def loss(params, graphdef):
    logps, entropy = grpo.completion_logps(
        nnx.merge(graphdef, params), prompts, prompt_mask, completions, completion_mask,
        num_generations=g, chunk_size=5, remat=remat)
    return jnp.sum(logps * completion_mask) + 0.3 * jnp.sum(entropy * completion_mask), logps

  out = {blk: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, graphdef)
         for blk, (graphdef, _) in models_by_block.items()}
  np.testing.assert_allclose(np.asarray(out[4][1]), np.asarray(out[0][1]), rtol=1e-5, atol=1e-5)
  assert_grads_close(out[4][0], out[0][0])
  # The setting travels in the graphdef: prefill and completions blocked, 2 scans more.
  traced = {blk: scans(lambda p: loss(p, graphdef)[0], params)
            for blk, (graphdef, _) in models_by_block.items()}
  assert traced[4] == traced[0] + 2, traced


def test_blocked_attention_holds_one_blocks_scores_in_the_backward():
  """XLA's temporaries for the gradient of a 2048-token forward: with all scores at once they
  hold [L, L] scores per layer; in blocks of 256 they are a fraction (CPU, measured 707 MiB
  -> 111 MiB for this model)."""
  graphdef, params = nnx.split(models.load("tiny-random")[0])
  tokens = jnp.zeros((2, 2048), jnp.int32)

  def temp_bytes(attention_block):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p).hidden_states(  # noqa: E731
        tokens, attention_block=attention_block) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  scores = 2 * 4 * 2048 * 2048 * 4  # one layer's fp32 scores: rows x heads x L x L
  all_at_once, blocked = temp_bytes(0), temp_bytes(256)
  assert all_at_once > 2 * scores and blocked < scores, (all_at_once, blocked)


def test_smollm2_blocked_attention_gives_the_same_hidden_states(smollm2):
  """The real model, 2 left-padded rows in blocks of 16 queries: the same as unblocked."""
  model, tokenizer = smollm2
  rows = [tokenizer(text)["input_ids"] for text in (TEXTS[2], TEXTS[1] + " " + TEXTS[3])]
  length = max(map(len, rows))
  tokens = np.array([[0] * (length - len(r)) + r for r in rows])
  mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows])
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, blk: nnx.merge(graphdef, p).hidden_states(
      tokens, attention_mask_BxL=mask, attention_block=blk), static_argnums=1)
  assert length > 16 * 3 and length % 16  # 3 blocks and a padded one
  np.testing.assert_allclose(np.asarray(forward(params, 16))[mask == 1],
                             np.asarray(forward(params, 0))[mask == 1], rtol=1e-4, atol=1e-4)


# -- errors -----------------------------------------------------------------------
def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="smollm2-135m-instruct"):
    models.load("gpt-17")


def test_missing_gguf_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.gguf"):
    models.load(str(tmp_path / "nothere.gguf"))


def test_folder_without_config_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load(str(tmp_path))


def test_unsupported_hf_architecture_is_named(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, f)
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported.*LlamaForCausalLM"):
    models.load(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"GGU", b"not a gguf file, but long enough to read"])
def test_corrupt_gguf_is_a_value_error_naming_the_file(content, tmp_path):
  path = tmp_path / "cut.gguf"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=f"{path} is not a readable GGUF file"):
    models.load(str(path))


def test_unsupported_gguf_architecture_is_named(tmp_path):
  import gguf

  path = str(tmp_path / "m.gguf")
  w = gguf.GGUFWriter(path, "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(ValueError, match="'gpt2'.*supported.*llama"):
    checkpoints.read_gguf(path)


def test_missing_tensor_is_named():
  cfg = checkpoints.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
                                    "hidden_size": 8, "intermediate_size": 8,
                                    "num_hidden_layers": 1, "num_attention_heads": 2})
  with pytest.raises(ValueError, match="model.layers.0.input_layernorm.weight"):
    checkpoints.params_from_hf({}, cfg)


# -- Gemma 3 ------------------------------------------------------------------------
@pytest.mark.slow
def test_gemma3_config_from_gguf(gemma3):
  cfg = gemma3[0].cfg
  assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.vocab_size) == ("gemma3", 18, 640, 4, 1, 256, 262144)
  assert cfg.layer_windows() == (512,) * 5 + (0,) + (512,) * 5 + (0,) + (512,) * 5 + (0,)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)
  assert cfg.tie_word_embeddings and cfg.num_params() == 268_098_176


@pytest.mark.slow
def test_gemma3_tokenizer_ids(gemma3):
  """Ours is built from the GGUF (read_gguf_tokenizer); the ids are those transformers'
  AutoTokenizer gives for the same file (checked once by hand: loading it takes ~50 s)."""
  tokenizer = gemma3[1]
  assert tokenizer("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]
  turn = "<start_of_turn>user\nhi<end_of_turn>\n"
  assert tokenizer(turn)["input_ids"] == [2, 105, 2364, 107, 2202, 106, 107]
  specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
  assert specials == ("<bos>", "<eos>", "<pad>")
  assert len(tokenizer) == 262144 and tokenizer.decode([818, 5279]) == "The capital"
  assert tokenizer.chat_template is None  # the pretrained model, not the instruction-tuned one


@pytest.mark.slow
def test_gemma3_predicts_sensible_text(gemma3):
  """The weights' conventions (llama.cpp's 1 + w norms undone) give a low loss on plain English;
  the same weights with the norms left at 1 + w do not."""
  model, tokenizer = gemma3
  text = "The quick brown fox jumps over the lazy dog. The capital of France is Paris."
  ids = np.asarray(tokenizer(text)["input_ids"])[None]
  assert ids[0, 0] == tokenizer.bos_token_id == 2

  def loss(m):
    logp = jax.nn.log_softmax(models.jit_forward(m)(ids)[0, :-1])
    return -float(jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], -1)))

  params = models.params_dict(model)
  shifted = {k: v + 1.0 if k.endswith("norm") else v for k, v in params.items()}
  good, bad = loss(model), loss(models.model_from_params(model.cfg, shifted))
  print(f"Gemma 3 270M mean NLL {good:.2f} (norms left at 1 + w: {bad:.2f})")
  assert good < 3.0 < bad


@pytest.mark.slow
def test_gemma3_logits_match_transformers(gemma3, gemma3_torch):
  """The 270M's dequantised weights in transformers' Gemma3ForCausalLM, both with a sliding
  window of 16 so that every text but the first crosses it in the local layers (the last
  one many times over)."""
  tokenizer = gemma3[1]
  ours, ref = gemma3_torch
  window = ours.cfg.sliding_window
  forward = models.jit_forward(ours)
  worst, lengths = 0.0, []
  for text in [*TEXTS, " ".join(TEXTS) * 2]:
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    got, want = np.asarray(forward(ids)), torch_logits(ref, ids)
    assert got.shape == want.shape == (1, ids.shape[1], 262144)
    worst = max(worst, float(np.abs(got - want).max()))
    lengths.append(ids.shape[1])
  print(f"Gemma 3 270M max |logit diff| vs transformers: {worst:.2e} (lengths {lengths})")
  assert window == 16 and max(lengths) > 8 * window
  assert worst < 2e-3
  # The window matters: the full model's (window 512) logits differ past 16 tokens.
  ids = tokenizer(TEXTS[3], return_tensors="np")["input_ids"]
  full = np.asarray(models.jit_forward(gemma3[0])(ids))
  assert np.abs(full - np.asarray(forward(ids)))[0, window + 1:].max() > 0.1


@pytest.mark.slow
def test_gemma3_cached_decoding_crosses_the_window(gemma3_torch, gemma3):
  """Prefill 10 tokens, then decode 14 one at a time (past the window of 16): the logits equal
  the uncached forward's."""
  ours = gemma3_torch[0]
  ids = gemma3[1](TEXTS[3], return_tensors="np")["input_ids"][:, :24]
  want = np.asarray(models.jit_forward(ours)(ids))
  graphdef, state = nnx.split(ours)
  step = jax.jit(lambda st, t, c: nnx.merge(graphdef, st)(t, cache=c))
  logits, cache = step(state, ids[:, :10], ours.init_cache(1, 24))
  got = [np.asarray(logits)]
  for t in range(10, 24):
    logits, cache = step(state, ids[:, t:t + 1], cache)
    got.append(np.asarray(logits))
  assert ours.cfg.sliding_window == 16
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-3, rtol=0)


TINY_GEMMA = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=8, rope_theta=10000.0, rope_scaling=(("factor", 2.0),), qk_norm=True,
    architecture="gemma3", sliding_window=5,
    layer_types=("sliding_attention", "full_attention", "sliding_attention", "sliding_attention"),
    rope_local_theta=100.0, query_pre_attn_scalar=12.0, hidden_act="gelu_pytorch_tanh",
    norm_plus_one=True, sandwich_norm=True, embed_scale=True)


def tiny_gemma(seed=0):
  """TINY_GEMMA with random weights, norms included (zero-centred, so 0 would hide a mistake)."""
  model = models.init_model(TINY_GEMMA, seed=seed)
  rng = np.random.default_rng(seed)
  params = {k: np.asarray(v) + (0.3 * rng.standard_normal(v.shape) if k.endswith("norm") else 0)
            for k, v in models.params_dict(model).items()}
  params["embed"] = params["embed"] * 20  # the embedding scale sqrt(32) then matters
  return models.model_from_params(TINY_GEMMA, params)


def tiny_gemma_torch(model, tmp_path):
  """The same weights in transformers' Gemma3ForCausalLM, through a checkpoint folder we write
  and transformers reads (config_to_hf, params_to_hf)."""
  from transformers import AutoModelForCausalLM

  checkpoints.write_hf_folder(str(tmp_path), model.cfg, models.params_dict(model))
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                             attn_implementation="eager").eval()
  assert type(ref).__name__ == "Gemma3ForCausalLM"
  assert ref.config.layer_types == list(TINY_GEMMA.layer_types)
  return ref


def test_tiny_gemma3_logits_and_gradients_match_torch_autograd(tmp_path):
  """Logits and the training gradient (GeGLU's hand-written VJP, the chunked log-prob/entropy
  head) against transformers with PyTorch autograd; 24 tokens, window 5, linear RoPE scaling
  in the global layer."""
  from grpo_jax import losses

  model = tiny_gemma(seed=1)
  ref = tiny_gemma_torch(model, tmp_path)
  again, params_again = checkpoints.read_hf_folder(str(tmp_path))  # config.json read back
  assert again == TINY_GEMMA
  rng = np.random.default_rng(3)
  # No token 0: transformers' Gemma embedding treats it as padding_idx (no gradient to its row).
  ids = rng.integers(1, 128, (2, 24))
  targets = rng.integers(0, 128, (2, 24))
  w_logp, w_ent = rng.normal(size=(2, 2, 24))
  diff = np.abs(np.asarray(models.jit_forward(model)(ids)) - torch_logits(ref, ids)).max()
  assert diff < 1e-4, diff

  graphdef, params = nnx.split(model)

  def objective(params):
    m = nnx.merge(graphdef, params)
    hidden = m.hidden_states(jnp.asarray(ids))
    logps, entropy = losses.token_logps_and_entropy(hidden, jnp.asarray(targets), m.logits,
                                                    chunk_size=10)
    return jnp.sum(logps * w_logp) + jnp.sum(entropy * w_ent)

  ours = checkpoints.params_to_hf(nnx.to_pure_dict(jax.jit(jax.grad(objective))(params)),
                                  model.cfg)
  ref.zero_grad()
  logp_all = torch.log_softmax(ref(torch.tensor(ids)).logits.double(), -1)
  logps = logp_all.gather(-1, torch.tensor(targets)[..., None])[..., 0]
  entropy = -(logp_all.exp() * logp_all).sum(-1)
  (torch.sum(logps * torch.tensor(w_logp)) + torch.sum(entropy * torch.tensor(w_ent))).backward()
  theirs = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
  assert set(ours) == set(theirs) and len(theirs) == 2 + 4 * 13
  for name, want in theirs.items():
    scale = np.abs(want).max()
    assert scale > 0, name
    np.testing.assert_allclose(ours[name], want, atol=2e-4 * scale, rtol=0, err_msg=name)


def test_tiny_gemma3_window_is_by_position_across_cache_prefix_and_blocks():
  """Two left-padded prompts as a shared prefix, 2 rows each decoding 9 tokens past the window
  of 5: every row's logits equal its unpadded uncached forward; so do blocked (3 queries) and
  unblocked forwards with the prefix and no cache."""
  model = tiny_gemma(seed=2)
  rng = np.random.default_rng(4)
  g, p_len, new = 2, 7, 9
  prompts = rng.integers(1, 128, (2, p_len))
  prompt_mask = (np.arange(p_len)[None] >= np.array([0, 3])[:, None]).astype(np.int32)
  completions = rng.integers(1, 128, (4, new))
  forward = models.jit_forward(model)
  refs = [np.asarray(forward(np.concatenate([prompts[r // g, prompt_mask[r // g] == 1],
                                              completions[r]])[None]))[0] for r in range(4)]
  n_prompt = prompt_mask.sum(1)

  graphdef, state = nnx.split(model)
  prefill = jax.jit(lambda st, t, m: nnx.merge(graphdef, st).prefill(t, m))
  step = jax.jit(lambda st, t, c: nnx.merge(graphdef, st).hidden_states(t, cache=c))
  hidden, prefix = prefill(state, prompts, prompt_mask)
  cache = model.init_cache(4, new, prefix=prefix)
  got = []
  for t in range(new):
    hidden, cache = step(state, completions[:, t:t + 1], cache)
    got.append(np.asarray(model.logits(hidden)))
  got = np.concatenate(got, axis=1)
  for r in range(4):
    np.testing.assert_allclose(got[r], refs[r][n_prompt[r // g]:], atol=1e-4, rtol=0)

  with_prefix = jax.jit(lambda st, blk: nnx.merge(graphdef, st).hidden_states(
      jnp.asarray(completions), prefix=prefix, attention_block=blk), static_argnums=1)
  for blk in (0, 3):
    logits = np.asarray(model.logits(with_prefix(state, blk)))
    for r in range(4):
      np.testing.assert_allclose(logits[r], refs[r][n_prompt[r // g]:], atol=1e-4, rtol=0)


def test_tiny_gemma3_blocked_attention_gradients():
  """Left-padded rows of 13 tokens, queries in blocks of 4 vs all at once: the same hidden
  states and gradients with local layers."""
  graphdef, params = nnx.split(tiny_gemma(seed=3))
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(1, 128, (3, 13)))
  mask = jnp.asarray((np.arange(13)[None] >= np.array([0, 3, 6])[:, None]).astype(np.int32))
  weights = jnp.asarray(rng.normal(size=(3, 13, 32)), jnp.float32) * mask[..., None]

  def loss(params, attention_block):
    hidden = nnx.merge(graphdef, params).hidden_states(tokens, attention_mask_BxL=mask,
                                                       attention_block=attention_block)
    return jnp.sum(jnp.sin(hidden) * weights), hidden

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (g_all, h_all), (g_blocked, h_blocked) = grad(params, 0), grad(params, 4)
  np.testing.assert_allclose(np.asarray(h_blocked), np.asarray(h_all), rtol=1e-5, atol=1e-5)
  assert_grads_close(g_blocked, g_all)


def test_gemma3_presets_and_config_errors():
  from grpo_jax.models import presets

  # Billions of params: 1B as published; 4B / 12B: the published totals (4.3, 12.2) less
  # their ~0.42B vision tower.
  for name, (layers, hidden, window, billions) in {"gemma3-1b": (26, 1152, 512, 1.00),
                                                   "gemma3-4b": (34, 2560, 1024, 3.88),
                                                   "gemma3-12b": (48, 3840, 1024, 11.77)}.items():
    cfg = presets.shapes(name)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("gemma3", layers, hidden)
    assert cfg.num_params() / 1e9 == pytest.approx(billions, abs=0.01), name
    assert cfg.layer_windows().count(0) == layers // 6 and max(cfg.layer_windows()) == window
  with pytest.raises(ValueError, match="final_logit_softcapping"):
    checkpoints.config_from_hf({"architectures": ["Gemma3ForCausalLM"],
                                "final_logit_softcapping": 30.0})
  with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
    ModelConfig(**{**TINY_GEMMA.__dict__, "layer_types": ("full_attention",) * 3})


def test_gguf_shapes_come_from_its_metadata_alone(tmp_path):
  """presets.shapes (what the ahead-of-time tool reads) of a .gguf: the config from its
  metadata, without the tensors read_gguf would need."""
  import gguf

  from grpo_jax.models import presets

  path = str(tmp_path / "m.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(3)
  w.add_embedding_length(16)
  w.add_feed_forward_length(40)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_vocab_size(11)
  w.add_rope_freq_base(5000.0)
  w.add_tensor("token_embd.weight", np.zeros((11, 16), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  cfg = presets.shapes(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
          cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (3, 16, 40, 4, 2, 4, 11)
  assert cfg.rope_theta == 5000.0 and cfg.tie_word_embeddings and cfg.architecture == "llama"
  with pytest.raises(ValueError, match="model.layers.0"):  # the weights are not all there
    checkpoints.read_gguf(path)


@pytest.mark.slow  # reads and dequantises the 135M model
def test_shapes_of_a_known_gguf_model_are_the_loaded_ones():
  from grpo_jax.models import presets

  name = "smollm2-135m-instruct"
  assert presets.shapes(name) == checkpoints.read_gguf(models.embedded_gguf_path(name))[0]
