#!/usr/bin/env bash
# GPU against CPU: runs `quantizer-job gpu-check` (RTN/INT8/FP8 codes equal,
# GPTQ within bounds, both timed, copy bandwidth) on a GPU machine. Builds
# nothing: BIN is a quantizer-job built elsewhere and carried along.
#   BIN=.device/quantizer-job MODEL=.device/model quantizer-job/bench/gpu/check.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
bin=${BIN:-target/release/quantizer-job}
model=${MODEL:-../shared/data/tiny-llama}
out=${1:-${OUT:-.}}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
"$bin" gpu-check --model "$model" --json "$out/gpu-check.json" 2>&1 | tee "$out/gpu-check.txt"
