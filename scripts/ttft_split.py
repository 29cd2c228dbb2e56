#!/usr/bin/env python3
"""Splits time to first token into the engine's part and the rest (docs/simulator.md).

    minserve serve --trace-file TRACE &
    minserve bench serve ... --json BENCH
    scripts/ttft_split.py TRACE BENCH

From the server's engine trace (docs/trace.md), per request: the engine-side TTFT, from the
`arrived` event (the engine thread took the request off its queue) to the end of the first
step that sampled for it, and that step's duration. From `bench serve --json`, the client's
TTFT. The difference of the medians is what happens outside the engine's steps: HTTP,
tokenizing, the queue to the engine thread, waiting for the step in flight to end, the first
SSE event.
"""
import json
import statistics
import sys


def main(trace_path, bench_path):
    records = [json.loads(line) for line in open(trace_path)]
    arrived = {}
    first_sample = {}
    steps = sorted((r for r in records if r.get("type") == "step"), key=lambda r: r["step"])
    for r in records:
        if r.get("type") == "request" and r["event"] == "arrived":
            arrived[r["request"]] = r["t_ms"]
    for step in steps:
        for seq in step["seqs"]:
            if seq.get("samples") and seq["request"] not in first_sample:
                first_sample[seq["request"]] = (step["t_ms"] + step["duration_ms"], step["duration_ms"])
    requests = [r for r in first_sample if r in arrived]
    engine_ttft = statistics.median(first_sample[r][0] - arrived[r] for r in requests)
    first_step = statistics.median(first_sample[r][1] for r in requests)
    bench = json.load(open(bench_path))
    client_ttft = bench["ttft_ms"]["p50"]
    print(f"requests: {len(requests)}")
    print(f"engine TTFT p50: {engine_ttft:.1f} ms (its first step alone: {first_step:.1f} ms)")
    print(f"client TTFT p50: {client_ttft:.1f} ms")
    print(f"outside the engine's steps: {client_ttft - engine_ttft:.1f} ms")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
