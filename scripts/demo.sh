#!/usr/bin/env bash
# Builds the library's demo and prints compression ratio and attention fidelity on synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake --preset cpu
cmake --build --preset cpu -j "$(nproc)" --target spectralkv_demo
build/cpu/examples/spectralkv_demo "$@"
