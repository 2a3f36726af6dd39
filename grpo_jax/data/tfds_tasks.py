"""Tasks whose data tensorflow-datasets reads: GSM8K and MATH (install the `tfds` extra).

Both are `_RowsTask`s: the rows are read once, and example i of a split is
deterministic by index, so resuming is exact.
"""

from __future__ import annotations

import logging

from grpo_jax.data.tasks import _RowsTask
from grpo_jax.rewards import extract_boxed


def _import_tfds(task: str):
  """tensorflow_datasets, or an ImportError that says how to install it."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"task {task!r} reads its data with tensorflow-datasets, which is not "
                      "installed: pip install 'grpo_jax[tfds]' (in a checkout: "
                      "pip install -e '.[tfds]')") from e
  return tfds


def _text(value) -> str:
  """A tfds Text feature as str: data sources return bytes (mock data, str)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _TfdsTask(_RowsTask):
  """A dataset's train and test splits, read through tensorflow-datasets.

  Reading goes through `builder.as_data_source` (ArrayRecord files, random
  access), which needs no TensorFlow. The first use downloads and prepares the
  dataset under `data_dir` (tfds's default: $TFDS_DATA_DIR, else
  ~/tensorflow_datasets); later ones read what is there. Both splits are read
  into memory when the task is built (these datasets are a few MB), so a bad
  split name or a missing dataset fails before training starts.

  The eval split is the dataset's own test split, in its stored order; train
  is reshuffled each epoch as in `_RowsTask`.
  """

  name = ""  # the task's name in TASKS, for error messages

  def __init__(self, data_dir: str | None = None, seed: int = 0, train_split: str = "train",
               eval_split: str = "test"):
    tfds = _import_tfds(self.name)
    builder = self._builder(tfds, data_dir)
    # tfds fetches from its GCS mirror only TFRecord files, useless here: skip that lookup.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    self._splits = {}
    for split, source_split in (("train", train_split), ("eval", eval_split)):
      source = builder.as_data_source(split=source_split)
      rows = [self._row(source[i]) for i in range(len(source))]
      kept = [row for row in rows if row is not None]
      if len(kept) < len(rows):
        logging.warning("task %r: skipped %d of the %d rows of split %r (no answer found)",
                        self.name, len(rows) - len(kept), len(rows), source_split)
      if not kept:
        raise ValueError(f"task {self.name!r}: split {source_split!r} has no usable examples")
      self._splits[split] = kept
    self.seed = seed

  def _builder(self, tfds, data_dir: str | None):
    """The tfds DatasetBuilder to read, storing its data as ArrayRecord."""
    raise NotImplementedError

  def _row(self, record: dict) -> dict | None:
    """One example from a dataset record; None to skip a record without an answer."""
    raise NotImplementedError


class Gsm8k(_TfdsTask):
  """GSM8K grade-school maths word problems (tfds "gsm8k": 7,473 train, 1,319 test).

  "prompt" is the question; "answer" is the number after the solution's final
  "####" ("72"), without thousands commas; "solution" is the full worked
  solution, with its <<calculator>> annotations, for rewards or SFT that want it.
  `train_split` / `eval_split` also accept tfds's "train_socratic" / "test_socratic".
  """

  name = "gsm8k"
  _shuffle_name = "gsm8k"
  default_reward = "accuracy"  # what evaluate.py scores this task with

  def _builder(self, tfds, data_dir):
    # The class itself, not tfds.builder("gsm8k"): tfds registers its built-in
    # builders only once their module is imported, and this imports it.
    return tfds.text.Gsm8k(data_dir=data_dir, file_format="array_record")

  def _row(self, record):
    solution = _text(record["answer"])
    if "####" in solution:
      answer = solution.rsplit("####", 1)[1]
    else:
      answer = _text(record.get("short_answer", ""))
    answer = answer.strip().replace(",", "")
    if not answer:
      return None
    return {"prompt": _text(record["question"]), "answer": answer, "solution": solution}


MATH_HF_REPO = "DigitalLearningGmbH/MATH-lighteval"


class Math(_TfdsTask):
  """MATH competition problems (Hendrycks et al. 2021: 7,500 train, 5,000 test).

  tensorflow-datasets has no MATH builder of its own ("math_dataset" is
  DeepMind's synthetic Mathematics Dataset, another thing), so by default this
  reads the Hugging Face copy `hf_repo_id` through tfds's
  HuggingfaceDatasetBuilder, which needs the `datasets` package and the Hub on
  first use. `tfds_name` instead reads a tfds dataset already prepared in
  `data_dir` (e.g. "huggingface:digitallearninggmbh__math_lighteval", or one
  of your own) with the same fields.

  "prompt" is the problem; "answer" is the content of the solution's last
  \\boxed{} (a LaTeX answer: score it with the "math_accuracy" reward); the
  full "solution" and, when present, "level" ("Level 1" .. "Level 5") and
  "type" (the subject) are kept as columns. Rows without a \\boxed{} answer
  are skipped.
  """

  name = "math"
  _shuffle_name = "math"
  default_reward = "math_accuracy"  # what evaluate.py scores this task with

  def __init__(self, data_dir: str | None = None, seed: int = 0, train_split: str = "train",
               eval_split: str = "test", tfds_name: str | None = None,
               hf_repo_id: str = MATH_HF_REPO, hf_config: str | None = None):
    self._tfds_name, self._hf_repo_id, self._hf_config = tfds_name, hf_repo_id, hf_config
    super().__init__(data_dir=data_dir, seed=seed, train_split=train_split, eval_split=eval_split)

  def _builder(self, tfds, data_dir):
    if self._tfds_name:
      return tfds.builder(self._tfds_name, data_dir=data_dir, file_format="array_record")
    try:
      import datasets  # noqa: F401 (tfds's Hugging Face builder needs it)
    except ImportError as e:
      raise ImportError(f"task 'math' reads {self._hf_repo_id} from the Hugging Face Hub, which "
                        "needs the datasets package: pip install datasets (or give tfds_name, "
                        "a tfds dataset prepared in data_dir)") from e
    return tfds.dataset_builders.HuggingfaceDatasetBuilder(
        hf_repo_id=self._hf_repo_id, hf_config=self._hf_config, data_dir=data_dir,
        file_format="array_record")

  def _row(self, record):
    solution = _text(record["solution"])
    answer = extract_boxed(solution)
    if answer is None or not answer.strip():
      return None
    row = {"prompt": _text(record["problem"]), "answer": answer.strip(), "solution": solution}
    row.update({key: _text(record[key]) for key in ("level", "type") if key in record})
    return row


