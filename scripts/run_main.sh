#!/usr/bin/env bash
# README command 1: set up the environment, then run the main job (all three experiments,
# minimal mode) on the embedded default model smollm2-135m, offline. Extra args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
set -euo pipefail
exec python experiments/run_real_experiments.py --mode minimal --model smollm2-135m --experiment all "$@"
