"""The bertscore reward on a tiny randomly initialised BERT written to a temporary folder:
the bert-score package's own numbers, batched, and BERTScore computed here from the encoder's
hidden states (greedy cosine matching, [CLS] and [SEP] weighing 0)."""

import builtins
import math

import numpy as np
import pytest

from grpo_jax import rewards

torch = pytest.importorskip("torch")
bert_score = pytest.importorskip("bert_score")

WORDS = ("the cat sat on mat dog ran under a big small red 나는 학교 에 갔다 오늘 어제 "
         "사과 를 먹었다 고양이 가 잔다 ##다 ##는").split()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  """A 3-layer BERT with random weights and a word-piece vocabulary, saved as a Hugging Face
  folder (config.json, weights, vocab.txt, tokenizer config)."""
  import transformers

  path = tmp_path_factory.mktemp("tiny_bert")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
  (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  tokenizer = transformers.BertTokenizer(str(path / "vocab.txt"), do_lower_case=False,
                                         model_max_length=64)
  tokenizer.save_pretrained(str(path))
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64)
  model = transformers.BertModel(config).eval()
  model.save_pretrained(str(path))
  return str(path), tokenizer, model


def by_hand(tokenizer, model, candidate: str, reference: str, layers: int) -> float:
  """BERTScore F1 of one pair: unit hidden states after `layers` layers; each token's best
  cosine against all tokens of the other side; averages over tokens other than [CLS], [SEP]."""
  def embed(text):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
      hidden = model(ids, output_hidden_states=True).hidden_states[layers][0].double().numpy()
    special = np.isin(ids[0].numpy(), [tokenizer.cls_token_id, tokenizer.sep_token_id])
    return hidden / np.linalg.norm(hidden, axis=-1, keepdims=True), ~special

  c, c_keep = embed(candidate)
  r, r_keep = embed(reference)
  sim = c @ r.T
  precision = sim.max(axis=1)[c_keep].mean()
  recall = sim.max(axis=0)[r_keep].mean()
  return 2 * precision * recall / (precision + recall)


PAIRS = [  # (completion, reference)
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the dog ran under a big mat", "the cat sat on the mat"),
    ("나는 학교 에 갔다", "나는 오늘 학교 에 갔다"),
    ("고양이 가 잔다", "사과 를 먹었다"),
    ("a small red cat", "the big dog"),
]


def test_bertscore_matches_the_bert_score_package_batched(encoder):
  path, _, _ = encoder
  completions, references = map(list, zip(*PAIRS))
  for layers in (1, 3):
    got = rewards.bertscore_reward(None, completions, reference=references, model_path=path,
                                   num_layers=layers, batch_size=2)
    _, _, want = bert_score.score(completions, references, model_type=path, num_layers=layers,
                                  idf=False, batch_size=64)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
    assert all(isinstance(x, float) for x in got)
  assert len({round(x, 4) for x in got}) == len(got)  # distinct pairs, distinct scores


@pytest.mark.parametrize("layers", [1, 2, None])
def test_bertscore_is_greedy_cosine_matching(encoder, layers):
  path, tokenizer, model = encoder
  for completion, reference in PAIRS:  # one at a time: no padding in the batch
    got, = rewards.bertscore_reward(None, [completion], reference=[reference], model_path=path,
                                    num_layers=layers)
    want = by_hand(tokenizer, model, completion, reference, layers or 3)
    assert math.isclose(got, want, abs_tol=1e-5), (completion, reference)
  got, = rewards.bertscore_reward(None, [PAIRS[0][0]], answer=[PAIRS[0][1]], model_path=path,
                                  num_layers=layers)
  assert got == pytest.approx(1.0, abs=1e-6)


def test_bertscore_from_config_keywords_and_template(encoder):
  path, _, _ = encoder
  kwargs = {"bertscore": {"model_path": path, "num_layers": 2, "pattern": r"<a>(.*)</a>",
                          "answer_group": 1}}
  (name, fn), = rewards.get_reward_fns(["bertscore"], kwargs)[0]
  got = fn(prompts=None, completions=["<a>the cat sat</a>", "the cat sat", "<a>x</a>"],
           reference=["<a>the cat sat</a>", "the cat sat", None])
  assert got[0] == pytest.approx(1.0, abs=1e-6)
  assert got[1:] == [0.0, None]  # no template: 0; no reference: None


def test_bertscore_settings_are_checked_at_start_up(encoder, tmp_path, monkeypatch):
  path, _, _ = encoder
  with pytest.raises(ValueError, match="needs the keyword 'model_path'"):
    rewards.get_reward_fns(["bertscore"])
  with pytest.raises(ValueError, match="the folder of a Hugging Face encoder on disk"):
    rewards.get_reward_fns(["bertscore"], {"bertscore": {"model_path": str(tmp_path)}})
  with pytest.raises(ValueError, match=r"num_layers=7: .* has layers 1..3"):
    rewards.get_reward_fns(["bertscore"], {"bertscore": {"model_path": path, "num_layers": 7}})
  real_import = builtins.__import__

  def no_bert_score(name, *args, **kwargs):
    if name == "bert_score":
      raise ImportError("No module named 'bert_score'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_bert_score)
  with pytest.raises(ImportError, match=r"pip install 'grpo_jax\[bertscore\]'"):
    rewards.get_reward_fns(["bertscore"], {"bertscore": {"model_path": path}})
