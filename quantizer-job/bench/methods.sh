#!/usr/bin/env bash
# Benchmark (not a test): wall time and peak memory of the quantize stage for
# each method on the bundled model, on this machine's CPU.
#
#   quantizer-job/bench/methods.sh [samples] [sequence_length]
#
# Prints a Markdown table; the README records what it printed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
samples=${1:-128}
seqlen=${2:-512}
bin=target/release/quantizer-job
[[ -x $bin ]] || cargo build --release -p quantizer-job
out=target/bench/methods
mkdir -p "$out"
echo "| method | recipe | calibration | wall time (s) | CPU time (s) | peak RSS (MiB) |"
echo "| --- | --- | --- | --- | --- | --- |"
while read -r method bits group sym; do
  spec="$out/$method.yaml"
  sed -e "s/method: gptq/method: $method/" -e "s/bits: 4/bits: $bits/" \
      -e "s/groupSize: 128/groupSize: $group/" -e "s/symmetric: false/symmetric: $sym/" \
      -e "s/samples: 128, sequenceLength: 512/samples: $samples, sequenceLength: $seqlen/" \
      manifests/examples/tiny-llama-int4-gptq.yaml > "$spec"
  /usr/bin/time -f "%e %U %S %M" -o "$out/$method.time" \
    "$bin" quantize --spec "$spec" --root manifests/examples/volume --allow-links-out-of-root --output-root "$out" \
    > "$out/$method.log" 2>&1
  read -r wall user sys rss_kib < "$out/$method.time"
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')
  calib="-"
  [[ $method == gptq || $method == awq ]] && calib="${samples}x${seqlen}"
  printf '| %s | %s-bit, group %s, symmetric %s | %s | %s | %s | %d |\n' \
    "$method" "$bits" "$group" "$sym" "$calib" "$wall" "$cpu" $((rss_kib / 1024))
done <<'METHODS'
rtn 4 128 false
gptq 4 128 false
awq 4 128 false
int8 8 -1 true
fp8 8 -1 true
METHODS
