"""Text completions (several prompts, logprobs, extensions) against a local minserve.

    minserve serve &
    python examples/openai_completions.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MINSERVE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("MINSERVE_API_KEY", "unused"),
)
model = client.models.list().data[0].id

out = client.completions.create(
    model=model,
    prompt=["The capital of France is", "def fibonacci(n):"],
    max_tokens=24,
    temperature=0,
    logprobs=2,
    stop=["\n\n"],
    # minserve extensions (as in vLLM) go through extra_body:
    extra_body={"top_k": 40, "min_tokens": 4, "repetition_penalty": 1.1},
)
for choice in out.choices:
    print(f"[{choice.index}] {choice.text!r} ({choice.finish_reason})")
    print("    first token:", choice.logprobs.tokens[0], choice.logprobs.top_logprobs[0])
print(out.usage)
