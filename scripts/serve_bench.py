#!/usr/bin/env python3
"""Measures a running `mamba-lm serve` (standard library only; JSON lines on stdout).

  serve_bench.py URL ttft [--prefix 2000]     time to first token of a prompt whose prefix is
                                              cached, against the same prompt uncached
  serve_bench.py URL streams N [--alone K]    N concurrent greedy streams: all must complete and
                                              the first K must equal the same request run alone
  serve_bench.py URL throughput N [--prompt-len 2048] [--max-tokens 128] [--seed S]
                                              N concurrent streams of that prompt length, each
                                              generating max-tokens (past any end token):
                                              aggregate new tokens/s over the wall time, prefill
                                              included (as `bench generate` counts); each
                                              seed makes prompts of its own, which a server's
                                              prefix cache has not seen
URL is the server's base, e.g. http://127.0.0.1:8080. Prompts are token ids below 4000."""
import argparse, http.client, json, random, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("mode", choices=["ttft", "streams", "throughput"])
ap.add_argument("n", type=int, nargs="?", default=1000)
ap.add_argument("--prefix", type=int, default=2000)
ap.add_argument("--alone", type=int, default=50)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--prompt-len", type=int, default=2048)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
u = urllib.parse.urlparse(a.url)


def stream(prompt, max_tokens, **extra):
    """(text, seconds to the first token, seconds in all, tokens) of one streamed completion."""
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:200]}")
    text, first, tokens, events = "", None, None, 0
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        for ch in ev["choices"]:
            if ch.get("finish_reason") is None:
                events += 1
                first = first or time.perf_counter() - t0
            text += ch["text"]
    c.close()
    # A server that reports no usage in the stream (llama-server) sends a token per event.
    return text, first, time.perf_counter() - t0, events if tokens is None else tokens


rng = random.Random(1)
ids = lambda n: [rng.randrange(10, 4000) for _ in range(n)]
if a.mode == "ttft":
    # A prompt of the same length first (not counted): the server's kernels and buffers for it.
    stream(ids(a.prefix + 24), 1)
    head = ids(a.prefix)
    suffix = [ids(24) for _ in range(4)]
    cold = stream(head + suffix[0], 1)[1]
    stream(head + suffix[1], 1)  # leaves the first prompt after the head: that state is cached
    warm = [stream(head + s, 1)[1] for s in suffix[2:]]
    print(json.dumps({"bench": "serve_ttft", "prefix_tokens": a.prefix, "suffix_tokens": 24,
                      "uncached_s": cold, "cached_s": min(warm), "ratio": min(warm) / cold}))
elif a.mode == "throughput":
    # Warms the server as steady traffic would (kernels, and decode steps of every batch size up
    # to N; then prompts of the measured length, whose kernels and buffers a server's first long
    # prompts pay for), with prompts of their own: the measured ones must not be in its prefix cache.
    rng.seed(f"throughput {a.n} {a.seed} warm")
    for plen in (16, a.prompt_len):
        warm = [threading.Thread(target=stream, args=(ids(plen), 4), kwargs={"ignore_eos": True}) for _ in range(a.n)]
        [t.start() for t in warm]
        [t.join() for t in warm]
    rng.seed(f"throughput {a.n} {a.seed}")
    prompts = [ids(a.prompt_len) for _ in range(a.n)]
    out = [None] * a.n
    def run(i):
        out[i] = stream(prompts[i], a.max_tokens, ignore_eos=True)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(a.n)]
    t0 = time.perf_counter()
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    done = [o for o in out if o is not None]
    tokens = sum(o[3] for o in done)
    print(json.dumps({"bench": "serve_throughput", "streams": a.n, "completed": len(done),
                      "prompt_tokens": a.prompt_len, "max_tokens": a.max_tokens, "seed": a.seed, "wall_s": wall,
                      "tokens": tokens, "tokens_per_s": tokens / wall,
                      "ttft_p50_s": sorted(o[1] for o in done)[len(done) // 2]}))
else:
    prompts = [ids(8) for _ in range(a.n)]
    alone = [stream(p, a.max_tokens)[0] for p in prompts[: a.alone]]
    out = [None] * a.n
    def run(i):
        try:
            out[i] = stream(prompts[i], a.max_tokens)
        except Exception as e:  # counted as incomplete
            out[i] = e
    ts = [threading.Thread(target=run, args=(i,)) for i in range(a.n)]
    t0 = time.perf_counter()
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    done = [o for o in out if isinstance(o, tuple)]
    same = sum(out[i][0] == alone[i] for i in range(len(alone)) if isinstance(out[i], tuple))
    print(json.dumps({"bench": "serve_streams", "streams": a.n, "completed": len(done),
                      "equal_to_alone": same, "checked": len(alone), "wall_s": wall,
                      "tokens": sum(o[3] for o in done), "tokens_per_s": sum(o[3] for o in done) / wall,
                      "ttft_p50_s": sorted(o[1] for o in done)[len(done) // 2]}))
