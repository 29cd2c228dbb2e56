#!/usr/bin/env bash
# Speculative decoding A/B (docs/speculative-decoding.md): the release server without and with
# speculation, alternating, ROUNDS rounds; per round and mode, `bench serve` (chat, greedy, EOS
# honoured) on the repetitive and the free prompts at concurrency 1 and 8, and the greedy texts
# of every prompt saved to check that they are identical.
#
#   benches/speculative/measure.sh [OUT_DIR] [ROUNDS]
#
# SETS (default "repetitive free") and CONCURRENCIES (default "1 8") narrow it down. MODES
# (default "off ngram") picks the servers: `off`, `ngram` (--speculative ngram) and `draft`
# (--speculative draft:$DRAFT). MODEL is the target (default: the default model); DRAFT the draft
# model (default: the default model, e.g. drafting for its f32 export made by `minserve export`);
# SERVE_FLAGS more flags for every server (e.g. "--weights-format q8_0 --lm-head-format q8_0").
# Needs a release build (`cargo build --release -p minserve`) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/spec-measure}
ROUNDS=${2:-3}
BIN=target/release/minserve
PORT=${PORT:-8471}
DATA=benches/speculative
MODES=${MODES:-off ngram}
MODEL=${MODEL:-}
DRAFT=${DRAFT:-smollm2-135m-instruct}
SETS=${SETS:-repetitive free}
CONCURRENCIES=${CONCURRENCIES:-1 8}
mkdir -p "$OUT"

start_server() {
  local model=()
  [ -n "$MODEL" ] && model=(--model "$MODEL")
  # shellcheck disable=SC2086 # SERVE_FLAGS is a list of flags
  "$BIN" serve --port "$PORT" "${model[@]}" ${SERVE_FLAGS:-} "$@" >"$OUT/server.log" 2>&1 &
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
  for mode in $MODES; do
    case $mode in
      off) flags=() ;;
      ngram) flags=(--speculative ngram) ;;
      draft) flags=(--speculative "draft:$DRAFT") ;;
      *) echo "unknown mode $mode" >&2; exit 1 ;;
    esac
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

first=${MODES%% *}
for mode in $MODES; do
  [ "$mode" = "$first" ] && continue
  cmp "$OUT/texts-$first.jsonl" "$OUT/texts-$mode.jsonl" && echo "greedy texts of $mode identical to $first"
done
python3 - "$OUT" "$ROUNDS" "$SETS" "$CONCURRENCIES" "$MODES" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
modes = sys.argv[5].split()
print("| task | concurrency | " + " | ".join(f"{m} tok/s" for m in modes)
      + "".join(f" | {m} gain" for m in modes[1:]) + " |")
print("| --- | --- |" + " --- |" * (2 * len(modes) - 1))
for task in sys.argv[3].split():
    for c in map(int, sys.argv[4].split()):
        med = {}
        for mode in modes:
            runs = [json.load(open(f"{out}/r{r}-{mode}-{task}-c{c}.json"))["output_throughput"]
                    for r in range(1, rounds + 1)]
            med[mode] = statistics.median(runs)
        print(f"| {task} | {c} | " + " | ".join(f"{med[m]:.1f}" for m in modes)
              + "".join(f" | {med[m] / med[modes[0]]:.2f}x" for m in modes[1:]) + " |")
EOF
