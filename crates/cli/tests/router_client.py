"""The openai SDK against minserve replicas behind the vLLM router (scripts/replicas), and a
replica killed in the middle of a stream.

    python router_client.py ROUTER_URL MODEL WORKER_URL=PID [WORKER_URL=PID ...]

Prints "router client OK" when every check passed; any failure raises.
"""
import json
import os
import signal
import sys
import threading
import time
import urllib.request

import openai

router, model = sys.argv[1], sys.argv[2]
workers = dict(arg.split("=", 1) for arg in sys.argv[3:])
# The SDK's own retries would hide what the router does: off.
client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=120)


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def successes(worker):
    with urllib.request.urlopen(worker + "/metrics", timeout=5) as r:
        page = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("minserve_request_success_total{")
    )


def chat(content, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=kw.pop("max_tokens", 8),
        temperature=0,
        **kw,
    )


# 1. Requests through the router, as the SDK sends them (the router adds SGLang's fields with
# their default values: minserve must accept those).
for i in range(6):
    r = chat(f"Say a word about the number {i}.")
    assert r.choices[0].message.content, r
    assert r.choices[0].finish_reason in ("stop", "length"), r
text = ""
for chunk in chat("Count to five.", stream=True, max_tokens=12):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
assert text, "the streamed answer was empty"
served = {w: successes(w) for w in workers}
assert all(n > 0 for n in served.values()), f"round robin left a replica idle: {served}"
print("through the router:", served)

# 2. A replica dies while it streams: the client's stream must end (an error or a cut-short
# answer), not hang.
outcome = {}


def long_stream():
    started = time.monotonic()
    try:
        n = 0
        for _ in chat("Tell a very long story.", stream=True, max_tokens=1500,
                      extra_body={"ignore_eos": True}):
            n += 1
        outcome["result"] = f"ended after {n} chunks"
    except Exception as e:  # the point: any clean end
        outcome["result"] = f"{type(e).__name__}: {e}"
    outcome["seconds"] = time.monotonic() - started


thread = threading.Thread(target=long_stream)
thread.start()
victim = None
deadline = time.monotonic() + 60
while victim is None and time.monotonic() < deadline:
    for w in workers:
        if get_json(w + "/get_load")["load"] > 0:
            victim = w
            break
    time.sleep(0.05)
assert victim, "no replica ever reported the streaming request in /get_load"
time.sleep(0.5)
os.kill(int(workers[victim]), signal.SIGKILL)
thread.join(timeout=60)
assert not thread.is_alive(), "the stream hung after its replica was killed"
print(f"killed {victim} mid-stream: {outcome['result']} ({outcome['seconds']:.1f} s)")

# 3. With a replica gone, requests still get answers from the other (the router retries a
# refused connection elsewhere and marks the dead worker unhealthy), and none hangs.
ok, failed = 0, []
for i in range(6):
    started = time.monotonic()
    try:
        chat(f"After the failure, request {i}.")
        ok += 1
    except Exception as e:
        failed.append(f"{type(e).__name__}: {e}")
    assert time.monotonic() - started < 60, "a request hung after the failure"
print(f"after the failure: {ok} answered, failed: {failed}")
assert ok >= 5, failed
print("router client OK")
