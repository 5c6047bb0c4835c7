#!/usr/bin/env bash
# The GPU checks of ddetr in one run, inside one deadline: a thin wrapper of benchmarks/gpu_check.py (its docstring
# lists the steps, the files written and the test hook).
#
# Through the device tool, the caller substituting the commit (the machine may have no git), with
# timeout_s = DEADLINE_S + 60 and carry [".official", ".whl"] (the official sources and the pycocotools wheel):
#
#   GIT_COMMIT=<sha> DEADLINE_S=420 bash benchmarks/gpu_check.sh
#   GIT_COMMIT=<sha> DEADLINE_S=240 STEPS="build sanitizer ncu extras" bash benchmarks/gpu_check.sh   # second call
#
# (the second call's build is a no-op on the same warm machine, whose build/msda-gpu is kept; a rebuild on a fresh one)
#
# Locally it dry-runs (every CUDA step skipped, well under a minute): bash benchmarks/gpu_check.sh
# Environment: GIT_COMMIT, DEADLINE_S (default 420), STEPS (names or groups; default all), OUT (default
# build/gpu-check-out, ignored by git), PYTHON (default the checkout's .venv if present, else python3).
# summary.json under OUT is rewritten after every step, so a run killed at any moment leaves what it did.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py"
