#!/usr/bin/env python3
"""The reverse direction: a folder written by `minserve quantize`, loaded by the reference tool.

1. Layout: every quantized tensor is decoded by our numpy reader of the layout (the one checked
   against the tools' own files by make_fixtures.py / make_gptq_fixtures.py) and compared with the
   weight the TOOL dequantizes from the same file. Equal (to the tool's compute precision) means
   the tool reads our file as we meant it.
2. Perplexity: the tool's forward over the same windows minserve's `eval perplexity` reads
   (same tokenizer.json, same BOS rule, same window plan), against `minserve eval perplexity
   --json` on the folder. Relative difference reported; the tolerance is an argument.
3. Greedy continuation of a few prompts, tool vs `minserve generate` (informative: where the two
   first pick different tokens).

Which tool: compressed-tensors folders (`quant_method: compressed-tensors`: int-quantized,
float-quantized, naive-quantized, pack-quantized) load through transformers + compressed-tensors
(run with /work/interop-venv); GPTQ and AWQ folders through GPTQModel (run with
/work/interop-venv-gptq, CPU kernels in f16).

    /work/interop-venv/bin/python scripts/quant-interop/check_ours.py \
        --folder /work/interop/ours/smol-int8 --minserve target/release/minserve \
        --text "$(scripts/eval-text)" --max-tokens 4096

Exit status 1 if a check fails, with the figures printed as one JSON object either way.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS = ["The history of the printing press begins", "def fibonacci(n):"]


def load_tool(folder, qc):
    method = qc.get("quant_method")
    if method in ("compressed-tensors", None):
        from transformers import AutoModelForCausalLM

        return "transformers+compressed-tensors", AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32
        ).eval()
    if method in ("gptq", "awq"):
        from gptqmodel import BACKEND, GPTQModel

        backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.GPTQ_TORCH
        tool = GPTQModel.load(str(folder), device="cpu", backend=backend, dtype=torch.float16)
        return "gptqmodel", tool.model.eval()
    raise SystemExit(f"quantization_config.quant_method {method!r}: no reference tool wired for it")


def layout_check(folder, qc, model):
    raw, _ = common.read_safetensors_raw(folder / "model.safetensors")
    modules = dict(model.named_modules())
    method = qc.get("quant_method")
    worst, count = 0.0, 0
    if method == "compressed-tensors":
        from make_fixtures import tool_dense_weights

        groups = qc["config_groups"]
        weights_args = next(iter(groups.values()))["weights"]
        fmt = next(iter(groups.values())).get("format") or qc["format"]
        # compressed-tensors decompresses on the first forward pass at the latest.
        with torch.no_grad():
            model(torch.tensor([[0]]))
        prefixes = sorted({n[: -len("weight_scale")] for n in raw if n.endswith("weight_scale")})
        theirs = tool_dense_weights(model, [p + "weight" for p in prefixes])
        for prefix in prefixes:
            ours, _ = common.dequantize_compressed_tensors(raw, prefix, fmt, weights_args)
            worst = max(worst, float(np.max(np.abs(ours - theirs[prefix + "weight"]))))
            count += 1
        tolerance = 1e-6
    else:
        from make_gptq_fixtures import dequantize, tool_weight

        prefixes = sorted({n[: -len("qweight")] for n in raw if n.endswith("qweight")})
        for prefix in prefixes:
            ours = dequantize(raw, prefix, method, qc["group_size"]).astype(np.float16)
            theirs = tool_weight(modules[prefix[:-1]])
            worst = max(worst, float(np.max(np.abs(ours.astype(np.float64) - theirs))))
            count += 1
        tolerance = 0.0
    return {"tensors": count, "max_abs_weight_diff_ours_vs_tool": worst, "ok": count > 0 and worst <= tolerance}


def encode(folder, text):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    bos_token = config.get("bos_token")
    if isinstance(bos_token, dict):
        bos_token = bos_token.get("content")
    bos = tok.token_to_id(bos_token) if bos_token else None
    with_specials = tok.encode("a", add_special_tokens=True).ids
    adds_bos = config.get("add_bos_token") is True or (bos is not None and with_specials[:1] == [bos])
    return ids, (bos if adds_bos and bos is not None else None)


def window_plan(tokens, bos, context, stride):
    """The same windows as crates/cli/src/eval/windows.rs plans."""
    prefix = [bos] if bos is not None else []
    span = context - len(prefix)
    windows, scored_until, begin = [], (0 if prefix else 1), 0
    while scored_until < len(tokens):
        end = min(begin + span, len(tokens))
        windows.append((prefix + tokens[begin:end], max(scored_until - begin + len(prefix), 1)))
        scored_until = end
        begin += stride
    return windows


def tool_perplexity(model, windows):
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids, first in windows:
            logits = model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(ids[first:])
            nll -= float(logp[first - 1 : len(ids) - 1].gather(1, targets[:, None]).sum())
            n += len(targets)
    return float(np.exp(nll / n)), n


def greedy(model, ids, steps):
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True, type=Path)
    ap.add_argument("--minserve", required=True, help="path of the minserve binary")
    ap.add_argument(
        "--minserve-folder", type=Path,
        help="the folder minserve reads (default --folder): e.g. `minserve quantize`'s dense f32 twin of "
        "the same weights, for a minserve that cannot load the quantized folder itself",
    )
    ap.add_argument("--text", required=True, type=Path)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=512)
    # Exact paths agree to ~1e-7 (measured on the unquantized fixture); a wrong RoPE base moved the
    # tiny model's perplexity by 5e-3. A kernel that quantizes activations needs its own figure.
    ap.add_argument("--ppl-rel-tolerance", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    args.minserve_folder = args.minserve_folder or args.folder
    if (json.loads((args.folder / "config.json").read_text()).get("quantization_config") or {}).get("quant_method") in ("gptq", "awq"):
        # GPTQModel writes per-run logs under ./logs: keep them out of the repository.
        args.folder, args.text = args.folder.resolve(), args.text.resolve()
        args.minserve_folder = args.minserve_folder.resolve()
        args.minserve = str(Path(args.minserve).resolve())
        os.chdir(tempfile.mkdtemp(prefix="gptqmodel-logs-"))

    # An unquantized folder is checked too (perplexity and greedy only): it tells the harness and
    # the tolerance apart from the quantized formats.
    qc = json.loads((args.folder / "config.json").read_text()).get("quantization_config") or {}
    # The tools log to stdout (GPTQModel's banner and loader lines); stdout is for the report.
    with contextlib.redirect_stdout(sys.stderr):
        tool_name, model = load_tool(args.folder, qc)
    report = {"folder": str(args.folder), "minserve_folder": str(args.minserve_folder), "tool": tool_name,
              "quant_method": qc.get("quant_method")}
    report["layout"] = layout_check(args.folder, qc, model) if qc else {"ok": True, "tensors": 0}

    text = args.text.read_text()
    tokens, bos = encode(args.folder, text)
    tokens = tokens[: args.max_tokens]
    stride = min(args.stride, args.context - (1 if bos is not None else 0))
    windows = window_plan(tokens, bos, args.context, stride)
    ppl_tool, scored = tool_perplexity(model, windows)
    ours = subprocess.run(
        [args.minserve, "eval", "perplexity", "--model", str(args.minserve_folder), "--text", str(args.text),
         "--max-tokens", str(args.max_tokens), "--context", str(args.context), "--stride", str(stride),
         "--kv-cache-dtype", "f32", "--json"],
        check=True, capture_output=True, text=True,
    )
    ours = json.loads(ours.stdout.strip().splitlines()[-1])
    if ours["scored_tokens"] != scored:
        raise SystemExit(f"window plans differ: minserve scored {ours['scored_tokens']}, we {scored}")
    ppl_ours = ours["result"]["perplexity"]
    rel = abs(ppl_ours - ppl_tool) / ppl_tool
    report["perplexity"] = {
        "scored_tokens": scored, "context": args.context, "stride": stride,
        "tool": ppl_tool, "minserve": ppl_ours, "relative_difference": rel,
        "ok": rel <= args.ppl_rel_tolerance,
    }

    report["greedy"] = []
    for prompt in PROMPTS:
        ids, _ = encode(args.folder, prompt)
        ids = ([bos] if bos is not None else []) + ids
        theirs = greedy(model, ids, args.steps)
        gen = subprocess.run(
            [args.minserve, "generate", "--model", str(args.minserve_folder), "--prompt", prompt,
             "--max-tokens", str(args.steps), "--temperature", "0"],
            capture_output=True, text=True,
        )
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.folder / "tokenizer.json"))
        tool_text = tok.decode(theirs)
        ours_text = gen.stdout.rstrip("\n") if gen.returncode == 0 else f"error: {gen.stderr.strip()[-300:]}"
        # minserve stops at EOS, the tool's loop does not: compare up to minserve's end.
        report["greedy"].append({
            "prompt": prompt, "tool": tool_text, "minserve": ours_text,
            "same": bool(ours_text) and tool_text.startswith(ours_text),
        })
    report["ok"] = report["layout"]["ok"] and report["perplexity"]["ok"]
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
