#!/usr/bin/env bash
# Builds everything and runs the whole test suite: the release build (CUDA kernels compiled when nvcc is
# found on PATH, through CUDACXX or CUDA_PATH, or in /usr/local/cuda/bin; GPU tests skip without a
# device; the real-model tests fetch the model and text first) and the CPU tests again under ASan + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
scripts/install_deps.sh
# The real-model tests run on SmolLM2-135M and The Devil's Dictionary (they skip without them).
scripts/fetch_model.sh
scripts/fetch_text.sh
# CMake looks for nvcc only on PATH, in CUDACXX and under $CUDA_PATH/bin, not in the toolkit's default
# location; put that on PATH when none of them is set.
if ! command -v nvcc >/dev/null && [[ -z "${CUDACXX:-}" && -z "${CUDA_PATH:-}" && -d /usr/local/cuda/bin ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
cmake --preset release
cmake --build --preset release -j "$jobs"
ctest --preset release -j "$jobs"
cmake --preset asan
cmake --build --preset asan -j "$jobs"
ctest --preset asan -j "$jobs"
