#!/usr/bin/env python3
"""Measures the rows of docs/quantization.md's per-model tables: one row per way of storing the
model (a file, a folder written by `minserve quantize`, or a load-time flag), each with its file
size, peak RSS, perplexity and teacher-forced top-1 agreement with the unquantized model on the
eval text, and single-stream and batch-64 output tokens/s.

    scripts/quant_table.py ROWS.json [--minserve target/release/minserve] [--max-tokens 50000]
                           [--work-dir target/quant-table] [--parts quality,speed] [--quick]
                           [--markdown]

ROWS.json: {"reference": MODEL, "make": {FOLDER: [ARGS...]}, "rows": [{"label": "...",
"model": MODEL, "flags": ["..."], "file": false}]} (`file: false` for a load-time
re-quantization, which has no file of its own) where MODEL is anything `--model` takes (a GGUF
file, a Hugging Face folder, a catalog alias) and `flags` are extra engine flags
(`--weights-format q8_0`, `--kv-cache-dtype q8`). The reference is the unquantized model (for
the default model: `minserve export --dtype f32` of its GGUF, the dequantized values in f32 run
as dense matmuls with f32 activations). `make` says how each folder the rows name is made (a
`minserve` command line: `export ...`, `quantize ...`); a folder that does not exist yet is made
first, and the time its command took is printed (`"made": FOLDER, "seconds": ...`). In every
string `{work}` stands for --work-dir and `{calib}` for the calibration text that
`scripts/calib-text` fetches. A row with `"if_present": true` (a folder made by another tool,
such as `scripts/quant-interop/real_model.py`) is skipped when its folder is missing. Run it from
the repository root.

Each figure comes from the project's own commands, run one after another (so run it on a quiet
machine): `minserve eval perplexity --json --reference`, and `minserve bench throughput --json`
at `--max-num-seqs 1` (single stream; its peak RSS, from /usr/bin/time, is the row's memory
figure: weights plus one sequence's working set plus the default 1 GiB KV pool) and at 64.
`--parts quality` measures only the perplexity and agreement (deterministic: they do not depend
on the machine's load), `--parts speed` only the size, memory and speed columns.
`--quick` shrinks everything for a smoke run (figures meaningless).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def model_bytes(model):
    """Bytes of the weight files of a GGUF file or Hugging Face folder (0 for an alias)."""
    if os.path.isfile(model):
        return os.path.getsize(model)
    if os.path.isdir(model):
        return sum(
            os.path.getsize(os.path.join(model, f))
            for f in os.listdir(model)
            if f.endswith((".safetensors", ".gguf"))
        )
    return 0


def run_json(cmd):
    """Runs a minserve command with --json; returns (its JSON object, peak RSS in bytes)."""
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        full = ["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd + ["--json"]
        out = subprocess.run(full, check=True, capture_output=True, text=True)
        peak_kib = int(rss.read().strip().splitlines()[-1])
    last = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last), peak_kib * 1024


def expand(value, args):
    """`value` (a string or a list of them) with the placeholders filled in."""
    if isinstance(value, list):
        return [expand(v, args) for v in value]
    return value.replace("{work}", args.work_dir).replace("{calib}", args.calib)


def make_missing(spec, args, needed):
    """Runs the `make` command of every folder in `needed` that is not there yet, timing each
    (so that `--only` makes no folder its rows do not read)."""
    for folder, command in spec.get("make", {}).items():
        folder = expand(folder, args)
        if folder not in needed or os.path.exists(folder):
            continue
        print(f"making {folder} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        subprocess.run([args.minserve] + expand(command, args), check=True)
        print(json.dumps({"made": folder, "seconds": round(time.monotonic() - started, 1)}),
              flush=True)


def reference_top1(reference, args, cache={}, need_result=False):
    """The reference's reading of the text, run once: its result, its top-1 tokens in a file
    (`--write-top1`) that every other row is compared with, and agreement 1 with itself. A file
    an earlier run left is reused unless the reference's own figures are asked for (the file
    says which text, context, stride and token count it is for, and eval refuses a mismatch)."""
    path = os.path.join(args.work_dir, f"top1-{os.path.basename(reference)}-"
                                       f"{args.max_tokens}.json")
    if reference not in cache and not need_result and os.path.exists(path):
        return {"file": path}
    if reference not in cache or "result" not in cache[reference]:
        ppl, _ = run_json(
            [args.minserve, "eval", "perplexity", "--model", reference, "--text", args.text,
             "--max-tokens", str(args.max_tokens), "--write-top1", path])
        ppl["top1_agreement"] = 1.0
        ppl["file"] = path
        cache[reference] = ppl
    return cache[reference]


def measure(row, reference, args):
    model, flags = expand(row["model"], args), expand(row.get("flags", []), args)
    prompts, out_len = (8, 16) if args.quick else (64, 128)
    result = {"label": row["label"]}
    if "quality" in args.parts:
        if model == reference and not flags:
            ppl = reference_top1(reference, args, need_result=True)
        else:
            ppl, _ = run_json(
                [args.minserve, "eval", "perplexity", "--model", model, "--text", args.text,
                 "--max-tokens", str(args.max_tokens),
                 "--reference-top1", reference_top1(reference, args)["file"]] + flags)
        result["perplexity"] = ppl["result"]["perplexity"]
        result["top1_agreement"] = ppl.get("top1_agreement")
    if "speed" in args.parts:
        single, peak = run_json(
            [args.minserve, "bench", "throughput", "--model", model, "--max-num-seqs", "1",
             "--num-prompts", str(max(2, prompts // 16)), "--input-len", "128",
             "--output-len", str(out_len)] + flags)
        batched, _ = run_json(
            [args.minserve, "bench", "throughput", "--model", model, "--max-num-seqs", "64",
             "--num-prompts", str(prompts), "--input-len", "128", "--output-len", str(out_len)]
            + flags)
        # A load-time re-quantization has no file of its own: its row leaves the size blank.
        result["file_mib"] = model_bytes(model) / 2**20 if row.get("file", True) else None
        result["peak_rss_mib"] = peak / 2**20
        result["single_tok_s"] = single["output_tokens_per_s"]
        result["batch64_tok_s"] = batched["output_tokens_per_s"]
    return result


def markdown(results):
    """The table; a column no result measured is left blank."""
    def cell(r, key, fmt):
        return "" if r.get(key) is None else fmt.format(r[key])
    lines = ["| format | file MiB | peak RSS MiB | perplexity | top-1 vs unquantized "
             "| 1-stream tok/s | batch-64 tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        agree = "" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f}%"
        lines.append(
            f"| {r['label']} | {cell(r, 'file_mib', '{:.1f}')} | "
            f"{cell(r, 'peak_rss_mib', '{:.0f}')} | {cell(r, 'perplexity', '{:.3f}')} | "
            f"{agree} | {cell(r, 'single_tok_s', '{:.1f}')} | "
            f"{cell(r, 'batch64_tok_s', '{:.1f}')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows")
    p.add_argument("--minserve", default="target/release/minserve")
    p.add_argument("--text", default=None, help="default: what scripts/eval-text prints")
    p.add_argument("--max-tokens", type=int, default=50000)
    p.add_argument("--parts", default="quality,speed",
                   help="comma-separated: quality (perplexity, agreement), speed (size, RSS, tok/s)")
    p.add_argument("--work-dir", default="target/quant-table",
                   help="where the folders of `make` go ({work} in ROWS.json)")
    p.add_argument("--only", action="append", default=[],
                   help="measure only the rows whose label contains this (repeatable)")
    p.add_argument("--results", default=None,
                   help="a JSON file of results by label: this run's figures are merged into it "
                        "(so quality and speed may come from different runs), and --markdown "
                        "prints every row of ROWS.json from it")
    p.add_argument("--skip-done", action="store_true",
                   help="with --results: skip the rows whose figures of --parts it already has "
                        "(to resume an interrupted run)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    args.parts = set(args.parts.split(","))
    if args.quick:
        args.max_tokens = min(args.max_tokens, 2000)
    if args.text is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.text = subprocess.run([os.path.join(here, "eval-text")], check=True,
                                   capture_output=True, text=True).stdout.strip()
    spec = json.load(open(args.rows))
    args.calib = ""  # fetched below only when a folder to make calibrates on it
    reference = expand(spec["reference"], args)
    merged = {}
    if args.results and os.path.exists(args.results):
        merged = json.load(open(args.results))
    selected = []
    for row in spec["rows"]:
        if args.only and not any(text in row["label"] for text in args.only):
            continue
        done = merged.get(row["label"], {})
        figures = {"quality": "perplexity", "speed": "single_tok_s"}
        if args.skip_done and all(figures[part] in done for part in args.parts):
            continue
        if row.get("if_present") and not os.path.exists(expand(row["model"], args)):
            print(f"skipping {row['label']}: no {expand(row['model'], args)}", file=sys.stderr)
            continue
        selected.append(row)
    needed = {expand(row["model"], args) for row in selected}
    if selected and "quality" in args.parts:
        needed.add(reference)
    if any("{calib}" in json.dumps(c) for f, c in spec.get("make", {}).items()
           if expand(f, args) in needed):
        here = os.path.dirname(os.path.abspath(__file__))
        args.calib = subprocess.run([os.path.join(here, "calib-text")], check=True,
                                    capture_output=True, text=True).stdout.strip()
    make_missing(spec, args, needed)
    results = []
    for row in selected:
        print(f"measuring {row['label']} ...", file=sys.stderr, flush=True)
        r = measure(row, reference, args)
        print(json.dumps(r), flush=True)
        results.append(r)
        if args.results:
            merged.setdefault(r["label"], {}).update(r)
            with open(args.results, "w") as f:
                json.dump(merged, f, indent=1)
    if args.markdown:
        if args.results:
            results = [merged[row["label"]] for row in spec["rows"] if row["label"] in merged]
        print(markdown(results))


if __name__ == "__main__":
    main()
