#!/bin/bash
# A real pretrained student: SmolLM2-135M (the store's tokenizer) fine-tuned on the store of `benchmarks/real.py`
# (run it first, e.g. `python benchmarks/real.py --rows 116 --work /tmp/chorus-real96`) with CE only, KD from each
# cached teacher, and KD from both by the stored blend; the base model's held-out eval beside them. A CPU budget:
# 16 steps of 2 rows x 256 tokens, lr 2e-5. Results: docs/results.md ("Real models").
#     bash benchmarks/real_pretrained.sh [WORK] [OUT] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/chorus-real96}
OUT=${2:-/tmp/chorus-real-pretrained}
SEED=${3:-0}
S=$WORK/store.zarr
ST=benchmarks/.models/smollm2-135m
BIN=.venv/bin
mkdir -p "$OUT"
common=(--store "$S" --student "$ST" --steps 16 --batch-size 2 --lr 2e-5 --warmup-steps 2 --eval-every 0 --eval-rows 33
        --save-every 0 --seed "$SEED" --overwrite)
$BIN/chorus eval --store "$S" --model "$ST" --out "$OUT/base.json" --max-rows 33
$BIN/chorus train "${common[@]}" --out "$OUT/ce" --kd-weight 0
$BIN/chorus train "${common[@]}" --out "$OUT/kd-gemma" --teachers gemma3-270m
$BIN/chorus train "${common[@]}" --out "$OUT/kd-smollm2" --teachers smollm2-135m
$BIN/chorus train "${common[@]}" --out "$OUT/blend" --teachers smollm2-135m,gemma3-270m
