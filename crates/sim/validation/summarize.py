#!/usr/bin/env python3
"""Turns measure.sh's raw JSON into the scenarios of default-cpu.json (medians over repeats).

usage: summarize.py OUT_DIR MACHINE COMMIT > crates/sim/validation/default-cpu.json
Exceptions (figures with their own tolerance and the reason) are carried over from the
existing file, so re-measuring keeps the explanations.
"""
import json, os, statistics, sys

out, machine, commit = sys.argv[1], sys.argv[2], sys.argv[3]
here = os.path.dirname(os.path.abspath(__file__))
try:
    previous = {s["name"]: s for s in json.load(open(os.path.join(here, "default-cpu.json")))["scenarios"]}
except (OSError, ValueError, KeyError):
    previous = {}

def runs(prefix):
    files = sorted(f for f in os.listdir(out) if f.startswith(prefix + "-") and f.endswith(".json"))
    return [json.load(open(os.path.join(out, f))) for f in files]

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

# The HTTP front end's time per request in the simulation of `bench serve` runs: assumed (a
# JSON body and 128 tokens to tokenize), not measured; what matters is that requests sent
# together reach a running engine one after another.
INGEST_MS = 2.0
scenarios = []
tp = runs("throughput")
if tp:
    figures = [{"output_throughput": r["output_tokens_per_s"], "ttft_p50_ms": None, "tpot_p50_ms": None,
                "steps": r["steps"], "decode_steps": r["decode_steps"],
                "mean_decode_batch": r["mean_decode_batch"]} for r in tp]
    scenarios.append({
        "name": "bench throughput 256 x 128 x 128",
        "command": "minserve bench throughput --num-prompts 256 --input-len 128 --output-len 128",
        "load": "all_at_once", "num_prompts": 256, "input_len": 128, "output_len": 128,
        "figures": figures})
for prefix, load, n, flag in [("c1", {"concurrency": 1}, 16, "--concurrency 1"),
                              ("c8", {"concurrency": 8}, 32, "--concurrency 8"),
                              ("c32", {"concurrency": 32}, 64, "--concurrency 32"),
                              ("rate1", {"request_rate": 1.0}, 32, "--request-rate 1"),
                              ("rate4", {"request_rate": 4.0}, 64, "--request-rate 4")]:
    rs = runs(prefix)
    if not rs:
        continue
    assert all(r["failed"] == 0 for r in rs), prefix
    # The server counts the prompt as it tokenized it (BOS included).
    input_len = round(median([r["total_input_tokens"] / r["completed"] for r in rs]))
    figures = [{"output_throughput": r["output_throughput"], "ttft_p50_ms": r["ttft_ms"]["p50"],
                "tpot_p50_ms": r["tpot_ms"]["p50"]} for r in rs]
    scenarios.append({
        "name": f"bench serve {flag}",
        "command": f"minserve bench serve --input-len 128 --output-len 128 --ignore-eos {flag} --num-prompts {n}",
        "load": load, "num_prompts": n, "input_len": input_len, "output_len": 128,
        "ingest_ms": INGEST_MS, "figures": figures})
for s in scenarios:
    figures = s.pop("figures")
    s["measured"] = {k: median([f[k] for f in figures]) for k in figures[0]}
    s["runs"] = figures
    s["exceptions"] = previous.get(s["name"], {}).get("exceptions", [])
print(json.dumps({
    "profile": "default-cpu",
    "machine": machine,
    "commit": commit,
    "method": f"crates/sim/validation/measure.sh (release build, nice -n -15, {len(tp)} interleaved repeats), medians by summarize.py",
    "tolerance": 0.10,
    "scenarios": scenarios}, indent=2))
