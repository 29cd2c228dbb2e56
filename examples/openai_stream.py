"""Stream a chat completion token by token from a local minserve.

    minserve serve &
    python examples/openai_stream.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MINSERVE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("MINSERVE_API_KEY", "unused"),
)
model = client.models.list().data[0].id

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me a short story about a lighthouse."}],
    max_tokens=128,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n\n{chunk.usage}")
