"""Chat with a local minserve through the official `openai` package.

    minserve serve &            # serves the default model on http://127.0.0.1:8000/v1
    pip install openai
    python examples/openai_chat.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MINSERVE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("MINSERVE_API_KEY", "unused"),  # any string unless --api-key is set
)
model = client.models.list().data[0].id

reply = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    max_tokens=64,
    temperature=0,
)
print(reply.choices[0].message.content)
print(reply.usage)
