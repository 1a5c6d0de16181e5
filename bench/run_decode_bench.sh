#!/usr/bin/env bash
# Produces the decode-attention figures of docs/PERFORMANCE.md: builds bench_decode (Release, sm_90),
# runs it (one process per shape) and bench/torch_sdpa.py on the same GPU, and prints the markdown table.
#
# Usage: bench/run_decode_bench.sh [OUT_DIR]   (default bench/results)
# Environment: BUILD_DIR (default build-bench), JOBS (default 16); BENCH_BIN: a bench_decode binary built
# beforehand (same flags as below), which skips the build; SPECTRALKV_FLUSH=write flushes the L2 before
# each timed call with a write instead of a read (both bench_decode and torch_sdpa.py).
set -euo pipefail

out_dir=${1:-bench/results}
build_dir=${BUILD_DIR:-build-bench}
jobs=${JOBS:-16}
bench_bin=${BENCH_BIN:-}
mkdir -p "$out_dir"

if [[ -z "$bench_bin" ]]; then
  mkdir -p "$build_dir"
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DSPECTRALKV_BUILD_TESTS=OFF -DSPECTRALKV_BUILD_EXAMPLES=OFF > "$build_dir/configure.log"
  cmake --build "$build_dir" --target bench_decode -j "$jobs" > "$build_dir/build.log"
  bench_bin="$build_dir/bench/bench_decode"
fi

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
# One process per shape, so that no shape's buffers come from memory an earlier shape freed (see Case in
# bench_decode.cu); the per-shape JSON files are merged into decode_bench.json.
shapes=$("$bench_bin" --benchmark_list_tests | sed -n 's#^[A-Za-z]*/B:\([0-9]*\)/T:\([0-9]*\)/.*#\1 \2#p' | sort -u -k1,1n -k2,2n)
[[ -n "$shapes" ]] || { echo "run_decode_bench.sh: $bench_bin lists no shapes (no GPU?)" >&2; exit 1; }
parts=()
trap 'rm -f "${parts[@]}"' EXIT
while read -r batch len; do
  part="$out_dir/.decode_bench_B${batch}_T${len}.json"
  "$bench_bin" --benchmark_filter="/B:${batch}/T:${len}/" --benchmark_out="$part" --benchmark_out_format=json \
    --benchmark_counters_tabular=true
  parts+=("$part")
done <<< "$shapes"
python3 - "$out_dir/decode_bench.json" "${parts[@]}" <<'EOF'
import json, sys
merged = None
for path in sys.argv[2:]:
    part = json.load(open(path))
    if merged is None:
        merged = part
    else:
        merged["benchmarks"] += part["benchmarks"]
with open(sys.argv[1], "w") as f:
    json.dump(merged, f, indent=2)
    f.write("\n")
EOF
PYTHONUNBUFFERED=1 python3 bench/torch_sdpa.py --out "$out_dir/torch_sdpa.json" --flush "${SPECTRALKV_FLUSH:-read}"

python3 - "$out_dir" <<'EOF'
import json, re, sys
d = sys.argv[1]
bench = json.load(open(f"{d}/decode_bench.json"))
sdpa = {(r["B"], r["T"]): r for r in json.load(open(f"{d}/torch_sdpa.json"))["rows"]}
rows = {}
for b in bench["benchmarks"]:
    if b.get("aggregate_name") != "median":
        continue
    m = re.match(r"(\w+)/B:(\d+)/T:(\d+)", b["run_name"])
    rows.setdefault((int(m.group(2)), int(m.group(3))), {})[m.group(1)] = b
print("| B | T | spectral µs | spectral MB | spectral GB/s | dense µs | dense GB/s | dense token-major µs |"
      " decompress+attend µs | sdpa µs | sdpa GB/s | spectral vs dense | spectral vs sdpa | dense vs sdpa |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (bsz, t), r in sorted(rows.items()):
    s, dn, dc = r.get("Spectral"), r.get("Dense"), r.get("DecompressThenAttend")
    dt = r.get("DenseTokenMajor")
    sd = sdpa.get((bsz, t))
    cells = [str(bsz), f"{t // 1024}K"]
    cells += [f"{s['us']:.1f}", f"{s['bytes'] / 1e6:.1f}", f"{s['GBps']:.0f}"] if s else ["-"] * 3
    cells += [f"{dn['us']:.1f}", f"{dn['GBps']:.0f}"] if dn else ["-"] * 2
    cells += [f"{dt['us']:.1f}"] if dt else ["-"]
    cells += [f"{dc['us']:.1f}"] if dc else ["-"]
    cells += [f"{sd['median_us']:.1f}", f"{sd['GBps']:.0f}"] if sd else ["-"] * 2
    cells += [f"{dn['us'] / s['us']:.2f}×" if s and dn else "-"]
    cells += [f"{sd['median_us'] / s['us']:.2f}×" if s and sd else "-"]
    cells += [f"{sd['median_us'] / dn['us']:.2f}×" if dn and sd else "-"]
    print("| " + " | ".join(cells) + " |")
EOF
