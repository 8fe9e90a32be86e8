#!/usr/bin/env bash
# CPU figures of mamba-lm beside llama.cpp's, interleaved, on this machine, in one run (our
# int8 beside llama.cpp's q8_0).
# Usage: scripts/bench_cpu_side_by_side.sh [ROUNDS=3] [THREADS=2] [OUT=bench-out]
# Needs ../shared/peers (builds llama.cpp from PyPI's llama-cpp-python source the first time;
# nothing of it enters this repo). Writes OUT/ours.jsonl, OUT/llama.jsonl, OUT/membw.txt and
# prints the median of each figure per implementation. MODELS="mamba1-370m" (the peers' GGUF
# shape names) measures those shapes instead of the two 130M ones.
set -euo pipefail
ROUNDS=${1:-3}; T=${2:-2}; OUT=${3:-bench-out}
HERE=$(cd "$(dirname "$0")/.." && pwd); PEERS=${PEERS:-$HERE/../shared/peers}
mkdir -p "$OUT"; : > "$OUT/ours.jsonl"; : > "$OUT/llama.jsonl"
cargo build --release --quiet --manifest-path "$HERE/Cargo.toml"
BIN=$HERE/target/release/mamba-lm
gcc -O3 -march=native -ffast-math -fopenmp "$PEERS/membw.c" -o "$OUT/membw"
OMP_NUM_THREADS=$T "$OUT/membw" 1024 10 > "$OUT/membw.txt"
TYPES=${TYPES:-f32 bf16 q8_0}; W=/tmp/llama-peer; LL=$W/llama.cpp/build/bin
# Other shapes than the peers script's: its GGUF writer and llama.cpp's own quantizer, the same
# llama-bench flags.
llama_shape() {  # ARCH TYPE
  local g=$W/models/$1-$2.gguf f=$W/models/$1-f32.gguf
  if [ ! -f "$g" ]; then
    local t=$2; [[ $2 == q* ]] && t=f32
    [ -f "$W/models/$1-$t.gguf" ] || PYTHONPATH=$W/llama.cpp/gguf-py python3 "$PEERS/gen_gguf_mamba.py" --arch "$1" \
      --type "$t" --vocab-gguf "$W/llama.cpp/models/ggml-vocab-gpt-neox.gguf" --out "$W/models/$1-$t.gguf" >&2
    [[ $2 == q* ]] && "$LL/llama-quantize" "$f" "$g" "${2^^}" >/dev/null 2>&1
  fi
  "$LL/llama-bench" -m "$g" -t "$T" -p 512 -n 128 -r 3 -o jsonl 2>/dev/null | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(json.dumps({'impl': 'llama.cpp', 'model': '$1', 'dtype': '$2', 'threads': r['n_threads'],
                      'figure': 'prefill_tok_s' if r['n_prompt'] else 'decode_tok_s', 'value': round(r['avg_ts'], 2)}))"
}
for r in $(seq "$ROUNDS"); do
  if [ -z "${MODELS:-}" ]; then
    "$BIN" bench cpu --threads "$T" --reps 1 --json | tee -a "$OUT/ours.jsonl"
    TYPES=$TYPES bash "$PEERS/llama_side_by_side.sh" $W "$T" | tee -a "$OUT/llama.jsonl"
  else
    [ -x "$LL/llama-bench" ] || TYPES=f32 bash "$PEERS/llama_side_by_side.sh" $W "$T" >/dev/null
    for m in $MODELS; do
      "$BIN" bench cpu --preset "${m/mamba1-/mamba-}" --threads "$T" --reps 1 --json | tee -a "$OUT/ours.jsonl"
      for t in $TYPES; do llama_shape "$m" "$t" | tee -a "$OUT/llama.jsonl"; done
    done
  fi
done
python3 - "$OUT" <<'PY'
import json, sys, statistics as st
out = sys.argv[1]
def load(f, key):
    rows = {}
    for l in open(f"{out}/{f}"):
        r = json.loads(l)
        m = r["model"].replace("mamba1-", "mamba-")
        if r["figure"] in ("prefill_tok_s", "decode_tok_s"):
            d = "int8" if r["dtype"] == "q8_0" else r["dtype"]
            rows.setdefault((m, d, r["figure"]), []).append(r["value"])
    return rows
ours, llama = load("ours.jsonl", "model"), load("llama.jsonl", "model")
print(open(f"{out}/membw.txt").read().strip())
print(f"{'model':<12} {'dtype':<5} {'figure':<14} {'mamba-lm':>9} {'llama.cpp':>9} {'ratio':>6}")
for k in sorted(ours):
    a = st.median(ours[k]); b = st.median(llama.get(k, [float('nan')]))
    print(f"{k[0]:<12} {k[1]:<5} {k[2]:<14} {a:>9.1f} {b:>9.1f} {a/b:>6.2f}")
PY
