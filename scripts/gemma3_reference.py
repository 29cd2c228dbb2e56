#!/usr/bin/env python3
"""Reference continuations of gemma3-270m from llama.cpp, for crates/model/tests/gemma3.rs.

llama.cpp (through llama-cpp-python) greedily continues each prompt by STEPS tokens on the
real GGUF file; for every step it records its top candidates with their logits. minserve's
test then feeds the same tokens (teacher forcing) and checks that its own top-1 agrees.

Rerun (outside the repository; llama-cpp-python builds llama.cpp from its sdist, which needs a
C++ compiler; cmake comes from PyPI):

    python3 -m venv /tmp/llref/venv
    /tmp/llref/venv/bin/pip install cmake ninja scikit-build-core numpy
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" /tmp/llref/venv/bin/pip install \
        --no-build-isolation llama-cpp-python
    minserve fetch gemma3-270m
    /tmp/llref/venv/bin/python scripts/gemma3_reference.py \
        models/gemma3-270m/gemma-3-270m-q4_k_m.gguf > crates/model/tests/fixtures/gemma3_270m_llama_cpp.json
"""

import hashlib
import json
import sys

import llama_cpp
import numpy as np

STEPS = 128
TOP = 5

# The fourth prompt is longer than the 512-position sliding window, so that the local layers'
# window matters for every one of its continuation tokens.
LONG = " ".join(
    [
        "The river rises in a wet meadow high in the hills, where a dozen small springs seep out",
        "between the stones and gather into a stream no wider than a hand. For the first few miles it",
        "runs fast and cold over gravel, past sheep pastures and stone walls, and the farmers who live",
        "along it have always used its water for their animals and their gardens. Lower down the",
        "valley opens, the current slows, and the stream is joined by two larger brooks that drain the",
        "forest on the northern slope. Here the first mills were built, more than four hundred years",
        "ago, to grind grain and later to drive the looms of a small cloth industry. The mill ponds",
        "are still there, although the wheels are long gone, and in summer children swim in them",
        "while their parents fish for trout from the old dams. Below the last mill the river enters",
        "the town. It passes under seven bridges, the oldest of which is a narrow stone arch that only",
        "carts and walkers could ever cross. The town grew up around the crossing because it was the",
        "only place for many miles where the water was shallow enough to ford in every season. A",
        "market was held on the eastern bank every Thursday, and merchants came from the coast to",
        "buy wool, cheese and leather. In the nineteenth century a canal was dug beside the river so",
        "that barges could carry coal up from the port, and for fifty years the town was busy and",
        "loud. Then the railway arrived, the canal was abandoned, and most of the warehouses along",
        "the water were turned into houses, shops and, more recently, a small museum. Today the",
        "river is cleaner than it has been for two centuries. Otters have returned, herons stand in",
        "the shallows at dawn, and a volunteer group counts the salmon that climb the fish ladder",
        "every autumn. Each spring, when the snow melts in the hills, the water rises quickly, and",
        "the low meadows below the town flood for a few days, which is why nobody has ever built",
        "there. Older residents remember the great flood of the winter when the ice dam broke, when",
        "the water reached the steps of the church and boats were rowed down the main street. After",
        "that flood the town raised the embankments, planted willows along the banks and created",
        "wetlands upstream to hold the water back. Engineers still study the river every year,",
        "measuring its depth at the bridges and mapping how the channel moves from one bank to the",
        "other. Beyond the town the river widens into a slow, brown estuary, full of mud flats and",
        "birds, and finally meets the sea between two low headlands, where a lighthouse has stood",
        "for as long as anyone can remember. Sailors say that on a calm evening you can smell the",
        "hay meadows of the upper valley far out at sea, carried down on the current. In the end,",
        "the story of the river is the story of the people who have lived beside it, and",
    ]
)

PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(items):\n",
    "<start_of_turn>user\nExplain why the sky is blue.<end_of_turn>\n<start_of_turn>model\n",
    LONG,
]


def main(path):
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=2048, n_batch=1024, logits_all=True, n_threads=2, verbose=False
    )
    cases = []
    for text in PROMPTS:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(tokens)
        continuation, steps = [], []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top = np.argsort(-logits)[:TOP]
            steps.append({"ids": [int(i) for i in top], "logits": [float(logits[i]) for i in top]})
            continuation.append(int(top[0]))
            llm.eval([int(top[0])])
        cases.append(
            {
                "prompt": text,
                "prompt_tokens": [int(t) for t in tokens],
                "continuation": continuation,
                "top": steps,
            }
        )
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    json.dump(
        {
            "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, CPU, f32 logits",
            "model_sha256": digest,
            "steps": STEPS,
            "cases": cases,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
