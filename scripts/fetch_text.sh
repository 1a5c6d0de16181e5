#!/usr/bin/env bash
# Writes data/devil.txt: The Devil's Dictionary (Ambrose Bierce, public domain) from Debian's
# dict-devil package, gunzipped, with the dictd header (the 00-database-* entries) stripped.
# Installs dict-devil with apt-get (through sudo when not root) when it is missing. Idempotent.
# Usage: scripts/fetch_text.sh [DEST_DIR]   (default: <repo>/data)
set -euo pipefail

readonly ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly DEST="${1:-$ROOT/data}"
readonly SOURCE="/usr/share/dictd/devil.dict.dz"
readonly TARGET="$DEST/devil.txt"

if [[ ! -f "$SOURCE" ]]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dict-devil
fi
[[ -f "$SOURCE" ]] || { echo "error: $SOURCE missing after installing dict-devil" >&2; exit 1; }

mkdir -p "$DEST"
# dictd keeps its own header as entries named 00-database-* (url, short name, info = the preface of
# the e-text, alphabet); the .index gives every entry's offset and length in base64 digits. The
# dictionary proper is the span from the first to the end of the last real headword entry.
gzip -dc "$SOURCE" | python3 -c '
import string, sys
digits = {c: i for i, c in enumerate(string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/")}
def b64(s):
    n = 0
    for c in s:
        n = n * 64 + digits[c]
    return n
spans = []
for line in open(sys.argv[1], encoding="utf-8"):
    word, off, size = line.rstrip("\n").split("\t")[:3]
    if not word.startswith("00database"):
        spans.append((b64(off), b64(off) + b64(size)))
data = sys.stdin.buffer.read()
sys.stdout.buffer.write(data[min(a for a, _ in spans):max(b for _, b in spans)])
' "${SOURCE%.dict.dz}.index" > "$TARGET.tmp"
[[ -s "$TARGET.tmp" ]] || { echo "error: no dictionary text found in $SOURCE" >&2; exit 1; }
mv "$TARGET.tmp" "$TARGET"
echo "$TARGET ($(wc -w < "$TARGET") words)"
