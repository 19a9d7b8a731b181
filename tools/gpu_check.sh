#!/usr/bin/env bash
# Checks for a machine with an NVIDIA GPU; the project itself never needs one. Runs the
# Pallas paged decode-attention kernel compiled by Triton against XLA on the GPU
# (tests/test_paged_attention.py with MRS_PALLAS_COMPILED=1), the engine's tests on the
# GPU (decode attention goes through that kernel), and tools/bench_engine.py with
# bfloat16 weights and KV cache. All output goes to one file under ${OUT:-results}, whose
# path is printed last. Each step has a timeout, cut to what is left of a 9.5-minute
# budget, so the whole script stays under 10 minutes; a step cut or failed is named at
# the end and makes the exit status 1.
#
# Python: `python` when its jax sees a GPU and it imports mrs's dependencies, pytest and
# torch (the engine tests' reference). Otherwise .venv-gpu: on top of that python's
# packages when its jax sees a GPU, else with jax[cuda12]; pip never touches `python`.
#
#   tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

deadline=$((SECONDS + 570))
JAX_VERSION=0.10.2  # the version the kernel is written against (the tests lower its Triton call without a GPU)
out_dir="${OUT:-results}"
mkdir -p "$out_dir"
log="$(cd "$out_dir" && pwd)/gpu_check-$(date +%Y%m%d-%H%M%S).txt"
failed=()

# step NAME SECONDS COMMAND...: COMMAND with its output appended to the log, stopped after
# SECONDS or at the budget's end, whichever comes first.
step() {
  local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc=0
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "== $name: not run, the time budget is spent" | tee -a "$log"
    failed+=("$name")
    return 1
  fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  ((rc == 0)) || failed+=("$name")
  return "$rc"
}

finish() {
  if ((${#failed[@]})); then
    echo "failed or not run: ${failed[*]}" | tee -a "$log"
  fi
  echo "results: $log"
  exit $((${#failed[@]} ? 1 : 0))
}

export PYTHONPATH="$PWD"  # this checkout's mrs, whichever python runs it
sees_gpu() { "$1" -c 'import jax; jax.devices("gpu")' >/dev/null 2>&1; }
ready() { "$1" -c 'import mrs.engine.engine, pytest, torch' >/dev/null 2>&1; }

echo "# tools/gpu_check.sh, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >>"$log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$log" 2>&1

py=python
if ! { sees_gpu python && ready python; }; then
  if sees_gpu python; then
    venv_flags=(--system-site-packages) jax_req=()  # keep its CUDA jax
  else
    venv_flags=() jax_req=("jax[cuda12]==$JAX_VERSION")
  fi
  [ -x .venv-gpu/bin/python ] || step "venv" 60 python3 -m venv "${venv_flags[@]}" .venv-gpu || finish
  py=.venv-gpu/bin/python
  step "install mrs" 240 "$py" -m pip install --quiet -e . "${jax_req[@]}" pytest || finish
  # As tools/setup.sh's venv has it: torch's CPU build (the reference runs on the host).
  "$py" -c 'import torch' >/dev/null 2>&1 ||
    step "install torch" 120 "$py" -m pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
step "jax on the GPU" 60 "$py" -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices("gpu"))' ||
  finish

# The tests compare with float32 references: GPUs run XLA's float32 matmuls in TF32 by default.
step "Pallas kernel compiled by Triton" 120 env MRS_PALLAS_COMPILED=1 JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$py" -m pytest -q tests/test_paged_attention.py
step "engine tests on the GPU" 180 env JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$py" -m pytest -q tests/test_engine_tiny.py tests/test_kv_pages.py
step "demo models" 90 "$py" tools/fetch_models.py
step "bench_engine, bfloat16" 240 "$py" tools/bench_engine.py --dtype bfloat16
finish
