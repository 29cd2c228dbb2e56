#!/usr/bin/env bash
# The device check for a machine with one NVIDIA GPU: the GPU-vs-CPU correctness tests, then
# decode throughput of a synthetic Llama-1B in bf16 at batch 1, 32 and 256, printed as a table
# against the memory-bandwidth roofline. Runs what benches/gpu/build.sh left in target/gpu.
#
#   bash benches/gpu/run.sh [PEAK_GB_PER_S]   # default 4800: an H200's HBM3e
set -uo pipefail
cd "$(dirname "$0")/../.."
peak_gbps=${1:-4800}
out=${OUT:-target/gpu/out}
mkdir -p "$out"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# The binaries link libcuda, cuBLAS, cuRAND, NVRTC and the CUDA runtime dynamically: find
# them wherever this machine keeps them (the driver's folder, a toolkit, a Python wheel).
libs=$(find / \( -path /proc -o -path /sys -o -path "$PWD" \) -prune -o \
    \( -name 'libcuda.so.1' -o -name 'libcublas.so.13' -o -name 'libcublasLt.so.13' \
    -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' \) \
    -not -path '*/stubs/*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

for binary in minserve cuda-test; do
    [ -x "target/gpu/$binary" ] && continue
    if command -v xz >/dev/null; then xz -dkf "target/gpu/$binary.xz"
    else python3 -c 'import lzma,sys; open(sys.argv[1][:-3],"wb").write(lzma.open(sys.argv[1]).read())' \
        "target/gpu/$binary.xz"; fi
    chmod +x "target/gpu/$binary"
done
ldd target/gpu/minserve | grep 'not found' && echo "missing libraries: see above"

echo "== correctness: the GPU against the CPU on the same synthetic weights"
target/gpu/cuda-test --test-threads 1 --nocapture 2>&1 | tee "$out/correctness.txt" |
    grep -E '^(test |synthetic|head|alone|test result)'

echo "== decode throughput: synthetic:llama-1b@bf16, 128 prompt + 128 output tokens"
model=synthetic:llama-1b@bf16
run() { # batch, prompts
    target/gpu/minserve bench throughput --model $model --device cuda --dtype bf16 \
        --max-num-seqs "$1" --num-prompts "$2" --input-len 128 --output-len 128 \
        --max-num-batched-tokens 8192 --trace-file "$out/trace-$1.jsonl" --json \
        2>"$out/bench-$1.err" | tee "$out/bench-$1.json"
}
for batch in 1 32 256; do
    prompts=$((batch == 1 ? 8 : batch))
    run "$batch" "$prompts" >/dev/null || { echo "batch $batch failed:"; head -3 "$out/bench-$batch.err"; }
done

echo "== the simulator's cost model fitted to these runs' steps (docs/simulator.md), beside the"
echo "   llama-1b-h200 roofline preset it would replace"
target/gpu/minserve simulate calibrate --model $model --from-trace "$out/trace-1.jsonl" \
    --from-trace "$out/trace-32.jsonl" --from-trace "$out/trace-256.jsonl" \
    --name llama-1b-h200-measured --output "$out/llama-1b-h200-measured.json" 2>&1 | tail -12

# Bytes a decode step must read: every weight once (bf16; the tied embedding is read as the
# lm_head) plus each sequence's keys and values (bf16) over its mean context (128 + 64).
python3 - "$out" "$peak_gbps" <<'PY'
import json, sys, os
out, peak = sys.argv[1], float(sys.argv[2]) * 1e9
hidden, inter, layers, heads, kv_heads, vocab = 2048, 8192, 16, 32, 8, 128256
head_dim = hidden // heads
params = layers * (hidden * (heads + 2 * kv_heads) * head_dim + hidden * hidden + 3 * hidden * inter) + vocab * hidden
weight_bytes = 2 * params
kv_bytes_per_token = 2 * layers * 2 * kv_heads * head_dim
print("| batch | decode step (ms) | decode tok/s | roofline step (ms) | of roofline | output tok/s (whole run) |")
print("| ---: | ---: | ---: | ---: | ---: | ---: |")
rates = {}
for batch in (1, 32, 256):
    try:
        r = json.load(open(os.path.join(out, f"bench-{batch}.json")))
    except (OSError, ValueError):
        print(f"| {batch} | failed | | | | |")
        continue
    b = r["mean_decode_batch"]
    step_ms = r["decode_step_ms"]
    roof_ms = (weight_bytes + b * 192 * kv_bytes_per_token) / peak * 1e3
    rates[batch] = r["decode_tokens_per_s"]
    print(f"| {batch} (mean {b:.0f}) | {step_ms:.2f} | {rates[batch]:.0f} | {roof_ms:.3f} "
          f"| {roof_ms / step_ms:.0%} | {r['output_tokens_per_s']:.0f} |")
if 1 in rates and 256 in rates:
    print(f"batching gain, decode tok/s at 256 over 1: {rates[256] / rates[1]:.1f}x")
PY
