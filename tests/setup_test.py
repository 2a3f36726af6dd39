"""The install story: setup.sh's modes, CI running the README's test command, the accelerator
extras pinned to the tested JAX."""

import ast
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def test_ci_runs_the_readmes_test_command():
  quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", read("README.md"), re.S).group(1)
  commands = quickstart.strip().splitlines()
  assert commands[0].startswith("bash scripts/setup.sh && ")  # the run: runtime only
  assert commands[1] == ('bash scripts/setup.sh test && .venv/bin/python -m pytest -q '
                         '-m "not slow" tests')
  ci = read(".ci/run").splitlines()
  assert commands[1] in ci
  # The slow tests the README's command leaves out run in CI after it.
  assert ".venv/bin/python -m pytest -q -m slow tests" in ci[ci.index(commands[1]):]


def test_accelerator_extras_pin_the_tested_jax():
  tree = ast.parse(read("setup.py"))
  version = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and node.targets[0].id == "JAX_VERSION")
  pins = dict(line.split("==") for line in read("requirements.txt").splitlines()
              if "==" in line and not line.startswith("#"))
  assert pins["jax"] == pins["jaxlib"] == version
  setup_call = read("setup.py")
  assert '"cuda12": [f"jax[cuda12]=={JAX_VERSION}"]' in setup_call
  assert '"tpu": [f"jax[tpu]=={JAX_VERSION}"]' in setup_call
  assert "'.[cuda12,tpu]'" in read(".ci/run")  # resolved in CI


def test_runtime_pins_leave_out_the_test_stack():
  runtime = read("requirements.txt")
  for package in ("torch", "pytest", "tensorflow-datasets", "accelerate"):
    assert not re.search(rf"^{package}==", runtime, re.M), package
    assert re.search(rf"^{package}==", read("requirements-test.txt"), re.M), package


def test_setup_rejects_an_unknown_mode(tmp_path):
  proc = subprocess.run(["bash", "scripts/setup.sh", "tests"], cwd=REPO, capture_output=True,
                        text=True, env=dict(os.environ, GRPO_JAX_CACHE=str(tmp_path)))
  assert proc.returncode == 2 and "usage: bash scripts/setup.sh [test]" in proc.stderr
  assert os.listdir(tmp_path) == []  # nothing built
