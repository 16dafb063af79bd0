#!/usr/bin/env python3
"""Time to first token measured with a bare socket, as a reference for `pdserve bench`'s own
client overhead (docs/perf/bench.md).

    python3 tools/bench/raw_ttft.py http://127.0.0.1:PORT -n 2000 --input-words 16 --output 16

Sends N streamed /v1/completions one after another, each on a fresh connection (compare with
`pdserve bench --arrival closed --users 1 --no-keep-alive`), and times connect + send until the
first received bytes that contain a token event. Prints p50/p90/p99 in ms. Standard library only.
"""

import argparse
import json
import socket
import statistics
import time
from urllib.parse import urlparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--input-words", type=int, default=16)
    ap.add_argument("--output", type=int, default=16)
    a = ap.parse_args()
    u = urlparse(a.url)
    host, port = u.hostname, u.port or 80
    body = json.dumps({"prompt": " ".join(["the"] * a.input_words), "max_tokens": a.output, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    req = head + body
    ttft = []
    for _ in range(a.n):
        t0 = time.perf_counter()
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(req)
        buf = b""
        first = None
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            if first is None:
                buf += chunk
                if b'"text":"' in buf or b'"content":"' in buf:
                    first = time.perf_counter()
        s.close()
        if first is not None:
            ttft.append((first - t0) * 1e3)
    ttft.sort()
    q = lambda p: ttft[min(len(ttft) - 1, int(p / 100 * (len(ttft) - 1) + 0.5))]  # noqa: E731
    print(f"raw socket TTFT over {len(ttft)} requests: mean {statistics.mean(ttft):.3f} ms, p50 {q(50):.3f}, "
          f"p90 {q(90):.3f}, p99 {q(99):.3f}, max {ttft[-1]:.3f}")


if __name__ == "__main__":
    main()
