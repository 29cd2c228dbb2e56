"""Tool calling through the official `openai` package; run by openai_python.rs.

A round trip with two tools (call -> tool message -> answer), streamed and not, the streamed
deltas reassembling to the non-streamed message; a named `tool_choice` always yields a valid
call of that function (SAMPLES seeded samples at temperature 1, default 20).

Usage: python openai_tools.py BASE_URL MODEL
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
samples = int(os.environ.get("SAMPLES", "20"))

tools = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    }},
    {"type": "function", "function": {
        "name": "add",
        "description": "Adds two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    }},
]


def check_call(call, name=None):
    """A call of an offered tool whose arguments satisfy its schema."""
    assert call.type == "function" and call.id.startswith("call_"), call
    args = json.loads(call.function.arguments)
    if name:
        assert call.function.name == name, call
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"}, args
        assert isinstance(args["city"], str) and len(args["city"]) <= 20, args
        assert args["unit"] in ("celsius", "fahrenheit"), args
    else:
        assert call.function.name == "add", call
        assert set(args) == {"a", "b"} and all(isinstance(args[k], int) for k in "ab"), args
    return call.function.name, args


messages = [{"role": "user", "content": "What is the weather in Paris?"}]
request = dict(model=model, messages=messages, tools=tools, tool_choice="required",
               parallel_tool_calls=False, temperature=0, max_tokens=60)

# Not streamed.
first = client.chat.completions.create(**request)
choice = first.choices[0]
assert choice.finish_reason == "tool_calls", choice
assert len(choice.message.tool_calls) == 1, choice.message
call = choice.message.tool_calls[0]
name, args = check_call(call)
assert not (choice.message.content or "").strip(), choice.message.content
print("call:", name, args)

# Streamed: a call's id and name first, then its arguments; nothing in content.
stream = client.chat.completions.create(**request, stream=True)
calls, content, finish, fragments = {}, [], None, 0
for chunk in stream:
    for c in chunk.choices:
        finish = c.finish_reason or finish
        content.append(c.delta.content or "")
        for d in c.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert entry["id"] is None and d.function.name, d
                entry["id"], entry["name"] = d.id, d.function.name
            else:
                assert entry["id"] is not None, "arguments before the name"
                fragments += 1
            entry["arguments"] += d.function.arguments or ""
assert finish == "tool_calls", finish
assert "".join(content).strip() == "", content
assert [(e["name"], json.loads(e["arguments"])) for e in calls.values()] == [(name, args)], calls
# The arguments stream token by token, not as one fragment at the end.
assert fragments > 2, fragments

# The tool's answer goes back; the model answers in text.
result = "18 degrees and sunny" if name == "get_weather" else "42"
messages += [
    choice.message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": result},
]
for tool_choice in ["none", "auto"]:
    answer = client.chat.completions.create(
        model=model, messages=messages, tools=tools, tool_choice=tool_choice, temperature=0,
        max_tokens=30,
    )
    message = answer.choices[0].message
    if tool_choice == "none":
        assert message.content and not message.tool_calls, message
    for c in message.tool_calls or []:
        check_call(c)
    print(f"answer ({tool_choice}):", message.content, message.tool_calls)
    # Streamed, the same answer.
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=tools, tool_choice=tool_choice, temperature=0,
        max_tokens=30, stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == (message.content or ""), (text, message.content)


def named(seed):
    tool = tools[seed % 2]["function"]["name"]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Help me."}], tools=tools,
        tool_choice={"type": "function", "function": {"name": tool}},
        temperature=1, seed=seed, max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1, choice.message
    return check_call(choice.message.tool_calls[0], tool)


with ThreadPoolExecutor(max_workers=samples) as pool:
    named_calls = list(pool.map(named, range(samples)))
print(f"named tool_choice: {samples}/{samples} valid calls, e.g. {named_calls[:2]}")

print("openai tools OK")
