"""BERTScore as a reward: the F1 of greedy cosine matching of contextual token embeddings.

Optional: needs the `bert-score` package (and torch), `pip install 'grpo_jax[bertscore]'`,
and a Hugging Face encoder already on disk (`model_path`, a folder with config.json, the
weights and the tokenizer files; nothing is downloaded). Scores come from bert-score's own
`BERTScorer` (Zhang et al., 2020), without idf weighting and without baseline rescaling
unless asked, on the CPU unless told otherwise (on an accelerator host JAX holds the
device's memory).
"""

from __future__ import annotations

import functools
import json
import os
import warnings

from grpo_jax.rewards.functions import (_predicted, _reference_text, _references,
                                        check_extraction)

INSTALL_HINT = "pip install 'grpo_jax[bertscore]'"


def _import_bert_score():
  try:
    import bert_score
  except ImportError as e:
    raise ImportError(f"the bertscore reward needs the bert-score package ({e}): "
                      f"{INSTALL_HINT}") from None
  return bert_score


def model_layers(model_path: str) -> int:
  """The encoder's number of layers, from its config.json."""
  with open(os.path.join(model_path, "config.json")) as f:
    config = json.load(f)
  for key in ("num_hidden_layers", "n_layers", "num_layers"):
    if key in config:
      return int(config[key])
  raise ValueError(f"{model_path}/config.json names no layer count (num_hidden_layers); "
                   "set num_layers")


def check_bertscore_kwargs(model_path: str = "", num_layers: int | None = None,
                           batch_size: int = 32, device: str = "cpu", **extraction) -> None:
  """ValueError (ImportError without the package) for settings that cannot run: a start-up
  check, so a missing folder or package stops the run before the model loads."""
  del device
  if not model_path or not os.path.isfile(os.path.join(model_path, "config.json")):
    raise ValueError(f"model_path={model_path!r}: the bertscore reward needs the folder of a "
                     "Hugging Face encoder on disk (config.json, weights, tokenizer files), "
                     "e.g. --config.reward_kwargs.bertscore.model_path=/models/klue-roberta-base")
  layers = model_layers(model_path)
  if num_layers is not None and not 1 <= int(num_layers) <= layers:
    raise ValueError(f"num_layers={num_layers}: the encoder at {model_path} has layers 1.."
                     f"{layers}")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  check_extraction(**extraction)
  _import_bert_score()


@functools.lru_cache(maxsize=2)
def _scorer(model_path: str, num_layers: int, idf: bool, device: str):
  bert_score = _import_bert_score()
  return bert_score.BERTScorer(model_type=model_path, num_layers=num_layers, idf=idf,
                               device=device)


def bertscore_reward(prompts, completions, reference=None, answer=None, *, model_path: str,
                     num_layers: int | None = None, idf: bool = False, batch_size: int = 32,
                     device: str = "cpu", pattern: str | None = None,
                     answer_group: int | str | None = None, **unused_columns):
  """BERTScore F1 between the <answer> content (else the whole completion) and the
  `reference` column (else `answer`); None where the reference is None.

  Args:
    model_path: folder of a Hugging Face encoder (BERT, RoBERTa, XLM-R, KLUE, ...); loaded
      once per process from disk.
    num_layers: embeddings after this many layers (1 = the first layer's output); None = all
      of them (the last layer). bert-score's tuned defaults are per known model name; a
      folder has none, so choose it for the model (its authors took about 2/3 of the depth).
    idf: weigh tokens by inverse document frequency over the batch's references (bert-score's
      idf); False (the default) weighs every token the same.
    batch_size: completions the encoder embeds at once.
    device: torch device of the encoder ("cpu", "cuda", "cuda:1").
    pattern, answer_group: read the answer through a regular expression (see
      `exact_match_reward`); 0.0 when the completion does not match.
  """
  del prompts, unused_columns
  references = _references(reference, answer, "bertscore")
  rows, cands, refs = [], [], []
  rewards: list[float | None] = []
  for i, (completion, ref) in enumerate(zip(completions, references, strict=True)):
    pred = None if ref is None else _predicted(completion, pattern, answer_group)
    rewards.append(None if ref is None else 0.0)
    if pred is not None:
      rows.append(i)
      cands.append(pred)
      refs.append(_reference_text(ref, pattern, answer_group))
  if rows:
    layers = model_layers(model_path) if num_layers is None else int(num_layers)
    scorer = _scorer(model_path, layers, bool(idf), device)
    if idf:  # this batch's references; the cached scorer's previous weights are replaced
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer.compute_idf(refs)
    _, _, f1 = scorer.score(cands, refs, batch_size=int(batch_size))
    for i, value in zip(rows, f1.tolist()):
      rewards[i] = float(value)
  return rewards


bertscore_reward.check_kwargs = check_bertscore_kwargs
