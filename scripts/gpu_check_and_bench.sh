#!/usr/bin/env bash
# The whole GPU check and benchmark in one script. Build anywhere (no toolkit needed):
#   cargo build --release --features cuda && cargo test --release --features cuda --no-run
#   scripts/gpu_check_and_bench.sh --stage   # copies the stripped binaries to .gpu/
# then on the GPU machine, from the repo root (with .gpu/ copied along):
#   scripts/gpu_check_and_bench.sh [STAGE...]
# Stages: start check sanitize scan models usage hf train parity serve throughput tasks baselines plot
# (default: all; to keep each run under 10 minutes, split them: "start check sanitize scan baselines plot",
# "models usage hf", "train", "parity", "serve", "throughput", "tasks").
# Results (JSON lines, logs, PNG plots) go to $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--stage" ]; then
    mkdir -p .gpu
    cp target/release/mamba-lm .gpu/mamba-lm
    # The test binary of the cuda build (a default build leaves one without the GPU tests). Cargo
    # lists the mamba-lm binary among the artifacts too, in no fixed order: pick the test's.
    t=$(cargo test --release --features cuda --no-run --test cuda_gpu --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*/deps/cuda_gpu-[^"]*"' | tail -1 | cut -d'"' -f4)
    [ -x "$t" ] || { echo "no cuda_gpu test binary: run cargo test --release --features cuda --no-run" >&2; exit 1; }
    cp "$t" .gpu/cuda_gpu
    strip .gpu/mamba-lm .gpu/cuda_gpu
    exit 0
fi

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BIN=$PWD/.gpu/mamba-lm
STAGES=${*:-start check sanitize scan models usage hf train parity serve throughput tasks baselines plot}
J=$OUT/figures.jsonl
export MAMBA_LM_CACHE=/tmp/mamba-lm-cache
has() { [[ " $STAGES " == *" $1 "* ]]; }
# The test binary (check and sanitize) finds the fixtures under the path it was built in.
mkdir -p /work && [ -e /work/main ] || ln -s "$PWD" /work/main
log() { echo "== $*" >&2; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

if has start; then
    log "start to first token, mamba-130m bf16 (cold: empty kernel cache; warm: cached)"
    $BIN init --preset mamba-130m --out /tmp/m130 >/dev/null 2>&1 || true
    for kind in cold warm warm; do
        [ $kind = cold ] && rm -rf "$MAMBA_LM_CACHE"
        s=$(date +%s%N)
        $BIN generate -m /tmp/m130 --device cuda --dtype bf16 --prompt "The state space model" --max-new-tokens 1 >/dev/null || echo "generate failed"
        e=$(date +%s%N)
        v=$(( (e - s) / 1000000 ))e-3
        echo "{\"bench\":\"start\",\"model\":\"mamba-130m\",\"dtype\":\"bf16\",\"batch\":1,\"length\":1,\"figure\":\"start_to_first_token_${kind}_s\",\"value\":$v,\"unit\":\"s\"}" | tee -a "$J"
    done
fi

if has check; then
    log "correctness: fixtures, GPU vs CPU, chunked scan"
    .gpu/cuda_gpu --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$OUT/check.log" | grep -E "rel L2|test |result"
fi

if has sanitize; then
    log "compute-sanitizer: memcheck and racecheck on fixture runs (prefill, chunked scan, graph decode)"
    # 700 tokens: long enough for the chunked three-pass scan.
    LONG=$(python3 -c "print(','.join(str(i * 7 % 250) for i in range(700)))")
    # Two layers of mamba-130m's width: its long prompt takes the state-lane scan (the fixtures'
    # B, C rows are not on 16 bytes in bf16, so theirs take the chunked one).
    echo '{"d_model": 768, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {}}' >/tmp/w768.json
    rm -rf /tmp/w768 && $BIN init --config /tmp/w768.json --out /tmp/w768 >/dev/null
    for tool in memcheck racecheck; do
        for m in tests/fixtures/mamba1-ssm tests/fixtures/mamba2-ssm /tmp/w768; do
            for ids in "1,2,3,4,5" "$LONG"; do
                f=$OUT/sanitize.log
                echo "--- $tool $m prompt of $(echo "$ids" | tr , ' ' | wc -w) tokens" >>"$f"
                timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 $BIN generate -m $m --device cuda \
                    --dtype bf16 --prompt-ids "$ids" --max-new-tokens 4 >>"$f" 2>&1
                echo "sanitize $tool $m $(echo "$ids" | tr , ' ' | wc -w) tokens: rc=$?"
            done
        done
    done
    # The batched decode graph (scan_step, ssd_step, kernels launched early) runs in the greedy
    # test's batches, which the single-prompt runs above do not reach.
    for tool in memcheck racecheck; do
        echo "--- $tool greedy-tokens test" >>"$OUT/sanitize.log"
        timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 .gpu/cuda_gpu --include-ignored \
            --test-threads=1 fixtures_greedy_tokens_identical >>"$OUT/sanitize.log" 2>&1
        echo "sanitize $tool greedy-tokens test (batched decode graph): rc=$?"
    done
    grep -a -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Program hit" "$OUT/sanitize.log" | sort | uniq -c | head -20
    # Which kernels any reported race is in (cuBLASLt's nvjet_* GEMMs report some at 768 wide).
    grep -a -o -E "Race reported between [A-Za-z]+ access at [^ (]+" "$OUT/sanitize.log" | sort | uniq -c
    # (rc=0 with --error-exitcode 9 means the tool found nothing)
fi

if has scan; then
    log "selective scan alone"
    $BIN bench scan --json-out "$J" --plot "$OUT/scan.png"
fi

if has models; then
    log "decode, prefill, generation throughput, memory"
    B="$BIN bench"
    $B decode --preset mamba-130m --preset mamba-370m --preset mamba-1.4b --preset mamba-2.8b \
        --preset mamba2-130m --preset mamba2-1.3b --json-out "$J"
    $B prefill --preset mamba-130m --preset mamba2-130m --preset mamba-1.4b --json-out "$J"
    $B generate --preset mamba-1.4b --json-out "$J" --plot "$OUT/generate.png"
    $B memory --preset mamba-1.4b --json-out "$J"
fi

if has usage; then
    log "what users run: generate and score, wall clock, mamba-130m bf16 (JSON lines in usage.jsonl)"
    $BIN init --preset mamba-130m --out /tmp/m130 >/dev/null 2>&1 || true
    U=$OUT/usage.jsonl
    # Runs mamba-lm with the given arguments, records its wall time and its --json line.
    run() {
        local what=$1
        shift
        local s e
        s=$(date +%s%N)
        "$BIN" "$@" >"$OUT/last.json" || echo "$what failed"
        e=$(date +%s%N)
        echo "{\"what\":\"$what\",\"wall_s\":$(( (e - s) / 1000000 ))e-3,\"out\":$(tail -c 400 "$OUT/last.json" |
            python3 -c 'import json,sys; t=sys.stdin.read(); i=t.find("\"prefill_ms\""); print(json.dumps(t[i:] if i >= 0 else t.strip()[-200:]))')}" | tee -a "$U"
    }
    G=(generate -m /tmp/m130 --device cuda --dtype bf16 --prompt "The state space model" --ignore-eos --json)
    run "warm-up" "${G[@]}" --max-new-tokens 1
    run "start + prefill + 1 token" "${G[@]}" --max-new-tokens 1
    for n in 2000 8000; do run "greedy $n" "${G[@]}" --max-new-tokens $n; done
    run "sampled 20000 (top-k 0)" "${G[@]}" --max-new-tokens 20000 --top-k 0
    for a in "--top-k 1" "--top-k 40 --top-p 0.95" "--top-k 0" "--top-k 0 --min-p 0.05" "--top-k 40" \
        "--top-k 0 --top-p 0.9" "--repetition-penalty 1.2" "--top-k 40 --top-p 0.95 --repetition-penalty 1.2"; do
        # shellcheck disable=SC2086
        run "2000 tokens $a" "${G[@]}" --max-new-tokens 2000 $a
    done
    $BIN bench decode --preset mamba-130m --json-out "$J"
    python3 -c "import json,random; random.seed(1); print(json.dumps([[random.randrange(50277) for _ in range(262144)]]))" >/tmp/ids256k.json
    for c in 1024 4096; do
        run "score 262144 tokens, chunk $c" score -m /tmp/m130 --device cuda --dtype bf16 --ids-file /tmp/ids256k.json --json --chunk $c
    done
    # Batch invariance: 4 prompts of 1 to 3000 words together, then each alone (greedy); bf16
    # with and without --deterministic (f32 always runs each sequence alone), and the batch's time.
    python3 -c "
import random; random.seed(2); w='state space models scale linearly with sequence length and keep a constant state'.split()
for n in (1, 40, 700, 3000): print(' '.join(random.choice(w) for _ in range(n)))" >/tmp/prompts.txt
    for m in mamba-130m mamba2-130m; do
        $BIN init --preset $m --out /tmp/inv-$m >/dev/null 2>&1 || true
        for mode in "f32" "bf16" "bf16 --deterministic"; do
            # shellcheck disable=SC2206
            I=(generate -m /tmp/inv-$m --device cuda --dtype $mode --max-new-tokens 256 --ignore-eos --json)
            s=$(date +%s%N)
            "$BIN" "${I[@]}" --prompt-file /tmp/prompts.txt | python3 -c 'import json,sys; [print(json.loads(l)["new_ids"]) for l in sys.stdin]' >/tmp/batch.txt
            e=$(date +%s%N)
            : >/tmp/alone.txt
            while IFS= read -r line; do
                "$BIN" "${I[@]}" --prompt "$line" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["new_ids"])' >>/tmp/alone.txt
            done </tmp/prompts.txt
            same=$(paste -d'|' /tmp/batch.txt /tmp/alone.txt | awk -F'|' '$1 == $2' | wc -l)
            echo "{\"what\":\"batch invariance $m $mode\",\"same_as_alone\":$same,\"of\":4,\"batch_wall_s\":$(( (e - s) / 1000000 ))e-3}" | tee -a "$U"
        done
    done
fi

if has hf; then
    log "transformers loads what init and train write, with our logits (hf.jsonl)"
    H=/tmp/hf
    rm -rf $H && mkdir -p $H
    $BIN init --preset tiny --out $H/init-mamba1 >/dev/null
    $BIN init --preset tiny-mamba2 --out $H/init-mamba2 >/dev/null
    $BIN prepare --input README.md BENCHMARKS.md --out $H/data --train-tokenizer --vocab-size 512 2>/dev/null
    for p in tiny tiny-mamba2; do
        $BIN train --data $H/data --preset $p --out $H/train-$p --steps 20 --batch-size 4 --seq-len 64 --eval-every 0 2>/dev/null
    done
    python3 scripts/hf_load_check.py "$BIN" $H/init-mamba1 $H/init-mamba2 $H/train-tiny/final $H/train-tiny-mamba2/final |
        tee "$OUT/hf.jsonl"
fi

if has train; then
    log "training on the GPU: repeatability, speed, MFU and memory (train.jsonl)"
    T=$OUT/train.jsonl
    # Two identical runs log the same losses, bit for bit.
    for r in a b; do
        rm -rf /tmp/det-$r
        $BIN train --task induction-heads --preset tiny --seq-len 256 --batch-size 8 --steps 30 --eval-every 0 \
            --device cuda --dtype bf16 --out /tmp/det-$r >/dev/null 2>&1
    done
    same=$(diff <(grep -o '"loss":[^,]*' /tmp/det-a/metrics.jsonl) <(grep -o '"loss":[^,]*' /tmp/det-b/metrics.jsonl) >/dev/null && echo true || echo false)
    echo "{\"bench\":\"train\",\"figure\":\"repeat_bitwise\",\"value\":$same}" | tee -a "$T"
    # Seq 2048 as the official trainer's figures; long context with per-layer recompute.
    for run in "mamba-130m 8 2048" "mamba-130m 32 2048" "mamba-370m 8 2048" "mamba2-130m 8 2048" "mamba-1.4b 1 8192 --recompute"; do
        set -- $run
        for t in bf16 f32; do
            [ $t = f32 ] && [ "$1 $2" != "mamba-130m 8" ] && continue
            timeout 120 $BIN bench train --preset $1 --batch $2 --seq-len $3 ${4:-} --steps 3 --device cuda --dtype $t \
                --json | tee -a "$T"
        done
    done
    # Memory against length: batch 1 with per-layer recompute, to 64K.
    for len in 2048 4096 8192 16384 32768 65536; do
        timeout 120 $BIN bench train --preset mamba-130m --batch 1 --seq-len $len --recompute --steps 1 --device cuda \
            --dtype bf16 --json | tee -a "$T"
    done
    grep peak_memory_gb "$T" >"$OUT/train_memory.jsonl"
    $BIN bench plot --input "$OUT/train_memory.jsonl" --out "$OUT/train_memory.png" --force
fi

if has parity; then
    log "convergence parity: mamba-lm train against transformers + torch AdamW, ~12M parameters (parity.jsonl)"
    # PARITY_TEXT: text files of more than the run's 1M tokens (README.md and BENCHMARKS.md, the
    # default, are memorised long before 1,000 steps). PARITY_LR: the peak learning rate (3e-3).
    # The whole stage takes ~5 minutes on an H100; PARITY_CONTINUE=1 continues a run that
    # PARITY_TIMEOUT (540 s) cut, from the reference's last evaluation.
    [ -n "${PARITY_CONTINUE:-}" ] || rm -rf /tmp/parity
    # shellcheck disable=SC2086
    timeout "${PARITY_TIMEOUT:-540}" python3 scripts/train_parity.py --bin "$BIN" --work /tmp/parity --config scripts/parity-mamba1-12m.json \
        ${PARITY_TEXT:+--text $PARITY_TEXT} ${PARITY_LR:+--lr $PARITY_LR} --ours-device cuda --steps 1000 2>&1 |
        tail -14 | tee "$OUT/parity.log"
    cp /tmp/parity/parity.jsonl /tmp/parity/ours/metrics.jsonl "$OUT/" 2>/dev/null
fi

# A server on PORT, once its /health answers (at most 120 s).
serve_up() {
    local port=$1; shift
    $BIN serve --port "$port" --device cuda --dtype bf16 "$@" >>"$OUT/serve.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        kill -0 $SERVER 2>/dev/null || break
        sleep 0.5
    done
    echo "the server on port $port did not start (see serve.log)"; return 1
}

if has serve; then
    log "serving: the bundled model in bf16, 300 concurrent greedy streams, a cached 2,000-token prefix"
    if serve_up 18401 --max-batch 64; then
        python3 scripts/serve_bench.py http://127.0.0.1:18401 streams 300 --alone 30 | tee -a "$J"
        python3 scripts/serve_bench.py http://127.0.0.1:18401 ttft | tee -a "$J"
    fi
    kill $SERVER; wait $SERVER 2>/dev/null
fi

if has throughput; then
    log "serving throughput, mamba-1.4b random weights, prompt 2048 + 128 new tokens: bench generate, then the server"
    $BIN bench generate --preset mamba-1.4b --batch ${SERVE_BATCHES:-1,16,64,128} --reps 3 --json-out "$J"
    [ -d /tmp/m14 ] || $BIN init --preset mamba-1.4b --dtype bf16 --out /tmp/m14 >/dev/null
    # With the prefix cache (the default: each prompt's final state copied on the device) and without.
    for cache in ${SERVE_CACHES:-1024 0}; do
        if serve_up 18402 -m /tmp/m14 --max-batch 128 --cache-mb $cache; then
            for n in $(echo ${SERVE_BATCHES:-1,16,64,128} | tr , ' '); do
                timeout 200 python3 scripts/serve_bench.py http://127.0.0.1:18402 throughput $n --prompt-len 2048 \
                    --max-tokens 128 | sed "s/}\$/, \"cache_mb\": $cache}/" | tee -a "$J"
            done
            curl -s http://127.0.0.1:18402/metrics >"$OUT/serve-metrics-cache$cache.txt"
        fi
        kill $SERVER; wait $SERVER 2>/dev/null
    done
fi

if has tasks; then
    log "the synthetic tasks on the GPU (tasks-*.jsonl)"
    for task in induction-heads selective-copying; do
        rm -rf /tmp/$task
        timeout "${TASK_TIMEOUT:-240}" $BIN train --task $task --preset tiny --seq-len 256 --batch-size "${TASK_BATCH:-32}" \
            --steps "${TASK_STEPS:-3000}" --lr 2e-3 --warmup 100 --eval-every 500 --eval-lens 4096,65536 --save-every 0 \
            --device cuda --dtype bf16 ${TASK_ARGS:-} --out /tmp/$task >/dev/null 2>&1
        grep -E 'accuracy' /tmp/$task/metrics.jsonl | tee "$OUT/tasks-$task.jsonl"
        tail -1 /tmp/$task/metrics.jsonl >> "$OUT/tasks-$task.jsonl"
    done
fi

if has baselines; then
    log "PyTorch baselines (SDPA flash attention, FFT convolution, transformers MambaForCausalLM)"
    PYTHONUNBUFFERED=1 python3 scripts/gpu_baselines.py --out "$OUT/baselines.jsonl" 2>&1 | tail -40
fi

if has plot; then
    ins=$J
    [ -f "$OUT/baselines.jsonl" ] && ins="$J,$OUT/baselines.jsonl"
    $BIN bench plot --input "$ins" --out "$OUT/scan_vs_baselines.png" --force
fi
