#!/usr/bin/env python3
"""Runs the scheduling experiments of docs/experiments.md on the real default model.

Each experiment starts real `minserve serve` processes (or runs `minserve bench throughput` /
`bench preemption` in process), measures with the project's own load generator, keeps every raw
result under OUT/NAME/, draws its chart with `minserve bench chart` into IMG/experiment-NAME.{svg,png}
and prints a markdown table (also written to OUT/NAME/table.md).

    cargo build --release -p minserve
    python3 scripts/experiments.py                      # every experiment (about 20 minutes)
    python3 scripts/experiments.py batching chunk-budget
    python3 scripts/experiments.py --quick kv-pool      # a smoke-sized run

Only the Python standard library is used. Per-request times that `bench serve` does not split by
class (long/short prompts, priorities) are read from the engine trace (docs/trace.md).
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIB_PER_TOKEN = 22.5  # the default model's KV cache per token (30 layers x 3 KV heads x 64 x K,V x f16): `minserve kv-calc`


class Runner:
    def __init__(self, args):
        self.bin = str(Path(args.bin).resolve())
        self.out = Path(args.out)
        self.img = Path(args.img)
        self.port = args.port
        self.quick = args.quick
        self.nice = ["nice", "-n", str(args.nice)] if args.nice else []

    def sized(self, full, quick):
        return quick if self.quick else full

    def run(self, argv, **kw):
        return subprocess.run(self.nice + [self.bin] + argv, check=True, text=True,
                              capture_output=True, cwd=ROOT, **kw).stdout

    @contextlib.contextmanager
    def server(self, name, flags, log_dir):
        """A fresh server per measurement: no run finds another's prompts in its prefix cache."""
        log = open(log_dir / f"{name}.serve.log", "w")
        proc = subprocess.Popen(self.nice + [self.bin, "serve", "--port", str(self.port)] + flags,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server {name} exited: see {log.name}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                        if r.status == 200:
                            break
                if time.time() > deadline:
                    raise RuntimeError(f"server {name} did not become healthy")
                time.sleep(0.3)
            yield
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            if proc.poll() is None:
                proc.kill()
            log.close()

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"

    def metric(self, name):
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name) and not line.startswith("#"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def bench_serve(self, out_json, load, workload):
        self.run(["bench", "serve", "--base-url", self.url(), "--json", str(out_json)] + load + workload)
        return json.loads(Path(out_json).read_text())

    def bench_throughput(self, flags):
        return json.loads(self.run(["bench", "throughput", "--json"] + flags).strip().splitlines()[-1])

    def chart(self, name, spec, out_dir):
        path = out_dir / "chart.json"
        path.write_text(json.dumps(spec, indent=1))
        self.img.mkdir(parents=True, exist_ok=True)
        self.run(["bench", "chart", str(path), "--out", str(self.img / f"experiment-{name}")])


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round((len(values) - 1) * p))] if values else float("nan")


# ---------------------------------------------------------------- workloads

WORDS = ("the model serves many requests at once and the scheduler decides which of them run in "
         "each step while the cache keeps their keys and values in blocks of sixteen tokens").split()


def filler(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


def varied_dataset(path, n, seed, short_words=(20, 60), long_share=0.0, long_words=450,
                   output=(16, 160), urgent_share=0.0):
    """Prompts of varied length and output lengths drawn uniformly (exact with ignore_eos): the
    spread that makes a static batch wait for its longest member."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            is_long = rng.random() < long_share
            words = long_words if is_long else rng.randint(*short_words)
            line = {"prompt": f"Request {i}: " + filler(rng, words),
                    "output_len": rng.randint(*output)}
            if urgent_share:
                line["priority"] = -1 if rng.random() < urgent_share else 0
            f.write(json.dumps(line) + "\n")


QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.",
    "Explain how a rainbow forms.", "List five fruits that are red.",
    "Tell me a short story about a brave mouse.", "What is 12 times 12?",
    "Describe the water cycle for a child.", "Give three tips for learning to cook.",
    "Who wrote Romeo and Juliet?", "Write a limerick about a cat who loves the sea.",
    "Why is the sky blue?", "Summarize the plot of Cinderella.",
    "Name the planets of the solar system.", "How do bees make honey?",
    "Write a friendly email inviting a colleague to lunch.", "What does a compiler do?",
    "Explain what a black hole is.", "Suggest a name for a bakery.",
    "What are the primary colors?", "Write two sentences about the ocean.",
    "How many legs does a spider have?", "Describe your ideal weekend.",
    "What is photosynthesis?", "Give a recipe for a simple salad.",
]


# ---------------------------------------------------------------- trace reading

def read_trace(path):
    steps, requests = [], {}
    with open(path) as f:
        header = json.loads(f.readline())
        for line in f:
            r = json.loads(line)
            if "duration_ms" in r:
                steps.append(r)
            else:
                requests.setdefault(r["request"], []).append(r)
    return header, steps, requests


def ttft_by_request(steps, requests):
    """Arrival to the end of the step in which a request first sampled (its first token)."""
    arrived = {rid: ev[0]["t_ms"] for rid, ev in requests.items() if ev[0]["event"] == "arrived"}
    first = {}
    for s in steps:
        end = s["t_ms"] + s["duration_ms"]
        for q in s["seqs"]:
            if q["samples"] and q["request"] not in first:
                first[q["request"]] = end
    return {rid: first[rid] - t for rid, t in arrived.items() if rid in first}


def arrival_record(events):
    return next(e for e in events if e["event"] == "arrived")


# ---------------------------------------------------------------- experiments

def batching(r, out):
    """Static (pre-Orca) against continuous batching at rising request rates."""
    rates = r.sized([1, 2, 4, 8], [2, 8])
    dataset = out / "varied.jsonl"
    varied_dataset(dataset, 200, seed=1)
    rows, series = [], {}
    for mode in ["continuous", "static"]:
        for rate in rates:
            n = r.sized(max(16, int(8 * rate)), 8)
            with r.server(f"{mode}-{rate}", ["--batching", mode], out):
                rep = r.bench_serve(out / f"{mode}-{rate}.json",
                                    ["--request-rate", str(rate), "--num-prompts", str(n)],
                                    ["--dataset", str(dataset), "--ignore-eos"])
            series.setdefault(mode, []).append((rate, rep))
            rows.append([mode, rate, n, f"{rep['output_throughput']:.0f}",
                         f"{rep['ttft_ms']['p50']:.0f}", f"{rep['ttft_ms']['p99']:.0f}",
                         f"{rep['tpot_ms']['p50']:.1f}", f"{rep['e2el_ms']['p50']:.0f}"])
    # Saturation: 32 clients, each sending its next request when the last ends (a static batch
    # then idles its seats while its longest member finishes).
    saturated = {}
    for mode in ["continuous", "static"]:
        n = r.sized(128, 32)
        with r.server(f"{mode}-c32", ["--batching", mode, "--max-num-seqs", "32"], out):
            rep = r.bench_serve(out / f"{mode}-c32.json", ["--concurrency", "32", "--num-prompts", str(n)],
                                ["--dataset", str(dataset), "--ignore-eos"])
        saturated[mode] = rep
        rows.append([mode, "32 clients", n, f"{rep['output_throughput']:.0f}",
                     f"{rep['ttft_ms']['p50']:.0f}", f"{rep['ttft_ms']['p99']:.0f}",
                     f"{rep['tpot_ms']['p50']:.1f}", f"{rep['e2el_ms']['p50']:.0f}"])
    panel = lambda label, f, log=False: {"y_label": label, "y_log": log, "series": [
        {"name": m, "points": [[x, f(rep)] for x, rep in pts]} for m, pts in series.items()]}
    r.chart("batching", {"title": "Static vs continuous batching (default model, varied output lengths)",
                         "x_label": "requests/s", "x_log": True, "panels": [
        panel("output tokens/s", lambda rep: rep["output_throughput"]),
        panel("TTFT p50 (ms)", lambda rep: rep["ttft_ms"]["p50"], True),
        panel("E2E latency p50 (ms)", lambda rep: rep["e2el_ms"]["p50"], True)]}, out)
    return table(["batching", "req/s", "requests", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
                  "TPOT p50 ms", "E2E p50 ms"], rows)


def chunk_budget(r, out):
    """The step's token budget: long prompts chunked finer help the decodes they share steps with."""
    budgets = r.sized([64, 256, 512, 2048], [64, 2048])
    rows, reps = [], []
    for budget in budgets:
        n = r.sized(16, 6)
        with r.server(f"budget-{budget}", ["--max-num-batched-tokens", str(budget)], out):
            rep = r.bench_serve(out / f"budget-{budget}.json",
                                ["--request-rate", "0.5", "--num-prompts", str(n)],
                                ["--input-len", "512", "--output-len", "64", "--ignore-eos"])
        reps.append((budget, rep))
        rows.append([budget, f"{rep['ttft_ms']['p50']:.0f}", f"{rep['ttft_ms']['p99']:.0f}",
                     f"{rep['tpot_ms']['p50']:.1f}", f"{rep['tpot_ms']['p99']:.1f}",
                     f"{rep['itl_ms']['p99']:.1f}", f"{rep['output_throughput']:.0f}"])
    pts = lambda k, q: [[b, rep[k][q]] for b, rep in reps]
    r.chart("chunk-budget", {"title": "Chunked prefill: token budget per step (512-token prompts, 0.5 req/s)",
                             "x_label": "--max-num-batched-tokens", "x_log": True, "panels": [
        {"y_label": "TTFT (ms)", "y_log": True, "series": [
            {"name": "p50", "points": pts("ttft_ms", "p50")}, {"name": "p99", "points": pts("ttft_ms", "p99")}]},
        {"y_label": "TPOT / ITL (ms)", "series": [
            {"name": "TPOT p50", "points": pts("tpot_ms", "p50")},
            {"name": "TPOT p99", "points": pts("tpot_ms", "p99")},
            {"name": "ITL p99", "points": pts("itl_ms", "p99")}]}]}, out)
    return table(["budget", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "ITL p99 ms",
                  "output tok/s"], rows)


def kv_pool(r, out):
    """KV pool size against preemptions and throughput (everything submitted at once)."""
    sizes = r.sized([8, 16, 32, 64, 128, 384], [8, 64])
    n = r.sized(64, 16)
    rows, reps = [], []
    for mib in sizes:
        rep = r.bench_throughput(["--num-prompts", str(n), "--input-len", "128", "--output-len", "128",
                                  "--kv-cache-mib", str(mib)])
        (out / f"kv-{mib}.json").write_text(json.dumps(rep))
        reps.append((mib, rep))
        tokens = int(mib * 1024 / KIB_PER_TOKEN)
        rows.append([mib, tokens, f"{tokens / 256:.1f}", rep["num_preemptions"],
                     f"{rep['mean_decode_batch']:.1f}", f"{rep['output_tokens_per_s']:.0f}"])
    r.chart("kv-pool", {"title": f"KV pool size ({n} requests of 128 + 128 tokens at once)",
                        "x_label": "KV cache (MiB)", "x_log": True, "panels": [
        {"y_label": "output tokens/s", "series": [
            {"name": "throughput", "points": [[m, rep["output_tokens_per_s"]] for m, rep in reps]}]},
        {"y_label": "preemptions", "series": [
            {"name": "preemptions", "points": [[m, rep["num_preemptions"]] for m, rep in reps]}]},
        {"y_label": "mean decode batch", "series": [
            {"name": "batch", "points": [[m, rep["mean_decode_batch"]] for m, rep in reps]}]}]}, out)
    return table(["KV MiB", "tokens it holds", "full sequences it holds", "preemptions",
                  "mean decode batch", "output tok/s"], rows)


def held_tokens_and_slots(header, steps, requests, reserve=None):
    """Per step: tokens whose K/V are held, block slots held, and optionally what a contiguous
    reservation of `reserve(prompt_tokens)` tokens per running sequence would hold."""
    block = header["block_size"]
    prompt = {rid: arrival_record(ev)["prompt_tokens"] for rid, ev in requests.items()}
    computed = {}
    per_step = []
    for s in steps:
        for q in s["seqs"]:
            computed[q["id"]] = computed.get(q["id"], 0) + q["new_tokens"] + q["cached_tokens"]
        for gone in s["preempted"]:
            computed.pop(gone, None)
        tables = {t["id"]: t["tables"] for t in s.get("block_tables") or []}
        tokens = sum(computed.get(i, 0) for i in tables)
        slots = sum(sum(b is not None for b in t[0]) * block for t in tables.values())
        request_of = {q["id"]: q["request"] for q in s["seqs"]}
        reserved = sum(reserve(prompt[request_of[i]]) for i in tables) if reserve else 0
        per_step.append((s["step"], tokens, slots, reserved))
    return per_step


def block_size(r, out):
    """Block size against throughput, internal waste and prefix hits (a shared 120-token prefix)."""
    rows, reps = [], []
    n = r.sized(64, 12)
    for size in [8, 16, 32, 64]:
        trace = out / f"block-{size}.trace.jsonl"
        rep = r.bench_throughput(["--num-prompts", str(n), "--prefix-len", "120", "--input-len", "40",
                                  "--output-len", "64", "--block-size", str(size),
                                  "--trace-file", str(trace), "--trace-blocks"])
        (out / f"block-{size}.json").write_text(json.dumps(rep))
        header, steps, requests = read_trace(trace)
        per_step = [p for p in held_tokens_and_slots(header, steps, requests) if p[2]]
        waste = statistics.mean((slots - tokens) / slots for _, tokens, slots, _ in per_step)
        hit = rep["prefix_cache_hit_tokens"] / max(1, rep["prefix_cache_queried_tokens"])
        reps.append((size, rep, waste, hit))
        rows.append([size, f"{rep['output_tokens_per_s']:.0f}", f"{100 * waste:.1f}%",
                     f"{100 * hit:.1f}%", rep["prefix_cache_hit_tokens"]])
    r.chart("block-size", {"title": f"Block size ({n} requests: shared 120-token prefix + 40, 64 out)",
                           "x_label": "block size (tokens)", "x_log": True, "panels": [
        {"y_label": "output tokens/s", "series": [
            {"name": "throughput", "points": [[s, rep["output_tokens_per_s"]] for s, rep, _, _ in reps]}]},
        {"y_label": "percent", "series": [
            {"name": "slots held but empty", "points": [[s, 100 * w] for s, _, w, _ in reps]},
            {"name": "prompt tokens from cache", "points": [[s, 100 * h] for s, _, _, h in reps]}]}]}, out)
    return table(["block size", "output tok/s", "held slots empty (mean over steps)",
                  "prefix hit rate", "tokens from cache"], rows)


def paging_waste(r, out):
    """The vLLM paper's memory figure in miniature: chat requests that end at their own EOS, max_tokens
    256, through the server; what paging holds against contiguous per-request reservations."""
    max_tokens = 256
    dataset = out / "questions.jsonl"
    with open(dataset, "w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"prompt": q}) + "\n")
    trace = out / "paging.trace.jsonl"
    n = r.sized(48, 12)
    with r.server("paging", ["--trace-file", str(trace), "--trace-blocks"], out):
        with urllib.request.urlopen(r.url("/v1/models"), timeout=10) as models:
            max_model_len = json.load(models)["data"][0]["max_model_len"]
        r.bench_serve(out / "paging.json", ["--concurrency", "16", "--num-prompts", str(n)],
                      ["--dataset", str(dataset), "--endpoint", "chat", "--output-len", str(max_tokens)])
    header, steps, requests = read_trace(trace)
    per_step = [p for p in held_tokens_and_slots(header, steps, requests, lambda p: p + max_tokens) if p[2]]
    seqs_per_step = [len(s.get("block_tables") or []) for s in steps if s.get("block_tables")]
    tokens = sum(p[1] for p in per_step)
    slots = sum(p[2] for p in per_step)
    reserved = sum(p[3] for p in per_step)
    max_len = sum(seqs_per_step) * max_model_len
    rows = [
        ["paged, blocks of 16 (minserve)", f"{slots / len(per_step):.0f}", f"{100 * (1 - tokens / slots):.1f}%"],
        [f"contiguous, prompt + max_tokens ({max_tokens})", f"{reserved / len(per_step):.0f}",
         f"{100 * (1 - tokens / reserved):.1f}%"],
        [f"contiguous, the model's whole context ({max_model_len})", f"{max_len / len(per_step):.0f}",
         f"{100 * (1 - tokens / max_len):.1f}%"],
    ]
    r.chart("paging-waste", {"title": "KV memory held per step: paged blocks vs contiguous reservations",
                             "x_label": "step", "panels": [
        {"y_label": "token slots", "series": [
            {"name": "tokens in use", "points": [[s, t] for s, t, _, _ in per_step]},
            {"name": "paged (blocks of 16)", "points": [[s, sl] for s, _, sl, _ in per_step]},
            {"name": f"prompt + max_tokens", "points": [[s, rs] for s, _, _, rs in per_step]}]}]}, out)
    summary = (f"{n} chat requests, concurrency 16, {len(per_step)} steps; tokens in use average "
               f"{tokens / len(per_step):.0f} per step.\n\n")
    return summary + table(["allocation", "slots held (mean per step)", "held but unused"], rows)


def policies(r, out):
    """FCFS, backfill, priority and priority preemption under load, with a KV pool that holds one
    long prompt and a few short ones: who waits, read per request from the engine trace."""
    dataset = out / "mixed.jsonl"
    varied_dataset(dataset, 200, seed=2, short_words=(10, 30), long_share=0.2, long_words=450,
                   output=(32, 32), urgent_share=0.25)
    n = r.sized(60, 16)
    kv = ["--kv-cache-mib", "16", "--max-num-seqs", "16"]
    runs = [("fcfs", []), ("fcfs + backfill 8", ["--backfill", "8"]),
            ("priority", ["--scheduling-policy", "priority"]),
            ("priority + preemption", ["--priority-preemption"])]
    rows, per_run = [], []
    for name, flags in runs:
        trace = out / f"policy-{name.replace(' ', '_')}.trace.jsonl"
        with r.server(name, kv + flags + ["--trace-file", str(trace)], out):
            rep = r.bench_serve(out / f"policy-{name.replace(' ', '_')}.json",
                                ["--request-rate", "4", "--num-prompts", str(n)],
                                ["--dataset", str(dataset), "--ignore-eos"])
            preemptions = r.metric("minserve_num_preemptions_total")
        header, steps, requests = read_trace(trace)
        ttft = ttft_by_request(steps, requests)
        classes = {"long": [], "short": [], "urgent": [], "normal": []}
        for rid, t in ttft.items():
            a = arrival_record(requests[rid])
            classes["long" if a["prompt_tokens"] > 300 else "short"].append(t)
            classes["urgent" if a.get("priority", 0) < 0 else "normal"].append(t)
        per_run.append((name, classes))
        rows.append([name] + [f"{pct(classes[c], 0.5):.0f} / {pct(classes[c], 0.99):.0f}"
                              for c in ["short", "long", "urgent", "normal"]]
                    + [int(preemptions), f"{rep['output_throughput']:.0f}"])
    r.chart("policies", {"title": "Scheduling policies under load (20% long prompts, 25% urgent, 4 req/s)",
                         "x_label": "policy", "categories": [name for name, _ in per_run],
                         "panels": [
        {"y_label": f"TTFT {q} (ms)", "series": [
            {"name": c, "points": [[i, pct(cl[c], p)] for i, (_, cl) in enumerate(per_run) if cl[c]]}
            for c in ["short", "long", "urgent", "normal"]]}
        for q, p in [("p50", 0.5), ("p99", 0.99)]]}, out)
    return table(["policy", "short TTFT p50 / p99 ms", "long", "urgent (priority -1)", "normal",
                  "preemptions", "output tok/s"], rows)


def preemption(r, out):
    """Recompute against swap: the cost of resuming one sequence, and throughput under KV pressure."""
    text = r.run(["bench", "preemption", "--repeats", str(r.sized(5, 2)),
                  "--contexts", r.sized("16,64,256,1024,2048", "64,1024")])
    (out / "resume.md").write_text(text)
    resume = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            resume.append((int(cells[0]), float(cells[3]), float(cells[4])))
    rows, reps = [], []
    n = r.sized(64, 16)
    for mode in ["recompute", "swap"]:
        flags = ["--num-prompts", str(n), "--input-len", "128", "--output-len", "128",
                 "--kv-cache-mib", "24", "--preemption-mode", mode]
        if mode == "swap":
            flags += ["--swap-space-mib", "512"]
        rep = r.bench_throughput(flags)
        (out / f"pressure-{mode}.json").write_text(json.dumps(rep))
        reps.append((mode, rep))
        rows.append([mode, rep["num_preemptions"], f"{rep['output_tokens_per_s']:.0f}",
                     f"{rep['elapsed_s']:.1f}"])
    r.chart("preemption", {"title": "Resuming a preempted sequence: recompute vs swap (default model, CPU)",
                           "x_label": "context (tokens)", "x_log": True, "panels": [
        {"y_label": "ms to resume", "y_log": True, "series": [
            {"name": "recompute", "points": [[c, rc] for c, _, rc in resume]},
            {"name": "swap out + in", "points": [[c, sw] for c, sw, _ in resume]}]}]}, out)
    return text + "\n" + f"Under KV pressure ({n} requests of 128 + 128 at once, 24 MiB pool):\n\n" + table(
        ["preemption mode", "preemptions", "output tok/s", "elapsed s"], rows)


EXPERIMENTS = {
    "batching": batching,
    "chunk-budget": chunk_budget,
    "kv-pool": kv_pool,
    "block-size": block_size,
    "paging-waste": paging_waste,
    "policies": policies,
    "preemption": preemption,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")
    p.add_argument("--bin", default="target/release/minserve")
    p.add_argument("--out", default="target/experiments")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--port", type=int, default=18517)
    p.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    p.add_argument("--nice", type=int, default=0, help="run at this niceness (negative needs root)")
    args = p.parse_args()
    names = args.names or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        sys.exit(f"unknown experiment(s) {unknown}: {', '.join(EXPERIMENTS)}")
    r = Runner(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    info = dict(l.split(":", 1) for l in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines() if ":" in l)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
           f"{os.cpu_count()} cores)")
    for name in names:
        out = r.out / name
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            md = EXPERIMENTS[name](r, out)
        except subprocess.CalledProcessError as e:
            sys.exit(f"{name}: {' '.join(e.cmd)} failed:\n{e.stderr}")
        load = os.getloadavg()[0]
        md += (f"\n\n_{name}: commit {commit}, {cpu}, {time.time() - started:.0f} s, "
               f"load average {load:.1f} at the end{' (quick sizes)' if args.quick else ''}._\n")
        (out / "table.md").write_text(md)
        print(f"## {name}\n\n{md}", flush=True)


if __name__ == "__main__":
    main()
