"""Fixtures for the end-to-end tests: real `pdserve serve` processes on loopback ports.

PDSERVE_BIN points at the binary (default: build/release/src/bin/pdserve); PDSERVE_MODEL at the
model (default: the binary's default model). Each server listens on a free port (--port 0; the
port is read from its log), is ready when GET /health answers 200, and must exit 0 on SIGTERM.
"""

import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PDSERVE_BIN", os.path.join(ROOT, "build", "release", "src", "bin", "pdserve"))
MODEL_NAME = "smol"
API_KEY = "e2e-secret"


def parse_metrics(text):
    """Prometheus exposition text as {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


class Server:
    """One `pdserve serve` process (or, with command="instance"/"gateway", one of those)."""

    def __init__(self, *args, command="serve"):
        if not os.path.exists(BIN):
            pytest.skip(f"{BIN} is not built (set PDSERVE_BIN)")
        if command == "serve":
            mode = [] if "--mode" in args else ["--mode", "aggregated"]
            cmd = [BIN, "serve", *mode, "--port", "0", "--served-model-name", MODEL_NAME, *args]
        elif command == "gateway":
            cmd = [BIN, "gateway", "--port", "0", "--served-model-name", MODEL_NAME, *args]
        else:
            cmd = [BIN, command, *([] if "--port" in args else ["--port", "0"]), *args]
        self.command = command
        env = dict(os.environ)
        env.pop("PDSERVE_API_KEY", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.log = []
        self.port = None
        self._port_seen = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        if not self._port_seen.wait(30):
            self.stop()
            raise RuntimeError("pdserve did not start listening:\n" + "".join(self.log))
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while True:
            status, _, _ = self.get("/health")
            if status == 200:
                break
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("pdserve did not become ready:\n" + "".join(self.log))
            time.sleep(0.05)

    def _read(self, stream):
        for line in stream:
            self.log.append(line)
            m = re.search(r"listening on http://[0-9.]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._port_seen.set()

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body bytes) of one HTTP request."""
        data = body if isinstance(body, (bytes, type(None))) else body.encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except (ConnectionError, urllib.error.URLError):
            return 0, {}, b""

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def metrics(self, headers=None):
        """The /metrics samples as {'name{labels}': value}."""
        status, _, body = self.get("/metrics", headers=headers)
        assert status == 200
        return parse_metrics(body.decode())

    def wait_idle(self, timeout=10, headers=None, settle=0.6):
        """Waits until no sequence runs or waits, no KV block is in use and (disaggregated) no prefill
        slot, staged KV or gateway place is held; returns the metrics.

        A gateway reports its instances' figures as read every 200 ms, so one idle read may be an
        older snapshot (taken while requests still queued at the gateway, their handoffs not yet
        counted): the state counts as idle once it has read idle for `settle` seconds, long enough
        for every instance to have been read again."""
        deadline = time.monotonic() + timeout
        idle_since = None
        while True:
            m = self.metrics(headers)
            idle = (m["pdserve_sequences_running"] == 0 and m["pdserve_sequences_waiting"] == 0
                    and m["pdserve_kv_blocks_used"] == 0 and m["pdserve_requests_in_flight"] == 0
                    and m["pdserve_prefill_slots_in_use"] == 0 and m["pdserve_handoffs_outstanding"] == 0
                    and m["pdserve_gateway_waiting"] == 0 and m["pdserve_decode_pending"] == 0)
            now = time.monotonic()
            idle_since = (idle_since or now) if idle else None
            if (idle and now - idle_since >= settle) or now > deadline:
                return m
            time.sleep(0.05)

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kwargs.pop("api_key", "unused"),
                             max_retries=0, timeout=120, **kwargs)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def kill(self):
        """SIGKILL: a crash, as far as everyone else can tell."""
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    s = Server("--threads", "2")
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="session")
def nocache_server():
    s = Server("--threads", "2", "--no-prefix-caching", "--kv-cache-memory", "64MiB")
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="session")
def tiny_kv_server():
    # 16 blocks of 16 tokens: one request of up to 256 tokens fits, a few at once do not.
    s = Server("--threads", "2", "--kv-cache-memory", "5760KiB", "--max-context", "256")
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="session")
def strict_server():
    # API key, no queue at all (every generation request is refused with 429), 4 KiB bodies.
    s = Server("--threads", "1", "--api-key", API_KEY, "--max-waiting", "0", "--max-body-bytes", "4096",
               "--kv-cache-memory", "16MiB")
    yield s
    assert s.stop() == 0, "".join(s.log)
