#!/usr/bin/env bash
# README command 2: set up the environment, then run the test suite (offline, CPU).
# SST_JAX_SLOW=1 also runs tests marked slow (135M model, end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh test
set -euo pipefail
export JAX_PLATFORMS=cpu
args=(-q)
# SST_JAX_HEAVY=1 also runs tests marked heavy (8-device experiment runs, two-process runs: 30+ min).
marks=()
if [ "${SST_JAX_SLOW:-0}" != "1" ]; then marks+=("not slow"); fi
if [ "${SST_JAX_HEAVY:-0}" != "1" ]; then marks+=("not heavy"); fi
if [ ${#marks[@]} -gt 0 ]; then expr="${marks[0]}"; for m in "${marks[@]:1}"; do expr="$expr and $m"; done; args+=(-m "$expr"); fi
set +e
python -m pytest "${args[@]}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit $rc
