#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in llama-cpp-python's sdist.
#
# Why from the sdist: it pins exactly the llama.cpp revision the installed llama-cpp-python was built
# from, so `localroute bench --vs llama-server=build/llama-server/bin/llama-server` compares the same
# kernels. PyPI is the only network source needed. The binary lands in an ignored folder (build/);
# never commit it.
#
# Usage: scripts/build_llama_server.sh [OUT_DIR]   (default build/llama-server; ~5-10 min on 2 cores)
# Env:   PYTHON (default .venv/bin/python), LLAMA_CPP_PYTHON_VERSION (default: the installed one),
#        JOBS (default: nproc), CMAKE_ARGS (extra llama.cpp options, e.g. -DGGML_NATIVE=ON).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/build/llama-server}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-$(nproc)}"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}"
SRC="$OUT/src"
mkdir -p "$SRC"

if [ ! -d "$SRC/llama_cpp_python-$VERSION" ]; then
  echo "downloading llama-cpp-python==$VERSION sdist" >&2
  "$PYTHON" -m pip download --quiet --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$VERSION" -d "$SRC"
  tar -xzf "$SRC"/llama_cpp_python-"$VERSION".tar.gz -C "$SRC"
fi
LLAMA_DIR="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
test -f "$LLAMA_DIR/CMakeLists.txt" || { echo "no llama.cpp sources in the sdist at $LLAMA_DIR" >&2; exit 1; }

# shellcheck disable=SC2086  # CMAKE_ARGS is a list of options on purpose
cmake -S "$LLAMA_DIR" -B "$OUT/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF ${CMAKE_ARGS:-}
cmake --build "$OUT/cmake" --target llama-server -j "$JOBS"

mkdir -p "$OUT/bin"
cp "$OUT/cmake/bin/llama-server" "$OUT/bin/llama-server"
echo "$OUT/bin/llama-server"
