#!/usr/bin/env bash
# Builds everything and runs the whole test suite: the release build (CUDA kernels compiled when nvcc is
# present; GPU tests skip without a device; the real-model tests fetch the model and text first) and
# the CPU tests again under ASan + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
scripts/install_deps.sh
# The real-model tests run on SmolLM2-135M and The Devil's Dictionary (they skip without them).
scripts/fetch_model.sh
scripts/fetch_text.sh
cmake --preset release
cmake --build --preset release -j "$jobs"
ctest --preset release -j "$jobs"
cmake --preset asan
cmake --build --preset asan -j "$jobs"
ctest --preset asan -j "$jobs"
