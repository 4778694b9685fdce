#!/bin/bash
# A real pretrained student: SmolLM2-135M (the store's tokenizer) fine-tuned on the store of `benchmarks/real.py`
# (run it first, e.g. `python benchmarks/real.py --rows 116 --work /tmp/chorus-real96`) with CE only, KD from each
# cached teacher, and KD from both by the stored blend; the base model's held-out eval beside them. A CPU budget:
# 16 steps of 2 rows x 256 tokens, lr 2e-5. Results: docs/results.md ("Real models").
#     bash benchmarks/real_pretrained.sh [WORK] [OUT] [SEED] [GEMMA]
# GEMMA: the name of the mapped teacher's cache (default gemma3-270m; e.g. a `real.py --branches 1` one); the
# blend of it and SmolLM2 is fitted again first (calibrate, blend), as the default flow does.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/chorus-real96}
OUT=${2:-/tmp/chorus-real-pretrained}
SEED=${3:-0}
GEMMA=${4:-gemma3-270m}
S=$WORK/store.zarr
ST=benchmarks/.models/smollm2-135m
BIN=.venv/bin
mkdir -p "$OUT"
common=(--store "$S" --student "$ST" --steps 16 --batch-size 2 --lr 2e-5 --warmup-steps 2 --eval-every 0 --eval-rows 33
        --save-every 0 --seed "$SEED" --overwrite)
$BIN/chorus calibrate --store "$S" --teacher smollm2-135m
$BIN/chorus calibrate --store "$S" --teacher "$GEMMA"
$BIN/chorus blend --store "$S" --teachers "smollm2-135m,$GEMMA"
$BIN/chorus eval --store "$S" --model "$ST" --out "$OUT/base.json" --max-rows 33
$BIN/chorus train "${common[@]}" --out "$OUT/ce" --kd-weight 0
$BIN/chorus train "${common[@]}" --out "$OUT/kd-gemma" --teachers "$GEMMA"
$BIN/chorus train "${common[@]}" --out "$OUT/kd-smollm2" --teachers smollm2-135m
$BIN/chorus train "${common[@]}" --out "$OUT/blend" --teachers "smollm2-135m,$GEMMA"
