#!/usr/bin/env python3
"""The official `openai` client against `mamba-lm serve`: completions and chat, streamed and
not, greedy results equal either way. Usage: openai_client_check.py BASE_URL (for example
http://127.0.0.1:8080/v1). Exits non-zero on any mismatch."""
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2] if len(sys.argv) > 2 else "none", max_retries=0)
for _ in range(100):  # the server may still be loading its model
    try:
        model = client.models.list().data[0].id
        break
    except Exception:
        time.sleep(0.2)
else:
    sys.exit("no server at " + sys.argv[1])

whole = client.completions.create(model=model, prompt="ROMEO:", max_tokens=12, temperature=0)
parts = client.completions.create(model=model, prompt="ROMEO:", max_tokens=12, temperature=0, stream=True)
streamed = "".join(c.choices[0].text for c in parts)
assert whole.choices[0].text == streamed, (whole.choices[0].text, streamed)
assert whole.usage.completion_tokens > 0

msgs = [{"role": "system", "content": "You speak verse."}, {"role": "user", "content": "Speak of the moon."}]
chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
parts = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in parts)
assert chat.choices[0].message.content == streamed, (chat.choices[0].message.content, streamed)
assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
print("openai client: completions and chat, streamed and not, agree:", repr(streamed))
