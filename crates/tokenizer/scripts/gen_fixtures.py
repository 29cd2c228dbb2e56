#!/usr/bin/env python3
"""Generate the reference fixtures for minserve-tokenizer's tests.

The fixtures pin what an *independent* implementation does with the SmolLM2-135M-Instruct GGUF,
so the Rust tests compare our GGUF-built tokenizer against it rather than against itself:

* token ids: llama.cpp's tokenizer, through llama-cpp-python, loading only the vocabulary
  (``Llama(model_path, vocab_only=True).tokenize(text, add_bos=..., special=True)``);
* chat prompts: Python ``jinja2`` configured the way Hugging Face ``transformers`` renders chat
  templates (sandboxed, ``trim_blocks=True``, ``lstrip_blocks=True``, loop controls,
  ``raise_exception``), fed the template text stored in the GGUF; the rendered prompts are then
  tokenized by llama.cpp as above.

How the committed fixtures were produced (llama-cpp-python compiles llama.cpp from source, which
takes several minutes):

    python3 -m venv /tmp/lcpp
    /tmp/lcpp/bin/pip install llama-cpp-python jinja2      # llama-cpp-python 0.3.36, jinja2 3.1.6
    /tmp/lcpp/bin/python crates/tokenizer/scripts/gen_fixtures.py \
        models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

It writes crates/tokenizer/tests/fixtures/smollm2_tokens.json and smollm2_chat.json. Rerun it
after changing TEXTS or CONVERSATIONS below; the Rust tests read the files, not this script.
"""

import json
import pathlib
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox
import llama_cpp
from llama_cpp import Llama

# Strings chosen to exercise every part of the pipeline: the pre-tokenizer regex (spaces,
# newlines, digits, punctuation, contractions), byte-level BPE on multi-byte UTF-8, and the
# special-token matcher. Keep the empty string: encoders like to crash on it.
TEXTS = [
    "",
    "The quick brown fox",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple    inner     spaces",
    " ",
    "   ",
    "line one\nline two",
    "paragraph one\n\nparagraph two\n",
    "\n\n\n",
    "tab\tseparated\tvalues",
    "\t indented with tab and space",
    "mixed \r\n line endings\r\n",
    "1234567890",
    "In 2024, 3.14159 and 1,000,000 people paid $42.50.",
    "phone: +1-555-0100, id=007",
    "What?! No way... (really) [yes] {ok} <tag> #hash @user 50% a&b ~x^y",
    "It's, they're, we've, I'm, you'll, she'd, DON'T, It'S",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}",
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?q=a+b&x=1#frag",
    "café naïve résumé über straße",
    "Ελληνικά и русский текст",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "emoji: 😀🎉👍🏽 family: 👨‍👩‍👧",
    "math: ∑ x² ≤ ∞ → ≠",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text before<|endoftext|>text after",
    "<|im_end|><|im_end|>",
    "not special: <|im_start |> and <im_start>",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "ALL CAPS SHOUTING AND lowercase whispering",
    "a" * 64,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
]

# Conversations for the chat-template fixtures. SmolLM2's template injects a default system
# prompt when the first message is not a system message, hence the user-only case.
CONVERSATIONS = {
    "system_user_assistant": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "user_only": [
        {"role": "user", "content": "Hi there! Can you count to 3?"},
    ],
    "multi_turn_unicode": [
        {"role": "user", "content": "Dis bonjour 👋"},
        {"role": "assistant", "content": "Bonjour ! 😀"},
        {"role": "user", "content": "  and now\nwith   spaces  "},
    ],
}


def hf_jinja_env():
    """A jinja2 environment set up like transformers' chat-template renderer."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def one_entry_per_line(entries):
    """A JSON list with one compact entry per line: readable diffs, no 1-id-per-line bloat."""
    lines = ",\n".join(" " + json.dumps(e, ensure_ascii=False) for e in entries)
    return "[\n" + lines + "\n]\n"


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf")
    model_path = sys.argv[1]
    out_dir = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    out_dir.mkdir(parents=True, exist_ok=True)

    llm = Llama(model_path=model_path, vocab_only=True, verbose=False)

    def tokenize(text, add_special):
        return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    tokens = []
    for text in TEXTS:
        ids = tokenize(text, False)
        # llama.cpp's detokenizer as a second opinion on round-tripping.
        decoded = llm.detokenize(ids, special=True).decode("utf-8")
        if decoded != text:
            print(f"note: llama.cpp does not round-trip {text!r} -> {decoded!r}", file=sys.stderr)
        tokens.append(
            {
                "text": text,
                "ids": ids,
                # add_bos=True asks llama.cpp to add whatever the GGUF says (nothing for SmolLM2).
                "ids_with_special": tokenize(text, True),
            }
        )
    (out_dir / "smollm2_tokens.json").write_text(one_entry_per_line(tokens), encoding="utf-8")

    template_source = llm.metadata["tokenizer.chat_template"]
    bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8")
    template = hf_jinja_env().from_string(template_source)
    chats = []
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (False, True):
            rendered = template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos,
                eos_token=eos,
            )
            chats.append(
                {
                    "name": name,
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "rendered": rendered,
                    "ids": tokenize(rendered, False),
                }
            )
    header = {
        "generator": "crates/tokenizer/scripts/gen_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "jinja2": jinja2.__version__,
        "bos_token": bos,
        "eos_token": eos,
        "template": template_source,
    }
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in header.items())
    (out_dir / "smollm2_chat.json").write_text(
        "{\n" + body + ',\n "chats": ' + one_entry_per_line(chats).rstrip("\n") + "\n}\n",
        encoding="utf-8",
    )
    print(f"wrote {len(tokens)} token fixtures and {len(chats)} chat fixtures to {out_dir}")


if __name__ == "__main__":
    main()
