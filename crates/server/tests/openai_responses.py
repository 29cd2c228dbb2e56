"""The Responses API through the official `openai` package; run by openai_python.rs.

`responses.create` with text input, with messages and instructions; `responses.parse` with a
Pydantic schema (SAMPLES seeded samples at temperature 1, default 20, all valid);
`responses.stream` whose events reassemble to the non-streamed response; a function-tool round
trip (function_call -> function_call_output -> answer), streamed and not; bad input raises
BadRequestError naming the field.

Usage: python openai_responses.py BASE_URL MODEL
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
samples = int(os.environ.get("SAMPLES", "20"))

# Text input.
r = client.responses.create(model=model, input="Say hello.", max_output_tokens=16, temperature=0)
assert r.object == "response" and r.status in ("completed", "incomplete"), r
assert r.output_text, r
assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16, r.usage
assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
print("text:", repr(r.output_text), r.status)

# Messages and instructions; the same conversation as chat gives the same text.
messages = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "input_text", "text": "And of Italy?"}]},
]
r = client.responses.create(model=model, instructions="Answer in one word.", input=messages,
                            max_output_tokens=10, temperature=0)
chat = client.chat.completions.create(
    model=model, max_tokens=10, temperature=0,
    messages=[{"role": "system", "content": "Answer in one word."}] + [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
         else m["content"][0]["text"]} for m in messages])
assert r.instructions == "Answer in one word.", r.instructions
assert r.output_text == chat.choices[0].message.content, (r.output_text, chat)
print("messages:", repr(r.output_text))

# Cut off at max_output_tokens: incomplete.
r = client.responses.create(model=model, input="Write a long poem about the sea.",
                            max_output_tokens=4, temperature=0,
                            extra_body={"ignore_eos": True})
assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
assert r.usage.output_tokens == 4, r.usage


# Structured output with a Pydantic schema.
class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    kind: str = Field(pattern="^(cat|dog|fish)$")


def parsed(seed):
    r = client.responses.parse(
        model=model, input="Describe a pet as JSON.", text_format=Pet, temperature=1,
        max_output_tokens=80, extra_body={"seed": seed},
    )
    assert r.status == "completed", r
    assert isinstance(r.output_parsed, Pet), r.output_text
    return r.output_parsed


with ThreadPoolExecutor(max_workers=samples) as pool:
    pets = list(pool.map(parsed, range(samples)))
print(f"parse: {samples}/{samples} valid, e.g. {pets[:2]}")

# Streamed: the events in order, the text reassembling to the non-streamed response.
request = dict(model=model, input="Tell me about cats.", max_output_tokens=24, temperature=0)
whole = client.responses.create(**request)
with client.responses.stream(**request) as stream:
    kinds, deltas, numbers = [], [], []
    for event in stream:
        kinds.append(event.type)
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    final = stream.get_final_response() if whole.status == "completed" else None
assert numbers == list(range(len(numbers))), numbers
assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"], kinds
assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done"], kinds
assert kinds[-1] == ("response.completed" if whole.status == "completed"
                     else "response.incomplete"), kinds
assert "".join(deltas) == whole.output_text, (deltas, whole.output_text)
if final is not None:
    assert final.output_text == whole.output_text
print("stream:", len(deltas), "deltas ->", repr(whole.output_text))

# A function-tool round trip: call -> output -> answer.
tools = [
    {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
     "parameters": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"], "additionalProperties": False},
     "strict": True},
    {"type": "function", "name": "add", "description": "Adds two integers.",
     "parameters": {"type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False},
     "strict": True},
]
conversation = [{"role": "user", "content": "What is the weather in Paris?"}]
request = dict(model=model, input=conversation, tools=tools, tool_choice="required",
               parallel_tool_calls=False, temperature=0, max_output_tokens=60)
first = client.responses.create(**request)
calls = [item for item in first.output if item.type == "function_call"]
assert first.status == "completed" and len(calls) == 1, first.output
call = calls[0]
args = json.loads(call.arguments)
assert call.name in ("get_weather", "add") and call.call_id.startswith("call_"), call
assert set(args) == ({"city"} if call.name == "get_weather" else {"a", "b"}), args
print("call:", call.name, args)

# Streamed, the same call: its arguments as deltas, then done.
with client.responses.stream(**request) as stream:
    streamed_args, done_args, fragments = "", None, 0
    for event in stream:
        if event.type == "response.function_call_arguments.delta":
            streamed_args += event.delta
            fragments += 1
        elif event.type == "response.function_call_arguments.done":
            done_args = event.arguments
        assert event.type != "response.output_text.delta", event
    final = stream.get_final_response()
streamed_calls = [item for item in final.output if item.type == "function_call"]
assert [(c.name, json.loads(c.arguments)) for c in streamed_calls] == [(call.name, args)]
assert streamed_args == done_args == streamed_calls[0].arguments, (streamed_args, done_args)
assert fragments > 2, fragments  # token by token

# The output goes back with the call; the model answers in text.
result = "18 degrees and sunny" if call.name == "get_weather" else "42"
conversation += [item.model_dump(exclude_none=True) for item in first.output]
conversation.append({"type": "function_call_output", "call_id": call.call_id, "output": result})
answer = client.responses.create(model=model, input=conversation, tools=tools, tool_choice="none",
                                 temperature=0, max_output_tokens=30)
assert answer.output_text and not [i for i in answer.output if i.type == "function_call"], answer
print("answer:", repr(answer.output_text))
with client.responses.stream(model=model, input=conversation, tools=tools, tool_choice="none",
                             temperature=0, max_output_tokens=30) as stream:
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
assert text == answer.output_text, (text, answer.output_text)


# A named function is always called.
def named(seed):
    tool = tools[seed % 2]["name"]
    r = client.responses.create(
        model=model, input="Help me.", tools=tools,
        tool_choice={"type": "function", "name": tool}, temperature=1, max_output_tokens=60,
        extra_body={"seed": seed},
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == tool, r.output
    json.loads(calls[0].arguments)
    return tool


with ThreadPoolExecutor(max_workers=samples) as pool:
    list(pool.map(named, range(samples)))
print(f"named tool_choice: {samples}/{samples} calls of the named function")

# The same round trip continued from the stored response: previous_response_id carries the
# conversation, the new input is just the function's output.
answer = client.responses.create(
    model=model, previous_response_id=first.id, tools=tools, tool_choice="none", temperature=0,
    max_output_tokens=30,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}])
assert answer.previous_response_id == first.id and answer.output_text, answer
print("answer (previous_response_id):", repr(answer.output_text))

# Bad input: the SDK raises BadRequestError naming the field.
for kwargs, param in [
    (dict(input="hi", previous_response_id="resp_123"), "previous_response_id"),
    (dict(input=[{"type": "function_call_output", "call_id": "nope", "output": "1"}]),
     "input[0].call_id"),
    (dict(input="hi", tools=tools, tool_choice={"type": "function", "name": "absent"}),
     "tool_choice"),
    (dict(input="hi", text={"format": {"type": "json_schema", "name": "x",
                                       "schema": {"type": "frobnicate"}}}), "text.format"),
]:
    try:
        client.responses.create(model=model, max_output_tokens=4, **kwargs)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == param, (e.body, param)
    else:
        raise AssertionError(f"no error for {kwargs}")
# Still serving.
assert client.responses.create(model=model, input="hi", max_output_tokens=2).usage.output_tokens

print("openai responses OK")
