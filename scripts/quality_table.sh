#!/usr/bin/env bash
# Strict-mode perplexity of SpectralKV cache configurations against a dense cache on the real model
# (SmolLM2-135M-Instruct) and real text (The Devil's Dictionary), at several context lengths.
#
# Arms run in lockstep with one dense reference per process (spectralkv_llama perplexity --arm ...).
# Strict chunks end wherever any arm is about to compress, so arms whose compressions fall on
# different tokens (other sinks or block sizes) would cut each other's chunks to a few tokens; each
# GROUP therefore holds arms with the same sinks, block and hot sizes, and runs as its own process.
#
# Usage: scripts/quality_table.sh [OUT_DIR]          (default: out/quality)
# Environment:
#   BIN       spectralkv_llama binary   (default: build/cpu/examples/llama/spectralkv_llama, as scripts/demo.sh builds it)
#   CONTEXTS  context lengths           (default: "2048 4096 8192")
#   TOKENS    tokens per context: windows = max(1, TOKENS / context)   (default: 8192)
#   WINDOWS   windows per context, overriding TOKENS
#   ARM_GROUPS    groups separated by ';', each a space-separated list of --arm specs (default below)
#   FIDELITY  1: also record per-layer attention fidelity (slower)
#   BACKEND   cache backend of every arm: cpu (default; the documented tables) or cuda / auto
set -euo pipefail

readonly ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly OUT="${1:-$ROOT/out/quality}"
readonly BIN="${BIN:-$ROOT/build/cpu/examples/llama/spectralkv_llama}"
readonly CONTEXTS="${CONTEXTS:-2048 4096 8192}"
readonly TOKENS="${TOKENS:-8192}"
readonly ARM_GROUPS="${ARM_GROUPS:-k=8,v=16,sinks=4 k=16,v=32,sinks=4 k=32,v=32,sinks=4 k=32,v=64,sinks=4 k=16,v=32,sinks=4,mc=1;\
k=8,v=16,sinks=16 k=16,v=32,sinks=16 k=32,v=64,sinks=16 k=32,v=64,sinks=16,mc=1 k=16,v=32,sinks=16,out=8 \
k=32,v=64,sinks=16,out=8;k=16,v=32,sinks=0;k=16,v=32,block=256,sinks=4}"

[[ -x "$BIN" ]] || { echo "error: $BIN not built (cmake --preset cpu && cmake --build --preset cpu --target spectralkv_llama)" >&2; exit 1; }
"$ROOT/scripts/fetch_model.sh" >/dev/null
"$ROOT/scripts/fetch_text.sh" >/dev/null
mkdir -p "$OUT"
fidelity_flag=(--no-fidelity)
[[ "${FIDELITY:-0}" == 1 ]] && fidelity_flag=()

IFS=';' read -r -a groups <<< "$ARM_GROUPS"
for ctx in $CONTEXTS; do
  windows="${WINDOWS:-$(( TOKENS / ctx > 1 ? TOKENS / ctx : 1 ))}"
  for g in "${!groups[@]}"; do
    arm_flags=()
    for a in ${groups[$g]}; do arm_flags+=(--arm "$a"); done
    echo "== context $ctx, group $g: ${groups[$g]} ($windows window(s))" >&2
    "$BIN" perplexity --model "$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf" --text "$ROOT/data/devil.txt" \
      --ctx "$ctx" --windows "$windows" --backend "${BACKEND:-cpu}" "${arm_flags[@]}" "${fidelity_flag[@]}" --json > "$OUT/ppl_${ctx}_g$g.json"
  done
done

python3 - "$OUT" "${#groups[@]}" $CONTEXTS > "$OUT/tables.md" <<'PY'
import json, sys
out, n_groups, contexts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for ctx in contexts:
    runs = [json.load(open(f"{out}/ppl_{ctx}_g{g}.json")) for g in range(n_groups)]
    dense = runs[0]["arms"][0]
    wall = sum(r["wall_seconds"] for r in runs)
    print(f"\n### Context {ctx} ({runs[0]['windows']} window(s), {runs[0]['scored_tokens']} scored tokens, "
          f"dense perplexity {dense['perplexity']:.3f})\n")
    print("| r_K | r_V | block | hot | sinks | mean-c. | outliers | Δppl % | mean KL | top-1 | KV MB | ratio vs FP16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for a in r["arms"][1:]:
            c = a["config"]
            print(f"| {c['rank_k']} | {c['rank_v']} | {c['block']} | {c['hot']} | {c['sinks']} | "
                  f"{'on' if c['mean_center'] else 'off'} | {c.get('outliers', 0)} | {a['delta_ppl_pct']:+.2f} | "
                  f"{a['mean_kl']:.4f} | {a['top1_agreement']:.3f} | {a['kv_bytes'] / 1e6:.1f} | "
                  f"{a['compression']:.2f}× |")
    print(f"\nDense FP16 KV: {dense['kv_bytes_dense_fp16'] / 1e6:.1f} MB. {n_groups} runs, {wall:.0f} s in all.")
PY
cat "$OUT/tables.md"
