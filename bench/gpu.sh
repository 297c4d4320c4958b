#!/usr/bin/env bash
# One-GPU benchmark at Mistral-7B shape (random weights, no download); see bench/gpu.py.
#   bash bench/gpu.sh             # on a GPU machine; installs jax[cuda12]==0.10.2 + the lock's pins if needed
#   bash bench/gpu.sh --dry-run   # tiny dims on CPU (uses the project venv)
# The table goes to $OUT/gpu.md (+ .json) when OUT is set, else bench/out/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device machines have python3 only (3.12, jax 0.11 + CUDA preinstalled, no network).
py="${PYTHON:-$(command -v python3 || command -v python)}"
if [ "${1:-}" = "--dry-run" ]; then
  [ -f scripts/env.sh ] && . scripts/env.sh
  export JAX_PLATFORMS=cpu
  py=python  # the project venv's
else
  if ! "$py" -c "import jax, flax, transformers; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
    echo "[gpu.sh] no GPU jax in $py: installing jax[cuda12]==0.10.2 (needs network)" >&2
    pins=$(grep -E '^(flax|optax|orbax-checkpoint|transformers|tokenizers|safetensors|absl-py|tqdm|numpy|scipy|gguf)==' requirements/lock.txt)
    # shellcheck disable=SC2086
    "$py" -m pip install -q "jax[cuda12]==0.10.2" $pins
  fi
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi
export TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
exec "$py" bench/gpu.py "$@"
