#!/usr/bin/env bash
# Measures the scenarios that crates/sim/validation/default-cpu.json compares the simulator with:
# `bench throughput` 256 x 128 x 128 and `bench serve` (completions, ignore_eos, 128 tokens out)
# at concurrency 1, 8, 32 and at 1 and 4 requests/s, each REPEATS times, interleaved so that a
# noisy minute spreads over all of them. Raw JSON goes to OUT; summarize.py makes the medians.
#
#   cargo build --release -p minserve && crates/sim/validation/measure.sh /tmp/sim-measure
set -euo pipefail
BIN=${BIN:-target/release/minserve}
OUT=${1:-/tmp/sim-measure}
REPEATS=${REPEATS:-3}
PORT=${PORT:-18431}
# Other work on a shared machine slows the model's threads; a higher priority helps.
NICE=${NICE:-nice -n -15}
mkdir -p "$OUT"
# A fresh server per run: every run sends the same seeded prompts, and a server that had seen
# them would serve them from its prefix cache (the simulation starts cold).
serve() { # name, load flags...
  local name=$1; shift
  $NICE "$BIN" serve --port "$PORT" >>"$OUT/serve.log" 2>&1 &
  local server=$!
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.5; done
  $NICE "$BIN" bench serve --base-url "http://127.0.0.1:$PORT" --input-len 128 --output-len 128 \
    --ignore-eos "$@" --json "$OUT/$name-$r.json" >/dev/null
  kill "$server"
  wait "$server" || true
}
for r in $(seq 1 "$REPEATS"); do
  $NICE "$BIN" bench throughput --num-prompts 256 --input-len 128 --output-len 128 --json \
    >"$OUT/throughput-$r.json"
  serve c1 --concurrency 1 --num-prompts 16
  serve c8 --concurrency 8 --num-prompts 32
  serve c32 --concurrency 32 --num-prompts 64
  serve rate1 --request-rate 1 --num-prompts 32
  serve rate4 --request-rate 4 --num-prompts 64
  echo "repeat $r done" >&2
done
