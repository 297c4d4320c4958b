#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv and activates it. Source it: `. scripts/env.sh`
# (what the library and the experiments need), or `. scripts/env.sh test` (also PEFT and pytest
# from requirements/lock-test.txt: the tests' and benchmarks' reference for adapters; a second
# layer of the same venv, installed the first time something asks for it).
# The venv lives outside the clone, keyed by a hash of the lock files, so a fresh clone on a
# machine that already built the same lock reuses it, and a changed lock gets a new one.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
layer="${1:-runtime}"
case "$layer" in runtime|test) ;; *) echo "[env] usage: . scripts/env.sh [test]" >&2; return 2 2>/dev/null || exit 2;; esac
# Keyed by the lock files only: they pin every dependency pyproject.toml declares, so editing
# pyproject metadata (scripts, markers) does not rebuild the environment.
key="$(cat "$repo/requirements/lock.txt" "$repo/requirements/lock-test.txt" "$repo/requirements/nodeps.txt" \
  | sha256sum | cut -c1-16)"
root="${SST_JAX_VENV_ROOT:-$HOME/.cache/sst-jax}"
venv="$root/venv-$key"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -f "$venv/.complete" ]; then
  echo "[env] creating $venv (first time: ~1-2 minutes)" >&2
  rm -rf "$venv"; mkdir -p "$root"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch is pinned to the CPU wheel on disk (torch==2.13.0); transformers reads GGUF tokenizers through it.
  # --no-compile: scripts/check_env.py byte-compiles only what the commands import (45 s less).
  "$venv/bin/pip" install -q --no-compile -r "$repo/requirements/lock.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/pip" install -q --no-compile --no-deps -r "$repo/requirements/nodeps.txt" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$venv/bin/python" "$repo/scripts/check_env.py" runtime \
    || { echo "[env] install failed" >&2; return 1 2>/dev/null || exit 1; }
  touch "$venv/.complete"
fi
if [ "$layer" = test ] && [ ! -f "$venv/.complete-test" ]; then
  echo "[env] adding the test layer (peft, pytest) to $venv" >&2
  "$venv/bin/pip" install -q --no-compile -r "$repo/requirements/lock-test.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" "$repo/scripts/check_env.py" test \
    || { echo "[env] install of the test layer failed" >&2; return 1 2>/dev/null || exit 1; }
  touch "$venv/.complete-test"
fi
# The package itself is used from the checkout (no install), so every clone tests its own code.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$repo/scripts/bin:$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
set +euo pipefail
