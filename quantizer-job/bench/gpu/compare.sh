#!/usr/bin/env bash
# quantops and llm-compressor side by side on one GPU: the same model, the
# same calibration sequences, the same scheme, in one run.
#
#   tiny     the bundled model: GPTQ W4A16 asymmetric g128 (128 × 512 tokens
#            of calibration.txt, seed 42, the sequences quantops draws) and
#            FP8; then every checkpoint's perplexity with one evaluator
#            (transformers + compressed-tensors, fp32, all 512-token windows
#            of eval.txt), so both tools' artifacts load in the reference stack.
#   llama1b  BENCHMARKS.md's Llama-3.2-1B-shaped random model: GPTQ W4A16
#            symmetric g128 on 128 × 2048 random token ids, FP8, and
#            data-free RTN W4A16 symmetric g128.
#   llama8b  a Llama-3-8B-shaped random model (16 GB, tied embeddings): FP8
#            with both tools, quantops' GPTQ W4A16 g128 on 128 × 2048 ids.
#   llama70b-rtn, llama70b-gptq
#            a model larger than the GPU: Llama-3-70B's layer shapes, 50 of
#            them (88 GB of bf16 weights, tied embeddings), written once per
#            machine by make-sharded with the shards split between the disk
#            and /dev/shm (the lent machine's disk is smaller than its GPU);
#            quantops alone: RTN W4A16 g128, or GPTQ W4A16 g128 on 16 × 512
#            ids. The artifact goes to /dev/shm and is deleted once measured.
#
# Builds nothing: quantizer-job is carried (BIN), llm-compressor comes as
# wheels in .whl. Prints RESULT lines (JSON) and a table at the end.
#   BIN=.device/quantizer-job MODEL=.device/model TEXT=.device/text \
#     quantizer-job/bench/gpu/compare.sh tiny|llama1b|llama8b|llama70b-rtn|llama70b-gptq OUT_DIR
set -euo pipefail
case_name=${1:?tiny, llama1b, llama8b, llama70b-rtn or llama70b-gptq}
out=${2:-${OUT:-/tmp/compare-out}}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
source "$here/env.sh"
bin=$(realpath "${BIN:-$repo/target/release/quantizer-job}")
model=$(realpath "${MODEL:-$repo/../shared/data/tiny-llama}")
text=$(realpath "${TEXT:-$repo/../shared/data/text}")
if [ -d "$repo/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$repo"/.whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
ref=(python3 "$here/reference.py")
mkdir -p "$out"
case $case_name in
llama70b-*) vol_root=/dev/shm ;;
*) vol_root=/tmp ;;
esac
vol=$(mktemp -d "$vol_root/quantops-vol.XXXX")
cp -r "$repo/manifests/examples/volume/system-tests.yaml" "$repo/manifests/examples/volume/tasks" "$vol/"
ln -s "$model" "$vol/tiny-llama"
ln -s "$text" "$vol/text"
results="$out/results-$case_name.jsonl"
: >"$results"

result() { echo "RESULT $1" | tee -a "$results"; }

# quantops' quantize stage on the GPU; RESULT with its own timings and the
# GPU memory nvidia-smi saw in use (sampled every 50 ms) above what was in
# use before it started.
quantops() {
    local label=$1 spec=$2 start end artifact sampler idle
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$out/$label.mem" &
    sampler=$!
    start=$EPOCHREALTIME
    "$bin" quantize --device cuda --spec "$spec" --root "$vol" --allow-links-out-of-root --output-root "$vol/out" \
        --termination-log "$out/termination.json" >"$out/$label.log" 2>&1 || { kill "$sampler"; tail -40 "$out/$label.log"; return 1; }
    end=$EPOCHREALTIME
    kill "$sampler"
    artifact=$(dirname "$(find "$vol/out" -name quantize.json -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)")
    python3 - "$label" "$start" "$end" "$artifact" "$idle" "$out/$label.mem" <<'EOF' | while read -r line; do result "$line"; done
import json, os, sys
label, start, end, artifact = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
idle, mem = int(sys.argv[5]), sys.argv[6]
q = json.load(open(f"{artifact}/quantize.json"))
used = [int(l) for l in open(mem) if l.strip().isdigit()]
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(artifact) for f in fs)
print(json.dumps({"tool": "quantops", "run": label, "oneshot_s": round(q["pipeline_seconds"], 2),
                  "stage_s": round(q["seconds"], 2), "process_s": round(end - start, 2),
                  "peak_gpu_gib": round((max(used, default=idle) - idle) / 1024, 2),
                  "artifact_gib": round(size / 2**30, 2),
                  "device": q.get("device"), "artifact": artifact}))
EOF
    ln -sfn "$artifact" "$vol/$label"
}

llmcompressor() {
    local label=$1
    shift
    "${ref[@]}" quantize "$@" --out "$vol/$label" | tail -1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); r["run"] = sys.argv[1]; print(json.dumps(r))' "$label" |
        while read -r line; do result "$line"; done
}

perplexity() {
    local label=$1
    "${ref[@]}" perplexity --model "$vol/$label" --text "$vol/text/eval.txt" | tail -1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); r["run"] = sys.argv[1]; print(json.dumps(r))' "$label" |
        while read -r line; do result "$line"; done
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $case_name in
tiny)
    spec="$repo/manifests/examples/tiny-llama-int4-gptq.yaml"
    "$bin" calibration-set --spec "$spec" --root "$vol" --allow-links-out-of-root --out "$vol/calib-tiny.json"
    quantops quantops-gptq "$spec"
    llmcompressor lc-gptq --model "$vol/tiny-llama" --calib "$vol/calib-tiny.json" \
        --scheme W4A16_ASYM --method gptq --samples 128 --seq-len 512
    quantops quantops-fp8 "$here/specs/tiny-fp8.yaml"
    llmcompressor lc-fp8 --model "$vol/tiny-llama" --calib "$vol/calib-tiny.json" \
        --scheme FP8_DYNAMIC --method rtn --samples 128 --seq-len 512
    for label in tiny-llama quantops-gptq lc-gptq quantops-fp8 lc-fp8; do
        perplexity "$label"
    done
    ;;
llama1b)
    "${ref[@]}" make-llama1b --out "$vol/llama1b" --tokenizer-dir "$vol/tiny-llama" \
        --calib-out "$vol/calib1b.json" --samples 128 --seq-len 2048 --seed 0
    llmcompressor lc-gptq --model "$vol/llama1b" --calib "$vol/calib1b.json" \
        --scheme W4A16 --method gptq --samples 128 --seq-len 2048
    quantops quantops-gptq "$here/specs/llama1b-gptq.yaml"
    llmcompressor lc-fp8 --model "$vol/llama1b" --calib "$vol/calib1b.json" \
        --scheme FP8_DYNAMIC --method rtn --samples 128 --seq-len 2048
    quantops quantops-fp8 "$here/specs/llama1b-fp8.yaml"
    llmcompressor lc-rtn --model "$vol/llama1b" --scheme W4A16 --method rtn
    quantops quantops-rtn "$here/specs/llama1b-rtn.yaml"
    ;;
llama8b)
    # 16 GB of bf16 weights: quantops streams one layer at a time (its
    # peak_gpu_gib shows how much was ever on the device at once);
    # llm-compressor's data-free FP8 beside it, its GPTQ left out (minutes).
    "${ref[@]}" make-llama1b --out "$vol/llama8b" --tokenizer-dir "$vol/tiny-llama" \
        --calib-out "$vol/calib8b.json" --samples 128 --seq-len 2048 --seed 0 \
        --layers 32 --hidden 4096 --intermediate 14336 --vocab 128256 --heads 32 --kv-heads 8
    llmcompressor lc-fp8 --model "$vol/llama8b" --scheme FP8_DYNAMIC --method rtn
    quantops quantops-fp8 "$here/specs/llama8b-fp8.yaml"
    quantops quantops-gptq "$here/specs/llama8b-gptq.yaml"
    ;;
llama70b-*)
    # Made once per machine: a later case finds the model in place.
    large=/dev/shm/quantops-llama70b
    if [ ! -f "$large/model/model.safetensors.index.json" ]; then
        rm -rf "$large" /tmp/quantops-llama70b-shards
        "${ref[@]}" make-sharded --out "$large/model" --tokenizer-dir "$vol/tiny-llama" \
            --shard-dir /tmp/quantops-llama70b-shards="${DISK_GB:-46}" --shard-dir "$large/shards=1000" \
            --calib-out "$large/calib.json" --samples 16 --seq-len 512 \
            --layers 50 --hidden 8192 --intermediate 28672 --vocab 128256 --heads 64 --kv-heads 8 |
            tee -a "$results"
    fi
    ln -s "$large/model" "$vol/llama70b"
    ln -s "$large/calib.json" "$vol/calib70b.json"
    nvidia-smi --query-gpu=memory.total --format=csv,noheader
    df -h /tmp /dev/shm | tail -2
    quantops "quantops-${case_name#llama70b-}" "$here/specs/$case_name.yaml"
    rm -rf "$vol/out"
    ;;
*)
    echo "unknown case $case_name (tiny, llama1b, llama8b, llama70b-rtn or llama70b-gptq)" >&2
    exit 2
    ;;
esac

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l.split(" ", 1)[1]) if l.startswith("RESULT ") else json.loads(l)
        for l in open(sys.argv[1]) if l.strip()]
timed = {r["run"]: r for r in rows if "oneshot_s" in r}
ppl = {r["run"]: r for r in rows if "perplexity" in r}
print(f"{'run':<16}{'oneshot s':>11}{'total s':>10}{'perplexity':>12}")
for run, r in timed.items():
    total = r.get("process_s", r.get("total_s"))
    p = ppl.get(run, {}).get("perplexity")
    print(f"{run:<16}{r['oneshot_s']:>11.2f}{total:>10.2f}{(f'{p:.4f}' if p else '-'):>12}")
for method in ("gptq", "fp8"):
    a, b = timed.get(f"quantops-{method}"), timed.get(f"lc-{method}")
    if a and b:
        print(f"{method}: quantops / llm-compressor oneshot time = {a['oneshot_s'] / b['oneshot_s']:.3f}")
    pa, pb = ppl.get(f"quantops-{method}"), ppl.get(f"lc-{method}")
    if pa and pb:
        print(f"{method}: perplexity quantops {pa['perplexity']:.4f} vs llm-compressor {pb['perplexity']:.4f} ({100 * (pa['perplexity'] / pb['perplexity'] - 1):+.2f}%)")
if "tiny-llama" in ppl:
    print(f"fp16 perplexity {ppl['tiny-llama']['perplexity']:.4f}")
EOF
