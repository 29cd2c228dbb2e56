#!/usr/bin/env python3
"""GPTQ (v1, `checkpoint_format: gptq`) and AWQ (GEMM) checkpoints of the tiny Llama written by
GPTQModel, with that tool's own reference logits, for minserve's loader tests.

Runs in its own venv: GPTQModel 7.7 needs newer torch/transformers than llm-compressor 0.14 allows.
It reads the unquantized `base-f16` folder that make_fixtures.py wrote and adds, next to it:

- `gptq-g32`: 4-bit, group 32, symmetric, no act-order (scales F16, as GPTQ always stores them);
- `gptq-g32-asym-desc-act`: 4-bit, group 32, asymmetric, act-order (`g_idx` a permutation-derived
  map, zero points other than 8: the v1 "stored zero - 1" convention shows);
- `awq-gemm-g32`: AutoAWQ's GEMM packing (interleaved nibble order), zero points, the model in f16.

reference.json as in make_fixtures.py. GPTQModel's CPU kernels compute in f16 only, so `logits`
(the tool's forward) carry f16 rounding; `logits_weight_only` is an f32 forward with the weights
our numpy decoder of the layout reads (checked equal to the tool's own dequantization), and is what
a loader that dequantizes exactly must match tightly.

Rerun:

    python3 -m venv /work/interop-venv-gptq
    /work/interop-venv-gptq/bin/pip install gptqmodel
    GPTQMODEL_CPU_WORKERS=2 TORCH_COMPILE_DISABLE=1 /work/interop-venv-gptq/bin/python \
        scripts/quant-interop/make_gptq_fixtures.py --out crates/model/tests/data/interop
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# GPTQModel sizes a worker pool from the CPU count and refuses a 2-core machine's default.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Its torch kernel wraps dequantization in torch.compile, which needs a C compiler and minutes.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEED = 4321
FORMATS = [
    ("gptq-g32", dict(method="gptq", bits=4, group_size=32, desc_act=False, sym=True)),
    ("gptq-g32-asym-desc-act", dict(method="gptq", bits=4, group_size=32, desc_act=True, sym=False)),
    ("awq-gemm-g32", dict(method="awq", bits=4, group_size=32, sym=False)),
]


def calibration(n=32, length=64):
    g = torch.Generator().manual_seed(SEED)
    return [
        {"input_ids": torch.randint(0, 320, (length,), generator=g).tolist(), "attention_mask": [1] * length}
        for _ in range(n)
    ]


def quantize(base_dir, out_dir, spec):
    from gptqmodel import GPTQModel, QuantizeConfig

    if spec["method"] == "awq":
        qcfg = QuantizeConfig(
            bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"], quant_method="awq", format="gemm"
        )
        # GPTQModel's AWQ packer accepts only f16/bf16 models.
        dtype = torch.float16
    else:
        qcfg = QuantizeConfig(
            bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"], sym=spec["sym"]
        )
        dtype = torch.float32
    model = GPTQModel.load(str(base_dir), qcfg, device="cpu", dtype=dtype)
    model.quantize(calibration(), batch_size=1)
    model.save(str(out_dir))
    # GPTQModel records its temporary offload folder; a path from this machine means nothing.
    for name in ("config.json", "quantize_config.json"):
        path = out_dir / name
        text = json.loads(path.read_text())
        meta = text.get("quantization_config", text).get("meta", {})
        meta.pop("offload_to_disk_path", None)
        path.write_text(json.dumps(text, indent=2) + "\n")
    (out_dir / "quant_log.csv").unlink(missing_ok=True)


def unpack_rows(words, count):
    """int32 [r, c] -> [8r, c]: word row r holds rows 8r..8r+7, row 8r+j in bits 4j..4j+3."""
    w = words.astype(np.uint32)
    rows = np.stack([(w >> (4 * j)) & 0xF for j in range(8)], axis=1)  # [r, 8, c]
    return rows.reshape(-1, w.shape[1])[:count].astype(np.int64)


def unpack_cols(words, count, order=None):
    """int32 [r, c] -> [r, 8c]: word column c holds columns 8c..8c+7; nibble j (bits 4j..) holds
    column 8c + order[j] (GPTQ: order j; AWQ GEMM: [0, 2, 4, 6, 1, 3, 5, 7])."""
    w = words.astype(np.uint32)
    nib = np.stack([(w >> (4 * j)) & 0xF for j in range(8)], axis=-1)  # [r, c, 8]: nibble j
    out = np.empty_like(nib)
    order = order or list(range(8))
    for j in range(8):
        out[:, :, order[j]] = nib[:, :, j]
    return out.reshape(w.shape[0], -1)[:, :count].astype(np.int64)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def dequantize(raw, prefix, method, group_size):
    """Our reading of quant-layouts.md: returns W [out, in] float64."""
    qweight, qzeros = raw[prefix + "qweight"], raw[prefix + "qzeros"]
    scales = raw[prefix + "scales"].astype(np.float64)  # [groups, out]
    groups, out_f = scales.shape
    if method == "gptq":
        in_f = qweight.shape[0] * 8
        q = unpack_rows(qweight, in_f)  # [in, out]
        zeros = unpack_cols(qzeros, out_f) + 1  # v1 stores zero - 1
        g_idx = raw[prefix + "g_idx"].astype(np.int64)
    else:
        in_f = qweight.shape[0]
        q = unpack_cols(qweight, out_f, AWQ_ORDER)  # [in, out]
        zeros = unpack_cols(qzeros, out_f, AWQ_ORDER)
        g_idx = np.arange(in_f) // group_size
    w = scales[g_idx] * (q - zeros[g_idx])  # [in, out]
    return w.T


def tool_weight(module):
    """The tool's own dequantized weight of a quantized Linear, [out, in]."""
    if hasattr(module, "dequantize_weight"):
        w = module.dequantize_weight()
    else:
        w = module._dequantize_weight_for_inference(
            torch.zeros(1, module.in_features, dtype=torch.float16), dtype=torch.float16
        )
    w = w.detach().double().numpy()
    return w.T if w.shape == (module.in_features, module.out_features) else w


def check_and_reference(fmt_dir, base_dir, spec, seqs, base_logits):
    from gptqmodel import BACKEND, GPTQModel

    raw, kinds = common.read_safetensors_raw(fmt_dir / "model.safetensors")
    backend = BACKEND.AWQ_TORCH if spec["method"] == "awq" else BACKEND.GPTQ_TORCH
    # f16, not the CPU default bf16: in bf16 the tool's dequantized weights are off by up to
    # 2e-3 (scales rounded to 8 bits), in f16 they are ours rounded to f16, exactly.
    tool = GPTQModel.load(str(fmt_dir), device="cpu", backend=backend, dtype=torch.float16)
    tool_logits = [common.logits_all_positions(tool.model, ids) for ids in seqs]

    prefixes = sorted({n[: -len("qweight")] for n in raw if n.endswith("qweight")})
    modules = dict(tool.model.named_modules())
    ours, max_weight_diff = {}, 0.0
    for prefix in prefixes:
        w = dequantize(raw, prefix, spec["method"], spec["group_size"])
        ours[prefix + "weight"] = w
        theirs = tool_weight(modules[prefix[:-1]])
        # The tool's weight is f16: compare with ours rounded the same way (0 when they agree).
        ours_f16 = w.astype(np.float16).astype(np.float64)
        max_weight_diff = max(max_weight_diff, float(np.max(np.abs(ours_f16 - theirs))))

    plain = common.plain_model_with(str(base_dir), raw, ours)
    weight_only = [common.logits_all_positions(plain, ids) for ids in seqs]

    config = json.loads((fmt_dir / "config.json").read_text())
    q0 = "model.layers.0.self_attn.q_proj."
    return {
        "format": f"{spec['method']} ({config['quantization_config'].get('checkpoint_format')})",
        "quantization_config": config["quantization_config"],
        "tensor_dtypes": {n: kinds[n] for n in sorted(kinds) if n.startswith(q0)},
        "tensor_shapes": {n: list(raw[n].shape) for n in sorted(raw) if n.startswith(q0)},
        "tool_compute_dtype": "float16",
        "sequences": common.sequence_entries(seqs, tool_logits, weight_only, True),
        "checks": {
            "max_abs_weight_diff_our_decoder_f16_vs_tool": max_weight_diff,
            "max_abs_logit_diff_weight_only_f32_vs_tool_f16": common.max_abs_diff(weight_only, tool_logits),
            "max_abs_logit_diff_weight_only_vs_unquantized": common.max_abs_diff(weight_only, base_logits),
            "max_abs_logit": float(max(np.max(np.abs(t)) for t in tool_logits)),
        },
    }


def versions():
    import gptqmodel
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "gptqmodel": gptqmodel.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path, help="folder holding base-f16 (make_fixtures.py)")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    args.out = args.out.resolve()
    # GPTQModel writes per-run logs under ./logs: keep them out of the repository.
    os.chdir(tempfile.mkdtemp(prefix="gptqmodel-logs-"))
    torch.set_num_threads(1)
    base_dir = args.out / "base-f16"
    base_ref = json.loads((base_dir / "reference.json").read_text())
    seqs = [s["token_ids"] for s in base_ref["sequences"]]
    base_logits = [np.array(s["logits"]) for s in base_ref["sequences"]]
    def job(spec):
        def make(fmt_dir):
            quantize(base_dir, fmt_dir, spec)
            ref = check_and_reference(fmt_dir, base_dir, spec, seqs, base_logits)
            ref["versions"] = versions()
            return ref

        return make

    jobs = [(name, f"GPTQModel {spec}", job(spec)) for name, spec in FORMATS]
    common.make_each(args.out, jobs, args.only)


if __name__ == "__main__":
    main()
