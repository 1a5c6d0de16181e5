#!/usr/bin/env bash
# Builds and runs the compression GPU tests and benchmark; writes logs and the raw Google Benchmark
# JSON into OUT_DIR (default bench/results).
#
#   bench/run_compress_bench.sh [OUT_DIR]
#
# Environment:
#   BUILD_DIR   build directory (default build-compress)
#   ARCH        CUDA architecture (default 90)
#   BENCH_ARGS  extra arguments for bench_compress (e.g. --benchmark_filter=N:512/)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-bench/results}
BUILD_DIR=${BUILD_DIR:-build-compress}
ARCH=${ARCH:-90}
mkdir -p "$OUT_DIR" "$BUILD_DIR"

cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >"$OUT_DIR/compress-configure.log"
cmake --build "$BUILD_DIR" -j "$(nproc)" --target spectralkv_gpu_tests bench_compress >"$OUT_DIR/compress-build.log" 2>&1
TESTS="$BUILD_DIR/tests/spectralkv_gpu_tests"
BENCH="$BUILD_DIR/bench/bench_compress"

STAMP=$(date -u +%Y-%m-%d)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$OUT_DIR/compress-gpu.txt" 2>&1 || true
tests_rc=0
"$TESTS" --gtest_filter='CompressGpu.*' 2>&1 | tee "$OUT_DIR/compress-tests.log" || tests_rc=$?
"$BENCH" --benchmark_out="$OUT_DIR/compress-$STAMP.json" --benchmark_out_format=json \
  --benchmark_counters_tabular=true ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/compress-bench.log"
exit "$tests_rc"
