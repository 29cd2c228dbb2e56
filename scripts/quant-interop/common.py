"""Shared pieces of the interoperability scripts: the reference token sequences, logits through
`transformers`, and an independent numpy reading of the compressed-tensors layouts that
docs/quantization.md and the loaders rely on (checked against the tool's own decompression)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

# Fixed texts whose token ids the fixtures' reference logits are taken on. Short enough that all
# positions fit in a small JSON file, long enough that attention over several positions matters.
REFERENCE_TEXTS = [
    "The cat sat on the mat.",
    "A river runs through the old town, under seven bridges.",
    "Quantized weights keep most of what a model knows.",
]


def logits_all_positions(model, ids):
    """Logits [len(ids), vocab] of one sequence, every position, in f32."""
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()


def max_abs_diff(a, b):
    """Largest |x - y| over lists of same-shaped arrays."""
    return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b)))


def sequence_entries(seqs, tool_logits, weight_only, with_weight_only):
    """reference.json's `sequences`: `logits` from the tool, `logits_weight_only` when asked."""
    return [
        {
            "token_ids": ids,
            "logits": round_list(t),
            **({"logits_weight_only": round_list(w)} if with_weight_only else {}),
        }
        for ids, t, w in zip(seqs, tool_logits, weight_only)
    ]


def plain_model_with(base_dir, raw, weights):
    """An f32 LlamaForCausalLM (the base model's architecture) holding the checkpoint's own float
    tensors (AWQ rescales the norms, so not the base model's) and `weights` (dense)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, value in raw.items():
            if name in state and name not in weights:
                state[name].copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))
        for name, w in weights.items():
            state[name].copy_(torch.as_tensor(w, dtype=torch.float32))
    return model


def round_list(a, digits=4):
    return [[round(float(x), digits) for x in row] for row in a]


def fp8_e4m3_to_f32(raw_u8):
    """E4M3 (finite-only 'fn' variant: no infinities, S.1111.111 is NaN) decoded by hand."""
    b = raw_u8.astype(np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    normal = sign * (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = sign * (man / 8.0) * np.exp2(-6.0)
    out = np.where(exp == 0, subnormal, normal)
    out = np.where((exp == 0xF) & ((b & 0x7) == 0x7), np.nan, out)
    return out


def unpack_int4_rows(packed_i32, cols):
    """int32 [rows, ceil(cols/8)] -> uint8 [rows, cols]: value c of a row is nibble c % 8 (bits
    4*(c%8)..) of word c // 8, the low nibble first."""
    words = packed_i32.astype(np.uint32)
    nibbles = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=-1)
    return nibbles.reshape(words.shape[0], -1)[:, :cols].astype(np.int64)


def dequantize_compressed_tensors(tensors, prefix, fmt, weights_args):
    """Our own reading of one quantized Linear, from the raw safetensors entries.

    Returns (weight [out, in] float64, description of the layout found). Raises on anything the
    layout contract does not describe, so that a surprise shows up here and not in a loader."""
    scale = tensors[prefix + "weight_scale"].astype(np.float64)
    if fmt == "pack-quantized":
        packed = tensors[prefix + "weight_packed"]
        shape = tensors[prefix + "weight_shape"]
        out_f, in_f = int(shape[0]), int(shape[1])
        assert packed.dtype == np.int32 and packed.shape == (out_f, (in_f + 7) // 8), packed.shape
        q = unpack_int4_rows(packed, in_f)  # unsigned 0..15, signed value + 8
        group = weights_args.get("group_size") or in_f
        groups = in_f // group
        assert scale.shape == (out_f, groups), (scale.shape, out_f, groups)
        if weights_args.get("symmetric", True):
            zero = np.full((out_f, groups), 8, dtype=np.int64)
            zdesc = "symmetric: zero 8 on the unsigned nibble"
        else:
            zp = tensors[prefix + "weight_zero_point"]
            # Zero points pack along the OUTPUT dimension: int32 [ceil(out/8), groups], word r
            # holds rows 8r..8r+7, low nibble first, each stored as signed zero + 8.
            assert zp.dtype == np.int32 and zp.shape == ((out_f + 7) // 8, groups), zp.shape
            zero = unpack_int4_rows(zp.T.copy(), out_f).T
            zdesc = f"asymmetric: weight_zero_point int32 {list(zp.shape)} packed along out"
        if prefix + "weight_g_idx" in tensors:
            # actorder "group": GPTQ visited the columns in a permuted order and grouped them in
            # that order, so each input column names its group.
            g_of_col = tensors[prefix + "weight_g_idx"].astype(np.int64)
            assert g_of_col.shape == (in_f,), g_of_col.shape
            zdesc += f", weight_g_idx {tensors[prefix + 'weight_g_idx'].dtype} [{in_f}]"
        else:
            g_of_col = np.arange(in_f) // group
        w = scale[:, g_of_col] * (q - zero[:, g_of_col])
        desc = (
            f"weight_packed int32 {list(packed.shape)}, weight_shape {shape.dtype} {shape.tolist()}, "
            f"weight_scale {tensors[prefix + 'weight_scale'].dtype} {list(scale.shape)}, {zdesc}"
        )
        return w, desc
    if fmt == "naive-quantized":
        # compressed-tensors >= 0.19 names weight-only 8-bit schemes so (int8 or FP8 weights,
        # activations unquantized); the tensors are those of int-/float-quantized.
        fmt = "float-quantized" if weights_args["type"] == "float" else "int-quantized"
    if fmt == "int-quantized":
        q = tensors[prefix + "weight"]
        assert q.dtype == np.int8, q.dtype
        w = q.astype(np.float64) * scale.reshape(scale.shape[0], -1)
        desc = f"weight int8 {list(q.shape)}, weight_scale {tensors[prefix + 'weight_scale'].dtype} {list(scale.shape)}"
        return w, desc
    if fmt == "float-quantized":
        raw = tensors[prefix + "weight"]
        w = fp8_e4m3_to_f32(raw) * scale.reshape(scale.shape[0], -1)
        desc = f"weight F8_E4M3 {list(raw.shape)}, weight_scale {tensors[prefix + 'weight_scale'].dtype} {list(scale.shape)}"
        return w, desc
    raise ValueError(f"format {fmt} not described by the layout contract")


def read_safetensors_raw(path):
    """All tensors of a safetensors file as numpy arrays; F8_E4M3 kept as raw uint8 bytes (numpy
    has no fp8). Read with our own header parser so that nothing is converted behind our back."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    dtypes = {
        "F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64, "I32": np.int32,
        "I8": np.int8, "U8": np.uint8, "F8_E4M3": np.uint8,
    }
    out, kinds = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = data[base + start : base + end]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
        kinds[name] = info["dtype"]
    return out, kinds


def versions():
    import compressed_tensors
    import transformers

    v = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed-tensors": compressed_tensors.__version__,
    }
    try:
        import llmcompressor

        v["llmcompressor"] = llmcompressor.__version__
    except ImportError:
        pass
    return v


def make_each(out_dir, jobs, only):
    """Runs `jobs` ((folder name, description, make(folder) -> reference dict)) into fresh
    folders under `out_dir`, writing each reference.json; returns every folder's checks."""
    checks = {}
    for name, description, make in jobs:
        if only and name not in only:
            continue
        fmt_dir = out_dir / name
        if fmt_dir.exists():
            shutil.rmtree(fmt_dir)
        print(f"== {name}: {description}", flush=True)
        ref = make(fmt_dir)
        # Key order as the first committed files have it (made_by, then versions), so that
        # a rerun is byte-identical to them.
        versions = ref.pop("versions", None)
        ref["made_by"] = description
        if versions is not None:
            ref["versions"] = versions
        write_json(fmt_dir / "reference.json", ref)
        checks[name] = ref["checks"]
        print(json.dumps(ref["checks"]), flush=True)
    return checks


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, separators=(",", ":"))
        f.write("\n")
