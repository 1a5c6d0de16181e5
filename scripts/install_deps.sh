#!/usr/bin/env bash
# Installs the build and test dependencies from Debian's packages, only those that are missing.
# The CUDA toolkit (nvcc, cuBLAS, cuSOLVER) is optional and not installed here: without it the CPU
# library, tests and demo are built and the kernels are skipped.
set -euo pipefail
packages=(cmake g++ make libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev dict-devil python3)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
