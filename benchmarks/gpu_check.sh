#!/usr/bin/env bash
# The GPU checks of the MSDA op in one run, for a bare GPU machine (torch, ninja, nvcc; no Ray, no network).
#
#   benchmarks/gpu_check.sh                       # every step, results under $OUT (default benchmarks/results/gpu)
#   STEPS="build tests sync" benchmarks/gpu_check.sh
#
# Through the device tool (10 minutes a command), in two calls on the same warm machine (the build is cached in
# build/msda-gpu): STEPS="env build tests sync", then STEPS="build msda train sanitizer ncu" (build is then a no-op).
#
# Steps, in order (each has its own time limit; a failed step does not stop the later ones):
#   env        python, torch, GPU, nvcc, compute-sanitizer and ncu found
#   build      the op for sm_90 (TORCH_CUDA_ARCH_LIST, default 9.0) into build/msda-gpu; then "registers": registers,
#              local memory and SASS reductions per kernel (cuobjdump), failing over the backward's budget
#   tests      pytest -m gpu on tests/test_ops*.py (junit XML)
#   msda       benchmarks/msda.py --device cuda: encoder, decoder and encoder-800; fp32, bf16, fp16; fwd and bwd
#   train      benchmarks/train_step.py --device cuda, fp32 and bf16 autocast
#   sync       torch.cuda.set_sync_debug_mode("error") around direct op calls: no host synchronisation
#   sanitizer  compute-sanitizer memcheck, racecheck and synccheck on a small subset of op calls
#   ncu        Nsight Compute on the backward: achieved occupancy, registers, reduction requests and sectors
# Without a CUDA device (or without the tool a step needs) the step is reported as skipped, so the script dry-runs
# on a CPU machine. Files written (8 at most, for the device tool's return limit): summary.json, gpu_check.log,
# tests.xml, msda-cuda.json, train_step-cuda-fp32.json, train_step-cuda-bf16.json, ncu-backward.csv.
# Exit status: 0 when no step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-env build tests msda train sync sanitizer ncu}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # ddetr is not installed on the GPU machine
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export DDETR_MSDA_BUILD_DIR=${DDETR_MSDA_BUILD_DIR:-$ROOT/build/msda-gpu}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
LOG=$OUT/gpu_check.log
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
: >"$LOG"
declare -a SUMMARY=()
FAILED=0

find_tool() {  # PATH, then the CUDA toolkit and Nsight folders
  command -v "$1" 2>/dev/null && return
  local c
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/$1" /usr/local/cuda/bin/$1 /opt/nvidia/nsight-compute/*/$1; do
    [[ -x "$c" ]] && { echo "$c"; return; }
  done
}

record() {  # name status seconds
  SUMMARY+=("{\"step\": \"$1\", \"status\": \"$2\", \"seconds\": $3}")
  printf '== %-10s %s (%s s)\n' "$1" "$2" "$3" | tee -a "$LOG"
}

# run_step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, its output in the log and on stdout.
run_step() {
  local name=$1 limit=$2 start rc
  shift 2
  printf '\n== %s: %s\n' "$name" "$*" | tee -a "$LOG"
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then
    record "$name" ok $(($(date +%s) - start))
  else
    [[ $rc -eq 124 ]] && rc="timeout after $limit s"
    record "$name" "failed ($rc)" $(($(date +%s) - start))
    FAILED=1
  fi
}

skip() { printf '\n' >>"$LOG"; record "$1" "skipped: $2" 0; }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
NVCC=$(find_tool nvcc)
SANITIZER=$(find_tool compute-sanitizer)
NCU=$(find_tool ncu)
CUOBJDUMP=$(find_tool cuobjdump)

cat >"$SCRATCH/env.py" <<'EOF'
import subprocess
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for tool in sys.argv[1:]:
    name, _, path = tool.partition("=")
    print(f"{name}: {path or 'not found'}")
commit = subprocess.run(["git", "log", "--oneline", "-1"], capture_output=True, text=True).stdout.strip()
print("commit", commit or "unknown (no git)")
EOF

# Small op calls for the sanitizers and the sync check: every vector width, both backward modes, an empty level,
# a level that disagrees with S (the device guard), points outside.
cat >"$SCRATCH/op_subset.py" <<'EOF'
import sys

import torch

sys.path.insert(0, "tests")
from ddetr.ops import build  # noqa: E402
from test_ops import make_inputs  # noqa: E402

build.load_extension()
forward, backward = torch.ops.ddetr.ms_deform_attn_forward, torch.ops.ddetr.ms_deform_attn_backward
sync_check = "--sync" in sys.argv
cases = []
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for D in (1, 2, 12, 30, 32, 64, 256):
        cases.append(make_inputs(2, [(6, 7), (3, 4), (0, 3)], 9, 3, 2, D, dtype=dtype, device="cuda", spread=0.5))
bad = list(make_inputs(2, [(6, 7), (3, 4)], 9, 2, 2, 16, dtype=torch.float32, device="cuda"))
bad[1] = torch.tensor([[6, 7], [300, 400]], device="cuda")
cases.append(tuple(bad))
for inputs in cases:  # warm-up: lazy initialisation may synchronise once
    out = forward(*inputs)
    for deterministic in (False, True):
        backward(torch.randn_like(out), *inputs, deterministic)
torch.cuda.synchronize()
if sync_check:
    torch.cuda.set_sync_debug_mode("error")
for inputs in cases:
    out = forward(*inputs)
    grad = torch.randn_like(out)
    for deterministic in (False, True):
        backward(grad, *inputs, deterministic)
torch.cuda.set_sync_debug_mode("default")
torch.cuda.synchronize()
print(f"{len(cases)} cases, forward + both backward modes: ok" + (" (no host synchronisation)" if sync_check else ""))
EOF

# The backward at the encoder-800 shape (N = 2), fp32 and bf16, both modes: what ncu measures.
cat >"$SCRATCH/backward_800.py" <<'EOF'
import sys

import torch

sys.path.insert(0, "benchmarks")
from ddetr.ops import build  # noqa: E402
from msda import LEVELS_800, make_inputs  # noqa: E402

build.load_extension()
for dtype in (torch.float32, torch.bfloat16):
    inputs = make_inputs(2, LEVELS_800, None, "cuda", dtype)
    inputs = [t.detach() for t in inputs]
    out = torch.ops.ddetr.ms_deform_attn_forward(*inputs)
    grad = torch.randn_like(out)
    for deterministic in (False, True):
        torch.ops.ddetr.ms_deform_attn_backward(grad, *inputs, deterministic)
torch.cuda.synchronize()
print("encoder-800 backward: fp32, bf16; atomic, deterministic")
EOF

if wanted env; then
  run_step env 60 "$PYTHON" "$SCRATCH/env.py" "nvcc=$NVCC" "compute-sanitizer=$SANITIZER" "ncu=$NCU" \
    "cuobjdump=$CUOBJDUMP"
fi

if wanted build; then
  if [[ $CUDA != 1 || -z $NVCC ]]; then
    skip build "no CUDA device or no nvcc"
  else
    run_step build 600 "$PYTHON" -c 'from ddetr.ops import build; print(build.build_extension(verbose=True))'
    if [[ -n $CUOBJDUMP ]]; then  # registers, local memory and SASS reductions of the kernels as built; budget
      run_step registers 120 env CUOBJDUMP="$CUOBJDUMP" "$PYTHON" tests/nvcc.py \
        --res-usage "$DDETR_MSDA_BUILD_DIR/ddetr_msda_cuda.so"
    fi
  fi
fi

if wanted tests; then
  # On a CPU machine the tests are collected and skip ("needs a CUDA device"): they import without Ray or a GPU.
  run_step tests 480 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/tests.xml" tests/test_ops.py \
    tests/test_ops_cuda.py tests/test_ops_build.py
fi

if wanted msda; then
  if [[ $CUDA != 1 ]]; then
    skip msda "no CUDA device"
  else
    run_step msda 600 "$PYTHON" benchmarks/msda.py --device cuda --repeat 10 --out "$OUT/msda-cuda.json"
  fi
fi

if wanted train; then
  if [[ $CUDA != 1 ]]; then
    skip train "no CUDA device"
  else
    for amp in off bf16; do
      run_step "train-${amp/off/fp32}" 600 "$PYTHON" benchmarks/train_step.py --device cuda --amp "$amp" \
        --out "$OUT/train_step-cuda-${amp/off/fp32}.json"
    done
  fi
fi

if wanted sync; then
  if [[ $CUDA != 1 ]]; then
    skip sync "no CUDA device"
  else
    run_step sync 300 "$PYTHON" "$SCRATCH/op_subset.py" --sync
  fi
fi

if wanted sanitizer; then
  if [[ $CUDA != 1 || -z $SANITIZER ]]; then
    skip sanitizer "no CUDA device or no compute-sanitizer"
  else
    for tool in memcheck racecheck synccheck; do
      # No caching allocator: every tensor its own allocation, so memcheck sees an access past a tensor's end.
      run_step "$tool" 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
        "$PYTHON" "$SCRATCH/op_subset.py"
    done
  fi
fi

if wanted ncu; then
  if [[ $CUDA != 1 || -z $NCU ]]; then
    skip ncu "no CUDA device or no ncu"
  else
    # Achieved vs theoretical occupancy, the register limit, and the reductions' requests and sectors (L1 and L2).
    wanted_metrics="sm__warps_active.avg.pct_of_peak_sustained_active sm__maximum_warps_per_active_cycle_pct
      launch__registers_per_thread launch__occupancy_limit_registers launch__grid_size gpu__time_duration.sum
      l1tex__t_requests_pipe_lsu_mem_global_op_red.sum l1tex__t_sectors_pipe_lsu_mem_global_op_red.sum
      lts__t_requests_op_red.sum lts__t_sectors_op_red.sum lts__t_sectors_op_read.sum dram__bytes.sum"
    # One unknown name makes ncu refuse them all: keep those this ncu lists for the H200's chip (all if it lists none).
    known=$("$NCU" --query-metrics --chip gh100 2>/dev/null | awk '{print $1}')
    metrics=""
    for m in $wanted_metrics; do
      if [[ -z $known ]] || grep -qx "${m%%.*}" <<<"$known"; then metrics+=${metrics:+,}$m; fi
    done
    [[ -n $metrics ]] || metrics=$(tr -s ' \n' ',' <<<"$wanted_metrics" | sed 's/^,//; s/,$//')
    run_step ncu 600 bash -c "\"$NCU\" --clock-control none --kernel-name regex:backward_kernel --metrics $metrics \
      --csv --page raw --log-file \"$OUT/ncu-backward.csv\" \"$PYTHON\" \"$SCRATCH/backward_800.py\"; rc=\$?; \
      cat \"$OUT/ncu-backward.csv\"; exit \$rc"
  fi
fi

{
  printf '{\n  "machine": "%s",\n  "cuda_available": %s,\n  "steps": [\n' "$(uname -n)" \
    "$([[ $CUDA == 1 ]] && echo true || echo false)"
  for i in "${!SUMMARY[@]}"; do
    printf '    %s%s\n' "${SUMMARY[$i]}" "$([[ $i -lt $((${#SUMMARY[@]} - 1)) ]] && echo ,)"
  done
  printf '  ]\n}\n'
} >"$OUT/summary.json.tmp" && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
printf '\nresults in %s\n' "$OUT"
exit $FAILED
