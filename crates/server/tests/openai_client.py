"""Drives a running minserve with the official `openai` package; run by openai_python.rs.

Usage: python openai_client.py BASE_URL MODEL
"""

import sys

import openai
from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0)

# Models.
assert [m.id for m in client.models.list().data] == [model]

# Chat, not streamed.
messages = [{"role": "user", "content": "Say hi"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
assert chat.choices[0].message.role == "assistant"
assert chat.choices[0].finish_reason == "length"
assert chat.usage.completion_tokens == 4
text = chat.choices[0].message.content
assert text

# Chat, streamed, with usage; the same greedy text.
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
        assert chunk.choices == []
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
assert "".join(pieces) == text, (pieces, text)
assert finish == "length" and usage.completion_tokens == 4

# Chat logprobs.
chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=2, logprobs=True, top_logprobs=3, seed=7,
)
content = chat.choices[0].logprobs.content
assert len(content) == 2 and len(content[0].top_logprobs) == 3

# Completions, not streamed and streamed.
comp = client.completions.create(
    model=model, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=3, temperature=0,
    logprobs=2, extra_body={"top_k": 5, "ignore_eos": True},
)
assert comp.object == "text_completion" and len(comp.choices) == 2
assert comp.usage.completion_tokens == 6
assert len(comp.choices[0].logprobs.tokens) == 3
first = comp.choices[0].text
stream = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=3, temperature=0, stream=True,
)
assert "".join(c.choices[0].text for c in stream if c.choices) == first

# Errors map to the SDK's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=model, messages=messages, temperature=-1)
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
bad_key = OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
try:
    bad_key.models.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError:
    pass

print("openai client OK")
