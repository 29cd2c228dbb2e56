#!/usr/bin/env python3
"""Single-stream speed of llama.cpp on a GGUF file, beside `minserve bench throughput
--max-num-seqs 1` on the same file: prompt processing and decode tokens/s, medians of REPEATS.

llama.cpp comes from llama-cpp-python built outside the repository (see
scripts/gemma3_reference.py for the build). The prompt is INPUT_LEN random token ids (as
`bench throughput` draws them), the output OUTPUT_LEN greedy tokens with end-of-sequence
ignored, on THREADS threads.

    /tmp/llref/venv/bin/python scripts/llama_cpp_decode_speed.py models/gemma3-270m/gemma-3-270m-q4_k_m.gguf
"""

import argparse
import random
import statistics
import time

import llama_cpp
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.input_len + args.output_len + 8,
                          n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                          verbose=False, logits_all=False)
    vocab = llm.n_vocab()
    prefill, decode = [], []
    for r in range(args.repeats + 1):  # the first round warms caches and is not kept
        rng = random.Random(r)
        prompt = [rng.randrange(10, vocab) for _ in range(args.input_len)]
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prompt_done = time.perf_counter()
        for _ in range(args.output_len):
            # Greedy from the last row of logits (llm.sample's Python sampler chain would be
            # timed instead of llama.cpp).
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        finished = time.perf_counter()
        if r:
            prefill.append(args.input_len / (prompt_done - started))
            decode.append(args.output_len / (finished - prompt_done))
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), {args.threads} threads, "
          f"{args.input_len} prompt + {args.output_len} output tokens, medians of {args.repeats}:")
    print(f"  prompt processing {statistics.median(prefill):.0f} tokens/s")
    print(f"  decode            {statistics.median(decode):.1f} tokens/s "
          f"({1000 / statistics.median(decode):.2f} ms per token)")


if __name__ == "__main__":
    main()
