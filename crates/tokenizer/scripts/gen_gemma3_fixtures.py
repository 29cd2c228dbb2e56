#!/usr/bin/env python3
"""Token-id fixtures for the Gemma 3 GGUF tokenizer (262,144 SentencePiece pieces), from
llama.cpp's tokenizer, as gen_fixtures.py does for SmolLM2 and with the same TEXTS, plus Gemma's
turn markers and whitespace runs.

    /tmp/lcpp/bin/python crates/tokenizer/scripts/gen_gemma3_fixtures.py \
        models/gemma3-270m/gemma-3-270m-q4_k_m.gguf

writes crates/tokenizer/tests/fixtures/gemma3_tokens.json (llama-cpp-python 0.3.36 made the
committed file).
"""

import json
import pathlib
import sys

from llama_cpp import Llama

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gen_fixtures import TEXTS, one_entry_per_line  # noqa: E402

GEMMA_TEXTS = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n",
    "not special: <start_of_turn > and <end_of_turn",
    "indent:\n        eight spaces\n\t\ttwo tabs",
    "    four leading spaces and trailing four    ",
    "<h1>Title</h1>\n<p>Some <b>bold</b> text.</p>",
]


def main():
    llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    entries = []
    for text in TEXTS + GEMMA_TEXTS:
        data = text.encode("utf-8")
        entries.append(
            {
                "text": text,
                "ids": llm.tokenize(data, add_bos=False, special=True),
                "ids_with_special": llm.tokenize(data, add_bos=True, special=True),
            }
        )
    out = pathlib.Path(__file__).parent.parent / "tests/fixtures/gemma3_tokens.json"
    out.write_text(one_entry_per_line(entries))


if __name__ == "__main__":
    main()
