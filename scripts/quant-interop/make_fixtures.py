#!/usr/bin/env python3
"""Tiny quantized checkpoints written by llm-compressor, with that tool's own reference logits,
for minserve's loader tests (crates/model/tests/data/interop/).

A seeded tiny Llama (hidden 128, 2 layers, 4 query / 2 KV heads, MLP 256, a 320-token byte-level
BPE trained here) is saved unquantized, then quantized by llm-compressor into each format below.
For every format, `reference.json` holds the logits at every position of a few fixed token
sequences, computed by `transformers` on the folder exactly as a user would load it (the
compressed-tensors integration decompresses the weights and, for W8A8 schemes, quantizes the
activations on the fly), plus the logits with the decompressed weights in a plain f32 model
(weight-only: what a loader that does not quantize activations must reproduce) and the
unquantized model's logits (so a test can check that its tolerance is far below what the
quantization itself changed).

It also reads every quantized tensor with our own numpy decoder of the layouts
(common.dequantize_compressed_tensors) and checks it against the tool's decompressed weight:
that is the check of docs/quantization.md's layout description.

Rerun (needs torch; not run in CI):

    python3 -m venv /work/interop-venv
    /work/interop-venv/bin/pip install llmcompressor compressed-tensors transformers torch
    /work/interop-venv/bin/python scripts/quant-interop/make_fixtures.py \
        --out crates/model/tests/data/interop
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEED = 1234
VOCAB = 320
# Non-default RoPE base (SmolLM2's), so that a loader ignoring how the config names it fails.
ROPE_THETA = 100000.0

# Text the tokenizer's merges are learned from; any English prose does.
TOKENIZER_TEXT = """
The cat sat on the mat and looked at the river. A river runs through the old town, under seven
bridges, past mills and markets. People who live along the water fish for trout in summer and
skate on the ponds in winter. Quantized weights keep most of what a model knows in a quarter of
the bytes. Each layer of the network multiplies its input by a matrix of weights, adds what it
had, and passes the result on. The model reads one token at a time and guesses the next one.
""" * 4

# (folder name, description, recipe builder). Group 32/64 are what the tiny shapes allow
# (in-features 128 and 256); the real model uses 128 (real_model.py).
FORMATS = [
    ("w4a16-gptq-g64", "GPTQModifier scheme W4A16 group 64 (pack-quantized, symmetric)", "gptq_w4a16"),
    ("w4a16-gptq-actorder-weight-g32-bf16", "GPTQModifier W4A16 group 32 with actorder 'weight' (llm-compressor 0.14 has no 'group' and so never writes weight_g_idx), on the model in bf16 (bf16 scales)", "gptq_w4a16_actorder_bf16"),
    ("w4a16-asym-g32", "QuantizationModifier scheme W4A16_ASYM group 32 (pack-quantized, zero points)", "rtn_w4a16_asym"),
    ("w4a16-awq-g32", "AWQModifier + QuantizationModifier W4A16_ASYM group 32 (pack-quantized)", "awq_w4a16_asym"),
    ("w8a8-int", "GPTQModifier scheme W8A8 (int-quantized: int8 per-channel weights, dynamic per-token int8 activations)", "gptq_w8a8"),
    ("fp8-w8a16-channel", "QuantizationModifier FP8 E4M3 weights per channel, activations unquantized (naive-quantized)", "fp8_w8a16"),
    ("fp8-dynamic", "QuantizationModifier scheme FP8_DYNAMIC (float-quantized: per-channel E4M3 weights, dynamic per-token FP8 activations)", "fp8_dynamic"),
    ("fp8-tensor-w8a16", "QuantizationModifier FP8 E4M3 weights, one scale per tensor, activations unquantized (naive-quantized)", "fp8_tensor"),
]


def build_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token=None,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_base(out_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        # Big enough that logits spread over a few units: a model whose logits are all near
        # zero would hide a wrong dequantization inside any tolerance.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm weights other than 1, so that a loader that skips them is seen.
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            # Values an f16 can hold exactly: the base folder is saved in f16 (< 1 MB) and the
            # quantizers see the same numbers as that file.
            p.copy_(p.half().float())
    # Saved in f16 (< 1 MB); every reader here loads it as f32, the same values.
    model.half().save_pretrained(out_dir)
    return tokenizer


def calibration_dataset(tokenizer, n=32, length=64):
    from datasets import Dataset

    g = torch.Generator().manual_seed(SEED + 1)
    # Half real text (the tokenizer's own), half random ids: every token sees activations.
    text_ids = tokenizer(TOKENIZER_TEXT)["input_ids"]
    rows = []
    for i in range(n):
        if i % 2 == 0:
            start = int(torch.randint(0, len(text_ids) - length, (1,), generator=g))
            rows.append(text_ids[start : start + length])
        else:
            rows.append(torch.randint(0, VOCAB, (length,), generator=g).tolist())
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length for _ in rows]})


def recipe(kind):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    def w4(symmetric, group):
        return {
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(
                    num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group
                ),
            )
        }

    def fp8_weights(strategy):
        return {
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy),
            )
        }

    ignore = ["lm_head"]
    if kind == "gptq_w4a16":
        return [GPTQModifier(config_groups=w4(True, 64), ignore=ignore, dampening_frac=0.01)]
    if kind == "gptq_w4a16_actorder_bf16":
        groups = w4(True, 32)
        groups["group_0"].weights.actorder = "weight"
        return [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=0.01)]
    if kind == "rtn_w4a16_asym":
        return [QuantizationModifier(config_groups=w4(False, 32), ignore=ignore)]
    if kind == "awq_w4a16_asym":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=w4(False, 32), ignore=ignore)]
    if kind == "gptq_w8a8":
        return [GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)]
    if kind == "fp8_w8a16":
        return [QuantizationModifier(config_groups=fp8_weights("channel"), ignore=ignore)]
    if kind == "fp8_dynamic":
        return [QuantizationModifier(scheme="FP8_DYNAMIC", targets=["Linear"], ignore=ignore)]
    if kind == "fp8_tensor":
        return [QuantizationModifier(config_groups=fp8_weights("tensor"), ignore=ignore)]
    raise ValueError(kind)


def allow_cpu_only():
    """llm-compressor 0.14's sequential pipeline pins cached activations for faster copies to a
    GPU (IntermediatesCache.pin_memory), which fails outright without a CUDA driver. Pinning only
    matters for speed, so on a machine without one it is skipped."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantize(base_dir, out_dir, kind, tokenizer):
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    allow_cpu_only()

    dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    oneshot(
        model=model,
        recipe=recipe(kind),
        dataset=calibration_dataset(tokenizer),
        num_calibration_samples=32,
        # In file order: a shuffled order sums the Hessians differently from run to run.
        shuffle_calibration_samples=False,
        max_seq_length=64,
    )
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)


def reference_sequences(tokenizer):
    # The plain encoding, no BOS: the test feeds exactly these ids, whatever a tokenizer adds.
    return [tokenizer(text)["input_ids"] for text in common.REFERENCE_TEXTS]


def check_and_reference(fmt_dir, base_dir, seqs, base_logits):
    """Tool logits, our-decoder weight-only logits, and the layout check. Returns the reference
    dict written to reference.json."""
    from transformers import AutoModelForCausalLM

    config = json.loads((fmt_dir / "config.json").read_text())
    qc = config["quantization_config"]
    fmt = qc["format"]
    weights_args = qc["config_groups"]["group_0"]["weights"]
    raw, kinds = common.read_safetensors_raw(fmt_dir / "model.safetensors")

    # 1. The tool, as a user runs it.
    tool = AutoModelForCausalLM.from_pretrained(fmt_dir, dtype=torch.float32).eval()
    tool_logits = [common.logits_all_positions(tool, ids) for ids in seqs]

    # 2. Our own reading of every quantized tensor.
    prefixes = sorted({n[: -len("weight_scale")] for n in raw if n.endswith("weight_scale")})
    ours, layouts = {}, {}
    for prefix in prefixes:
        w, layouts[prefix] = common.dequantize_compressed_tensors(raw, prefix, fmt, weights_args)
        ours[prefix + "weight"] = w
    tool_weights = tool_dense_weights(tool, list(ours))
    max_weight_diff = max(
        float(np.max(np.abs(ours[n] - tool_weights[n]))) for n in ours
    )
    ours_model = common.plain_model_with(base_dir, raw, ours)
    weight_only = [common.logits_all_positions(ours_model, ids) for ids in seqs]

    weight_only_differs = common.max_abs_diff(weight_only, tool_logits) > 1e-4

    return {
        "format": fmt,
        "quantization_config": qc,
        "layout_of_layer0_q_proj": layouts["model.layers.0.self_attn.q_proj."],
        "tensor_dtypes": {n: kinds[n] for n in sorted(kinds) if n.startswith("model.layers.0.self_attn.q_proj")},
        "activations_quantized": weight_only_differs,
        # `logits_weight_only` only where the tool quantizes activations; else it equals `logits`.
        "sequences": common.sequence_entries(seqs, tool_logits, weight_only, weight_only_differs),
        "checks": {
            "max_abs_weight_diff_our_decoder_vs_tool": max_weight_diff,
            "max_abs_logit_diff_weight_only_vs_tool": common.max_abs_diff(weight_only, tool_logits),
            "max_abs_logit_diff_tool_vs_unquantized": common.max_abs_diff(tool_logits, base_logits),
            "max_abs_logit": float(max(np.max(np.abs(t)) for t in tool_logits)),
        },
    }


def tool_dense_weights(tool, names):
    """The dense weight the tool's model multiplies by, per Linear (after its own decompression,
    which runs on the first forward at the latest; the forward above has run)."""
    modules = dict(tool.named_modules())
    out = {}
    for name in names:
        module = modules[name[: -len(".weight")]]
        w = getattr(module, "weight", None)
        if w is None or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"{name}: the tool kept it compressed ({None if w is None else w.dtype})")
        out[name] = w.detach().double().numpy()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", nargs="*", help="format folder names to (re)make")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # One thread: multi-threaded float reductions in the calibration statistics round differently
    # from run to run, and AWQ/GPTQ W8A8 then differ in a few last bits.
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM

    base_dir = args.out / "base-f16"
    if base_dir.exists():
        shutil.rmtree(base_dir)
    tokenizer = build_base(base_dir)
    seqs = reference_sequences(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = [common.logits_all_positions(base, ids) for ids in seqs]
    common.write_json(
        base_dir / "reference.json",
        {
            "format": "unquantized (f16 file, run in f32)",
            "sequences": [
                {"token_ids": ids, "logits": common.round_list(l)} for ids, l in zip(seqs, base_logits)
            ],
        },
    )
    def job(kind):
        def make(fmt_dir):
            quantize(base_dir, fmt_dir, kind, tokenizer)
            ref = check_and_reference(fmt_dir, base_dir, seqs, base_logits)
            ref["versions"] = common.versions()
            return ref

        return make

    jobs = [(name, description, job(kind)) for name, description, kind in FORMATS]
    checks = common.make_each(args.out, jobs, args.only)
    print(json.dumps({"versions": common.versions(), "formats": checks}, indent=1))


if __name__ == "__main__":
    main()
