#!/usr/bin/env bash
# CPU figures of mamba-lm beside llama.cpp's, interleaved, on this machine, in one run (our
# int8 beside llama.cpp's q8_0).
# Usage: scripts/bench_cpu_side_by_side.sh [ROUNDS=3] [THREADS=2] [OUT=bench-out]
# Needs ../shared/peers (builds llama.cpp from PyPI's llama-cpp-python source the first time;
# nothing of it enters this repo). Writes OUT/ours.jsonl, OUT/llama.jsonl, OUT/membw.txt and
# prints the median of each figure per implementation.
set -euo pipefail
ROUNDS=${1:-3}; T=${2:-2}; OUT=${3:-bench-out}
HERE=$(cd "$(dirname "$0")/.." && pwd); PEERS=${PEERS:-$HERE/../shared/peers}
mkdir -p "$OUT"; : > "$OUT/ours.jsonl"; : > "$OUT/llama.jsonl"
cargo build --release --quiet --manifest-path "$HERE/Cargo.toml"
BIN=$HERE/target/release/mamba-lm
gcc -O3 -march=native -ffast-math -fopenmp "$PEERS/membw.c" -o "$OUT/membw"
OMP_NUM_THREADS=$T "$OUT/membw" 1024 10 > "$OUT/membw.txt"
for r in $(seq "$ROUNDS"); do
  "$BIN" bench cpu --threads "$T" --reps 1 --json | tee -a "$OUT/ours.jsonl"
  TYPES=${TYPES:-f32 bf16 q8_0} bash "$PEERS/llama_side_by_side.sh" /tmp/llama-peer "$T" | tee -a "$OUT/llama.jsonl"
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
