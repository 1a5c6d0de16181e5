#!/usr/bin/env bash
# Installs the build and test dependencies from Debian's packages, only those that are missing, then
# checks that CMake is at least 3.25 (CMakeLists.txt and CMakePresets.json need it) and, when the
# distro's CMake is older, installs a newer one from PyPI with pip.
# The CUDA toolkit (nvcc, cuBLAS, cuSOLVER) is optional and not installed here: without it the CPU
# library, tests and demo are built and the kernels are skipped.
set -euo pipefail
packages=(cmake g++ make ninja-build libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev dict-devil python3
          python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# CMake >= 3.25: the distro's cmake may be older (e.g. Debian 11, Ubuntu 22.04).
cmake_ok() {
  local v
  v=$(cmake --version 2>/dev/null | sed -n '1s/^cmake version \([0-9]*\.[0-9]*\).*/\1/p')
  [[ -n "$v" ]] && printf '%s\n3.25\n' "$v" | sort -C -V -r
}
if ! cmake_ok; then
  echo "cmake $(cmake --version 2>/dev/null | sed -n '1s/^cmake version //p') is older than 3.25; installing cmake>=3.25 with pip"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  # --break-system-packages: needed on Debian 12 / Ubuntu 23.04 and later (PEP 668); older pips lack it.
  pip_flags=(--quiet)
  [[ "$(python3 -m pip install --help)" == *--break-system-packages* ]] && pip_flags+=(--break-system-packages)
  $sudo_cmd python3 -m pip install "${pip_flags[@]}" 'cmake>=3.25'
  hash -r
  cmake_ok || { echo "error: cmake >= 3.25 still not first on PATH ($(command -v cmake))" >&2; exit 1; }
fi
