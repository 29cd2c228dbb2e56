"""Two models and two tenants through the official `openai` package; run by openai_python.rs.

Usage: python openai_tenants.py BASE_URL MODEL   (the server also serves `tiny`; MODEL has the
alias `chat`; tenant `a` (key-a) may have one request in flight, tenant `b` (key-b) any)
"""

import sys

import openai
from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
a = OpenAI(base_url=base_url, api_key="key-a", max_retries=0)
b = OpenAI(base_url=base_url, api_key="key-b", max_retries=0)

# Both models are listed, with their limits; each answers by name or alias.
cards = {m.id: m for m in b.models.list().data}
assert set(cards) == {model, "tiny"}, cards
assert cards["tiny"].model_extra["max_num_seqs"] == 2
for name, served in [(model, model), ("chat", model), ("tiny", "tiny")]:
    done = b.completions.create(model=name, prompt="Hello", max_tokens=2, temperature=0)
    assert done.model == served, (name, done.model)

# An unknown model: the SDK's NotFoundError, naming the served ones.
try:
    b.completions.create(model="gpt-4o", prompt="Hello", max_tokens=1)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert "tiny" in str(e) and model in str(e), e

# A bad key.
try:
    OpenAI(base_url=base_url, api_key="key-z", max_retries=0).models.list()
    raise AssertionError("a bad key was accepted")
except openai.AuthenticationError:
    pass

# Tenant a over its one request in flight: RateLimitError with Retry-After; b is not held.
stream = a.completions.create(
    model=model, prompt="Once upon a time", max_tokens=64, stream=True,
    extra_body={"ignore_eos": True},
)
first = next(iter(stream))
try:
    a.completions.create(model=model, prompt="Hello", max_tokens=1)
    raise AssertionError("tenant a went over its limit")
except openai.RateLimitError as e:
    assert e.response.headers["retry-after"] == "1", e.response.headers
    assert e.body["type"] == "rate_limit_error", e.body
b.completions.create(model=model, prompt="Hello", max_tokens=1)
stream.close()

# A session: its second turn finds the first cached.
messages = [{"role": "system", "content": "You are a helpful assistant. " * 8},
            {"role": "user", "content": "Name a colour."}]
one = b.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                extra_headers={"x-session-id": "conversation-7"})
messages += [{"role": "assistant", "content": one.choices[0].message.content},
             {"role": "user", "content": "Another one."}]
two = b.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                extra_headers={"x-session-id": "conversation-7"})
assert two.usage.prompt_tokens_details.cached_tokens >= 16, two.usage

print("openai tenants OK")
