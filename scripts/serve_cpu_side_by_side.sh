#!/usr/bin/env bash
# Serving throughput on the CPU, side by side: `mamba-lm bench cpu` (generation at batch 1/4/16,
# prompt 2048 + 128 new tokens), `mamba-lm serve` at 1/4/16 concurrent streams of the same work,
# and llama.cpp's llama-server on the same shape (random weights, GGUF) at the same
# concurrencies. JSON lines on stdout.
# Usage: scripts/serve_cpu_side_by_side.sh [LLAMA_WORKDIR] [DTYPE]
#   LLAMA_WORKDIR: where ../shared/peers/llama_side_by_side.sh built llama.cpp with SERVER=1
#   (default /tmp/llama-peer); DTYPE: f32 or bf16 (default f32). STREAMS="1 4 16" picks the
#   concurrencies, PROMPT / GEN the work per stream, REPS the rounds (default 3; each round runs
#   all three once, so ratios pair runs minutes apart), SERVE_ARGS extra flags for `mamba-lm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/llama-peer}; T=${2:-f32}
STREAMS=${STREAMS:-1 4 16}; PROMPT=${PROMPT:-2048}; GEN=${GEN:-128}; REPS=${REPS:-3}
BIN=target/release/mamba-lm
LLAMA=$W/llama.cpp/build/bin/llama-server
[ -x "$LLAMA" ] || { echo "no $LLAMA: run SERVER=1 ../shared/peers/llama_side_by_side.sh $W first" >&2; exit 1; }
MODEL=$(mktemp -d)/mamba-130m
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$(dirname "$MODEL")"' EXIT
$BIN init --preset mamba-130m --dtype "$T" --out "$MODEL" >/dev/null
max=$(echo $STREAMS | tr ' ' '\n' | sort -n | tail -1)

up() {  # waits for a server's /health
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.2; done
    echo "the server on port $1 did not start" >&2; return 1
}
load() {  # PORT IMPL REP: one throughput run per concurrency, fresh prompts per rep
    for n in $STREAMS; do
        python3 scripts/serve_bench.py "http://127.0.0.1:$1" throughput "$n" --prompt-len "$PROMPT" \
            --max-tokens "$GEN" --seed "$3" | sed "s/^{/{\"impl\": \"$2\", \"dtype\": \"$T\", \"rep\": $3, /"
    done
}

# Both servers stay up (idle while the other runs); each rep measures the bench, ours and
# llama-server back to back, so every ratio pairs runs minutes apart on this machine.
$BIN serve -m "$MODEL" --dtype "$T" --max-batch "$max" --port 18601 ${SERVE_ARGS:-} 2>/dev/null &
# Each of llama-server's slots holds one stream's context: prompt + new tokens, with room to spare.
"$LLAMA" -m "$W/models/mamba1-130m-$T.gguf" -t 2 -np "$max" -c $(( max * (PROMPT + GEN + 64) )) \
    --port 18602 >/dev/null 2>&1 &
up 18601 && up 18602
for rep in $(seq "$REPS"); do
    $BIN bench cpu --json --preset mamba-130m --dtype "$T" --batch "$(echo $STREAMS | tr ' ' ,)" \
        --generate-prompt-len "$PROMPT" --gen "$GEN" --reps 1 | grep generate_tok_s | sed "s/^{/{\"rep\": $rep, /"
    load 18601 mamba-lm "$rep"
    load 18602 llama-server "$rep"
done
