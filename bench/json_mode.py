#!/usr/bin/env python3
"""What JSON mode (response_format json_object) costs a running server: the time per output token
(TPOT, from the streamed tokens' arrival) of JSON-mode answers against plain answers of the same
prompt and the same number of tokens (ignore_eos), in alternating rounds of one request and of
`--batch` concurrent ones; medians over `--rounds`. Prints one JSON object per batch size.

    pdserve serve --port 8000 &
    .venv/bin/python bench/json_mode.py --base-url http://127.0.0.1:8000/v1 --rounds 7

Results: docs/perf/cpu-engine.md ("JSON mode").
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import openai

QUESTION = [{"role": "user", "content": "Describe a cat as a JSON object with its name, age and color."}]


def tpot(client, model, **kw):
    """(seconds per token after the first, tokens, text) of one streamed chat answer."""
    times, text = [], ""
    stream = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **kw)
    tokens = 0
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                times.append(time.perf_counter())
                text += c.delta.content
    assert tokens >= 3 and len(times) >= 2, (tokens, text)
    return (times[-1] - times[0]) / (tokens - 1), tokens, text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16, help="concurrent requests in the batched rounds")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    fmt = {"type": "json_object"}
    _, n, text = tpot(client, model, max_tokens=400, response_format=fmt)
    json.loads(text)  # the answer is whole
    for batch in (1, args.batch):
        runs = {"json": [], "plain": []}
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:
            for _ in range(args.rounds):
                for mode in ("json", "plain"):
                    kw = dict(max_tokens=400, response_format=fmt) if mode == "json" else \
                        dict(max_tokens=n, extra_body={"ignore_eos": True})
                    got = list(pool.map(lambda _: tpot(client, model, **kw), range(batch)))
                    assert all(g[1] == n for g in got), [g[1] for g in got]
                    runs[mode].append(statistics.median(g[0] for g in got))
        j, p = statistics.median(runs["json"]), statistics.median(runs["plain"])
        print(json.dumps({"batch": batch, "tokens": n, "rounds": args.rounds, "json_tpot_ms": round(j * 1e3, 3),
                          "plain_tpot_ms": round(p * 1e3, 3), "ratio": round(j / p, 4)}))


if __name__ == "__main__":
    main()
