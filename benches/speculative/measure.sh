#!/usr/bin/env bash
# Speculative decoding A/B (docs/speculative-decoding.md): the release server without and with
# `--speculative ngram`, alternating, ROUNDS rounds; per round and mode, `bench serve` (chat,
# greedy, EOS honoured) on the repetitive and the free prompts at concurrency 1 and 8, and the
# greedy texts of every prompt saved to check that they are identical.
#
#   benches/speculative/measure.sh [OUT_DIR] [ROUNDS]
#
# SETS (default "repetitive free") and CONCURRENCIES (default "1 8") narrow it down.
# Needs a release build (`cargo build --release -p minserve`) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/spec-measure}
ROUNDS=${2:-3}
BIN=target/release/minserve
PORT=${PORT:-8471}
DATA=benches/speculative
SETS=${SETS:-repetitive free}
CONCURRENCIES=${CONCURRENCIES:-1 8}
mkdir -p "$OUT"

start_server() {
  "$BIN" serve --port "$PORT" "$@" >"$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server did not start" >&2
  cat "$OUT/server.log" >&2
  exit 1
}

stop_server() {
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
}

texts() { # the greedy text of every prompt of both sets, one JSON line each
  python3 - "$PORT" "$DATA" <<'EOF'
import json, sys, urllib.request
port, data = sys.argv[1], sys.argv[2]
for name in ("repetitive", "free"):
    for line in open(f"{data}/{name}.jsonl"):
        entry = json.loads(line)
        body = {"messages": [{"role": "user", "content": entry["prompt"]}],
                "max_tokens": entry["output_len"], "temperature": 0}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request))
        print(json.dumps({"set": name, "text": answer["choices"][0]["message"]["content"]}))
EOF
}

for round in $(seq 1 "$ROUNDS"); do
  for mode in off ngram; do
    flags=()
    [ "$mode" = ngram ] && flags=(--speculative ngram)
    start_server "${flags[@]}"
    texts >"$OUT/texts-$mode.jsonl"
    for set in $SETS; do
      for c in $CONCURRENCIES; do
        "$BIN" bench serve --base-url "http://127.0.0.1:$PORT" --endpoint chat \
          --dataset "$DATA/$set.jsonl" --num-prompts $((c == 1 ? 8 : 16)) --concurrency "$c" \
          --json "$OUT/r$round-$mode-$set-c$c.json" >/dev/null
      done
    done
    curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^minserve_spec_decode' \
      >"$OUT/r$round-$mode-metrics.txt" || true
    stop_server
    echo "round $round $mode done, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
  done
done

cmp "$OUT/texts-off.jsonl" "$OUT/texts-ngram.jsonl" && echo "greedy texts identical"
python3 - "$OUT" "$ROUNDS" "$SETS" "$CONCURRENCIES" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print("| task | concurrency | off tok/s | ngram tok/s | gain |")
print("| --- | --- | --- | --- | --- |")
for task in sys.argv[3].split():
    for c in map(int, sys.argv[4].split()):
        med = {}
        for mode in ("off", "ngram"):
            runs = [json.load(open(f"{out}/r{r}-{mode}-{task}-c{c}.json"))["output_throughput"]
                    for r in range(1, rounds + 1)]
            med[mode] = statistics.median(runs)
        print(f"| {task} | {c} | {med['off']:.1f} | {med['ngram']:.1f} | "
              f"{med['ngram'] / med['off']:.2f}x |")
EOF
