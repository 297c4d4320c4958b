#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv and activates it. Source it: `. scripts/env.sh`.
# The venv lives outside the clone, keyed by a hash of the lock files, so a fresh clone on a
# machine that already built the same lock reuses it, and a changed lock gets a new one.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Keyed by the lock files only: they pin every dependency pyproject.toml declares, so editing
# pyproject metadata (scripts, markers) does not rebuild the environment.
key="$(cat "$repo/requirements/lock.txt" "$repo/requirements/nodeps.txt" | sha256sum | cut -c1-16)"
root="${SST_JAX_VENV_ROOT:-$HOME/.cache/sst-jax}"
venv="$root/venv-$key"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -f "$venv/.complete" ]; then
  echo "[env] creating $venv (first time: ~2 minutes)" >&2
  rm -rf "$venv"; mkdir -p "$root"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch is pinned to the CPU wheel on disk (torch==2.13.0); the lock pins everything else.
  "$venv/bin/pip" install -q -r "$repo/requirements/lock.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/pip" install -q --no-deps -r "$repo/requirements/nodeps.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import jax, flax, transformers, torch, peft, gguf" \
    || { echo "[env] install failed" >&2; exit 1; }
  touch "$venv/.complete"
fi
# The package itself is used from the checkout (no install), so every clone tests its own code.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$repo/scripts/bin:$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
set +euo pipefail
