"""The Colab notebooks: committed without outputs, and run top to bottom on CPU.

On a machine without an accelerator each notebook picks small settings
(colab/README.md lists their times on 2 cores). The kernel is this
interpreter (a kernelspec written for the test, not whatever "python3" a
Jupyter install points at), started in colab/ as Colab would be in the
repository. Each notebook's last cell prints "RESULT {json}": what the
notebook claims to show, checked here.
"""

import json
import math
import os
import sys
import time

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ["custom_loss.ipynb", "quickstart.ipynb", "tpu_training.ipynb"]
BADGE = "https://colab.research.google.com/github/grpo-jax/grpo_jax/blob/main/colab/"


def read(name):
  return nbformat.read(os.path.join(COLAB, name), as_version=4)


def test_colab_holds_the_notebooks():
  assert sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"
  first = nb.cells[0]
  assert first.cell_type == "markdown" and BADGE + name in first.source
  assert "Runtime > Change runtime type > TPU" in first.source


def run(name, tmp_path, monkeypatch) -> dict:
  """Executes the notebook in a kernel on this interpreter; returns its RESULT."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  kernels = tmp_path / "kernels"
  (kernels / "grpo_jax").mkdir(parents=True)
  (kernels / "grpo_jax" / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "grpo_jax", "language": "python"}))
  km = KernelManager(kernel_name="grpo_jax",
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  nb = read(name)
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's workdirs: cleaned up by pytest
  start = time.perf_counter()
  try:
    NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": COLAB}}).execute()
  finally:  # nbclient leaves a kernel it did not create running
    if km.has_kernel:
      km.shutdown_kernel(now=True)
  print(f"\n{name}: {time.perf_counter() - start:.0f} s")
  lines = [line for out in nb.cells[-1].outputs if out.output_type == "stream"
           for line in out.text.splitlines() if line.startswith("RESULT ")]
  assert len(lines) == 1, f"{name}: the last cell printed no RESULT line"
  return json.loads(lines[0][len("RESULT "):])


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
  result = run("quickstart.ipynb", tmp_path, monkeypatch)
  assert len(result["group_rewards"]) == 8
  assert abs(result["group_advantage_sum"]) < 1e-4  # advantages are centred in their group
  assert result["steps"] == 4
  assert len(result["reward"]) == len(result["length"]) == 4
  assert all(math.isfinite(v) for v in result["reward"] + result["length"])
  assert {"reward.png", "length.png"} <= set(result["plots"])


def test_custom_loss(tmp_path, monkeypatch):
  result = run("custom_loss.ipynb", tmp_path, monkeypatch)
  assert len(result) == 2
  for name, r in result.items():
    assert r["reward_first"] < 0.2 and r["reward_last"] > 0.5, (name, r)  # random -> learned


@pytest.mark.slow
def test_tpu_training(tmp_path, monkeypatch):
  result = run("tpu_training.ipynb", tmp_path, monkeypatch)
  assert result["backend"] == "cpu" and result["devices"] == 4
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert result["steps"] == 30
  reward = result["reward"]
  assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.1, reward  # the tiny config's signal
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(result["export_files"])
  assert result["same_tokens"] is True
  assert result["max_logit_diff"] < 1e-4
