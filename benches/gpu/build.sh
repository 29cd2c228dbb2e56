#!/usr/bin/env bash
# Builds what benches/gpu/run.sh runs, on a machine without a GPU, for a GPU machine without a
# Rust toolchain: the release minserve and the GPU-vs-CPU test, both with `--features cuda`,
# stripped and compressed into target/gpu (ignored by git; carry it with the working tree,
# under 64 MiB). CUDA comes from scripts/cuda-toolkit; the GPU machine's own driver and
# CUDA 13 libraries are loaded at run time.
#
#   bash benches/gpu/build.sh   # ~20 min on 2 cores the first time: candle-kernels twice (the
#                               # binary and the test resolve different feature sets)
set -euo pipefail
cd "$(dirname "$0")/../.."

eval "$(scripts/cuda-toolkit --link)"
# x86-64-v3 (AVX2), not `native`: the GPU machine's CPU is not this one.
export RUSTFLAGS="-C target-cpu=x86-64-v3"
# A target folder of its own, so that these flags do not rebuild the native one.
export CARGO_TARGET_DIR=target/gpu-build

cargo build --release -p minserve --features cuda
test_binary=$(cargo test --release -p minserve-model --features cuda --test cuda --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')

rm -rf target/gpu && mkdir -p target/gpu
cp "$CARGO_TARGET_DIR/release/minserve" target/gpu/minserve
cp "$test_binary" target/gpu/cuda-test
strip target/gpu/minserve target/gpu/cuda-test
xz -T0 -6 target/gpu/minserve target/gpu/cuda-test
du -ch target/gpu/*
