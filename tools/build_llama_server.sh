#!/usr/bin/env bash
# Build llama.cpp's own llama-server (the speed peer of tools/bench_serve.py) from the
# llama.cpp sources vendored in the llama-cpp-python sdist, with SIMD flags for this CPU.
# Output: $LLAMA_BUILD_DIR/bin/llama-server (default ~/.cache/mrs/llama.cpp/build).
# Never part of the test path; ~8 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${LLAMA_WORK_DIR:-$HOME/.cache/mrs/llama.cpp}"
BUILD="${LLAMA_BUILD_DIR:-$WORK/build}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="$ROOT/.venv/bin/python"
mkdir -p "$WORK"
cd "$WORK"
SDIST="llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  echo "downloading $SDIST"
  "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$SRC" ] || tar xzf "$SDIST"

# A native build can pick AVX-512 on a build host whose VM then traps it ("Illegal
# instruction"), so the flags name what /proc/cpuinfo reports instead.
has() { grep -qw "$1" /proc/cpuinfo; }
FLAGS=(-DGGML_NATIVE=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON)
for f in avx2:AVX2 fma:FMA f16c:F16C; do
  if has "${f%%:*}"; then FLAGS+=("-DGGML_${f##*:}=ON"); else FLAGS+=("-DGGML_${f##*:}=OFF"); fi
done
if has avx512f && has avx512bw && has avx512vl; then FLAGS+=(-DGGML_AVX512=ON); else FLAGS+=(-DGGML_AVX512=OFF); fi
echo "cmake flags: ${FLAGS[*]}"
cmake -S "$SRC" -B "$BUILD" "${FLAGS[@]}" > "$WORK/cmake.log"
cmake --build "$BUILD" --target llama-server -j "$(nproc)"
echo "built $BUILD/bin/llama-server"
