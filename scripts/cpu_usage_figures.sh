#!/usr/bin/env bash
# What users of the CPU build run, timed by the wall clock: `generate` at 1,000 and 8,000 tokens
# (ms per token must not grow with the output) and `score` of 16,384 tokens, on random `tiny`
# and mamba-130m models, 2 threads. Usage: scripts/cpu_usage_figures.sh [BINARY...]
# (default target/release/mamba-lm; give two binaries to compare them side by side, interleaved).
set -euo pipefail
BINS=("${@:-target/release/mamba-lm}")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"${BINS[0]}" init --preset tiny --out "$W/tiny" >/dev/null 2>&1
"${BINS[0]}" init --preset mamba-130m --out "$W/m130" >/dev/null 2>&1
python3 -c "import json,random; random.seed(1); print(json.dumps([[random.randrange(50277) for _ in range(16384)]]))" >"$W/ids.json"
python3 -c "import json,random; random.seed(1); print(json.dumps([[random.randrange(50277) for _ in range(2048)]]))" >"$W/ids2k.json"
wall() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo "scale=3; ($e - $s) / 1000000000" | bc; }
for model in tiny m130; do
    for bin in "${BINS[@]}"; do
        for n in 1000 8000; do
            [ $model = m130 ] && [ $n = 8000 ] && continue
            t=$(wall "$bin" generate -m "$W/$model" --prompt "The state space model" --max-new-tokens $n --ignore-eos --threads 2)
            echo "$bin $model generate $n tokens: $t s, $(echo "scale=3; $t * 1000 / $n" | bc) ms/token (wall, start included)"
        done
        ids=$W/ids.json
        [ $model = m130 ] && ids=$W/ids2k.json
        n=$(python3 -c "import json; print(len(json.load(open('$ids'))[0]))")
        t=$(wall "$bin" score -m "$W/$model" --ids-file "$ids" --threads 2 --json)
        echo "$bin $model score $n tokens: $t s, $(echo "scale=0; $n / $t" | bc) tok/s"
    done
done
