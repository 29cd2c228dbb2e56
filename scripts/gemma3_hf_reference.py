#!/usr/bin/env python3
"""Reference logits of gemma3-270m from Hugging Face transformers, for crates/model/tests/gemma3_export.rs.

transformers' own Gemma3ForCausalLM (an independent implementation: its RMSNorm's (1 + w), its
GELU, its sliding-window mask, its per-layer-type RoPE) loads the folder `minserve export` writes
from the GGUF and scores fixed token sequences; the test exports the same GGUF, loads the folder
in minserve and compares. A wrong norm convention, layer pattern, RoPE base or embedding scale in
the exported config.json shows up as a large difference.

Stored per sequence: the token ids, and at the checked positions the logits of transformers' ten
best tokens plus a fixed spread of 64 ids (the full 262,144-entry rows would be megabytes), and the
max |logit| of the full row, to put differences in scale.

Rerun (torch and transformers in a venv; transformers 5.x was used):

    target/release/minserve export --model models/gemma3-270m --dtype f32 --out /tmp/gemma3-f32
    /work/interop-venv/bin/python scripts/gemma3_hf_reference.py /tmp/gemma3-f32 \
        models/gemma3-270m/gemma-3-270m-q4_k_m.gguf > crates/model/tests/fixtures/gemma3_270m_transformers.json
"""

import hashlib
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TOP = 10
SPREAD = 64
TEXTS = [
    "The cat sat on the mat.",
    "A river runs through the old town, under seven bridges.",
    "def add(a, b):\n    return a + b\n",
]
# Past the 512-position sliding window, so that the local layers' window decides the last
# positions' logits.
LONG_WORDS = 700
LAST_POSITIONS = 6


def long_text():
    words = "the mill pond keeps the water still while the river runs on past seven stone bridges".split()
    return " ".join(words[i % len(words)] for i in range(LONG_WORDS))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    folder, gguf = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    vocab = model.config.vocab_size
    spread_ids = [(i * vocab) // SPREAD + 7 for i in range(SPREAD)]
    cases = []
    for text, positions in [(t, None) for t in TEXTS] + [(long_text(), LAST_POSITIONS)]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        checked = range(len(ids)) if positions is None else range(len(ids) - positions, len(ids))
        rows = []
        for p in checked:
            row = logits[p]
            top = torch.topk(row, TOP).indices.tolist()
            chosen = top + [i for i in spread_ids if i not in top]
            rows.append(
                {
                    "position": p,
                    "ids": chosen,
                    "logits": [round(float(row[i]), 5) for i in chosen],
                    "max_abs": round(float(row.abs().max()), 3),
                }
            )
        cases.append({"token_ids": ids, "rows": rows})
    json.dump(
        {
            "model_sha256": sha256(gguf),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "cases": cases,
        },
        sys.stdout,
        separators=(",", ":"),
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
