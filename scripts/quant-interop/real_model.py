#!/usr/bin/env python3
"""llm-compressor GPTQ W4A16 on the default model (SmolLM2-135M-Instruct), as a folder minserve
should load, and the tool's own perplexity on the eval text for the comparison.

Manual (minutes of CPU, not CI). Steps, from the repository root:

    # 1. The default model as an ordinary Hugging Face folder (f32, exactly the GGUF's values):
    minserve export --model models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out /work/interop/smol-f32
    # 2. Quantize it with llm-compressor. SmolLM2's hidden size 576 is not a multiple of 128, and
    #    llm-compressor refuses a group that does not divide the columns, so group 64 (576 = 9 x 64,
    #    1536 = 24 x 64). The calibration text must not be the eval text: scripts/calib-text.
    /work/interop-venv/bin/python scripts/quant-interop/real_model.py \
        --folder /work/interop/smol-f32 --calib "$(scripts/calib-text)" \
        --eval-text "$(scripts/eval-text)" --out /work/interop/smol-gptq-w4a16-g64
    # 3. minserve on the same folder, same windows (check_ours.py runs both and compares; it also
    #    re-checks every tensor against the tool's own decompression):
    /work/interop-venv/bin/python scripts/quant-interop/check_ours.py \
        --folder /work/interop/smol-gptq-w4a16-g64 --minserve target/release/minserve \
        --text "$(scripts/eval-text)" --max-tokens 8192
    # and the unquantized folder for scale:
    minserve eval perplexity --model /work/interop/smol-f32 --text "$(scripts/eval-text)" \
        --max-tokens 8192 --context 512 --stride 512 --kv-cache-dtype f32 --json  # 511 if BOS

Writes OUT (the compressed-tensors folder) and OUT/interop-eval.json (the tool's perplexity of the
f32 and quantized models over the same windows as `minserve eval perplexity --context 512
--stride 512`, BOS per the tokenizer).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_ours  # noqa: E402
import common  # noqa: E402


def calibration(tokenizer, text, samples, length):
    from datasets import Dataset

    ids = tokenizer(text)["input_ids"]
    step = max(1, (len(ids) - length) // samples)
    rows = [ids[i * step : i * step + length] for i in range(samples)]
    rows = [r for r in rows if len(r) == length]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length for _ in rows]})


def write_dense_twin(quant_folder, f32_folder, out):
    """The quantized folder's weights as the TOOL decompresses them, in a plain f32 folder with
    the f32 folder's own config.json and tokenizer (not re-saved by transformers 5, whose
    config spelling an older minserve misreads): what any minserve can load, for the perplexity
    comparison before its quantized loaders exist."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from make_fixtures import tool_dense_weights

    raw, _ = common.read_safetensors_raw(quant_folder / "model.safetensors")
    tool = AutoModelForCausalLM.from_pretrained(quant_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        tool(torch.tensor([[0]]))  # compressed-tensors decompresses on the first forward
    prefixes = sorted({n[: -len("weight_scale")] for n in raw if n.endswith("weight_scale")})
    weights = tool_dense_weights(tool, [p + "weight" for p in prefixes])
    plain = common.plain_model_with(f32_folder, raw, weights)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    if plain.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors")
    for f in f32_folder.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, out / f.name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True, type=Path, help="f32 Hugging Face folder (minserve export)")
    ap.add_argument("--calib", required=True, type=Path)
    ap.add_argument("--eval-text", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asymmetric", action="store_true", help="zero points (W4A16_ASYM) instead of symmetric")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-eval-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--dense-twin-only", action="store_true", help="only write OUT-dense from an existing OUT")
    args = ap.parse_args()
    twin = args.out.with_name(args.out.name + "-dense")
    if args.dense_twin_only:
        write_dense_twin(args.out, args.folder, twin)
        return

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from make_fixtures import allow_cpu_only

    allow_cpu_only()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=not args.asymmetric, strategy="group", group_size=args.group_size
        ),
    )
    started = time.time()
    oneshot(
        model=model,
        recipe=[GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)],
        dataset=calibration(tokenizer, args.calib.read_text(), args.samples, args.seq_len),
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
    )
    quantize_seconds = time.time() - started
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)

    text = args.eval_text.read_text()
    result = {"versions": common.versions(), "quantize_seconds": quantize_seconds,
              "calibration": {"file": str(args.calib), "samples": args.samples, "seq_len": args.seq_len},
              "group_size": args.group_size, "symmetric": not args.asymmetric}
    for name, folder in (("f32", args.folder), ("gptq_w4a16", args.out)):
        tokens, bos = check_ours.encode(folder, text)
        tokens = tokens[: args.max_eval_tokens]
        stride = args.context - (1 if bos is not None else 0)
        windows = check_ours.window_plan(tokens, bos, args.context, stride)
        tool = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ppl, scored = check_ours.tool_perplexity(tool, windows)
        result[name] = {"perplexity": ppl, "scored_tokens": scored, "context": args.context, "stride": stride}
        print(name, result[name], flush=True)
    (args.out / "interop-eval.json").write_text(json.dumps(result, indent=1) + "\n")
    write_dense_twin(args.out, args.folder, twin)
    print(f"dense twin for minserve: {twin}")


if __name__ == "__main__":
    main()
