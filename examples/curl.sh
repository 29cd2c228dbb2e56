#!/usr/bin/env bash
# The API with curl. Start the server first: `minserve serve` (add --api-key KEY to require one).
set -euo pipefail
BASE=${MINSERVE_BASE_URL:-http://127.0.0.1:8000}
AUTH=(-H "Authorization: Bearer ${MINSERVE_API_KEY:-unused}")
MODEL=$(curl -s "${AUTH[@]}" "$BASE/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

echo "== health";  curl -s -o /dev/null -w '%{http_code}\n' "$BASE/health"

echo "== chat"
curl -s "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
  "max_tokens": 48, "temperature": 0
}'
echo

echo "== chat, streamed (server-sent events)"
curl -sN "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Count to five."}],
  "max_tokens": 24, "stream": true, "stream_options": {"include_usage": true}
}'

echo "== completion"
curl -s "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$MODEL"'", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0
}'
echo

echo "== tokenize"
curl -s "${AUTH[@]}" "$BASE/tokenize" -H 'Content-Type: application/json' -d '{"prompt": "Hello world"}'
echo

echo "== metrics (excerpt)"
curl -s "$BASE/metrics" | grep -E '^minserve_(num_requests|kv_cache|generation_tokens)'
