#!/usr/bin/env bash
# README command 2: set up the environment, then run the test suite (offline, CPU).
# SST_JAX_SLOW=1 also runs tests marked slow (135M model, end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
set -euo pipefail
export JAX_PLATFORMS=cpu
args=(-q)
if [ "${SST_JAX_SLOW:-0}" != "1" ]; then args+=(-m "not slow"); fi
set +e
python -m pytest "${args[@]}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit $rc
