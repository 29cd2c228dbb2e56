"""Structured outputs through the official `openai` package; run by openai_python.rs.

Every output of a seeded batch at temperature 1 must follow its grammar: a Pydantic schema
through `client.chat.completions.parse`, vLLM's `structured_outputs` regex and choice. Small
schemas and short outputs keep it quick on CI's two cores; SAMPLES (default 50) sets the size.

Usage: python openai_structured.py BASE_URL MODEL
"""

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
samples = int(os.environ.get("SAMPLES", "50"))


def each_seed(request):
    with ThreadPoolExecutor(max_workers=samples) as pool:
        return list(pool.map(request, range(samples)))


class Pet(BaseModel):
    name: str = Field(max_length=10)
    species: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


def parsed_pet(seed):
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        response_format=Pet,
        temperature=1,
        seed=seed,
        max_tokens=80,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    # The SDK parsed it with the model; validate the raw text again, independently.
    Pet.model_validate_json(choice.message.content)
    assert isinstance(choice.message.parsed, Pet)
    return choice.message.content


pets = each_seed(parsed_pet)
assert len(set(pets)) > 1, pets  # temperature 1 does vary
print(f"json_schema: {samples}/{samples} valid, e.g. {pets[0]}")


def json_object(seed):
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        response_format={"type": "json_object"},
        temperature=1, seed=seed, max_tokens=40,
    )
    choice = completion.choices[0]
    # Free-form JSON may be cut off by max_tokens; what is there must be a JSON object's prefix.
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    else:
        assert choice.message.content.startswith("{"), choice.message.content
    return choice.finish_reason


print("json_object:", each_seed(json_object)[:5])

PLATE = r"[A-Z]{2}-[0-9]{3,4}"


def regex_completion(seed):
    completion = client.completions.create(
        model=model, prompt="A licence plate:", temperature=1, seed=seed, max_tokens=20,
        extra_body={"structured_outputs": {"regex": PLATE}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert re.fullmatch(PLATE, choice.text), choice.text
    return choice.text


plates = each_seed(regex_completion)
print(f"regex: {samples}/{samples} match, e.g. {plates[:3]}")

COLOURS = ["red", "green", "blue", "dark purple"]


def choice_chat(seed):
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Pick a colour."}],
        temperature=1, seed=seed, max_tokens=10,
        extra_body={"structured_outputs": {"choice": COLOURS}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content in COLOURS, choice
    return choice.message.content


colours = each_seed(choice_chat)
print(f"choice: {samples}/{samples} in the list, {len(set(colours))} distinct")

# Streamed: the chunks reassemble to a valid output.
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Describe a pet as JSON."}],
    response_format={"type": "json_schema", "json_schema": {
        "name": "pet", "schema": Pet.model_json_schema(), "strict": True}},
    temperature=1, seed=3, max_tokens=80, stream=True,
)
pieces, finish = [], None
for chunk in stream:
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
assert finish == "stop", finish
Pet.model_validate_json("".join(pieces))

print("openai structured OK")
