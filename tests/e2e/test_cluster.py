"""End-to-end tests of disaggregated serving across processes: `pdserve instance --role prefill`,
`pdserve instance --role decode` and `pdserve gateway`, on loopback, with the KV moving over shared
memory, TCP or UCX; compared with `pdserve serve --mode aggregated`. Faults are real: kill -9."""

import concurrent.futures
import json
import subprocess
import time
import urllib.request

import openai
import pytest

from conftest import BIN, MODEL_NAME, Server
from test_server import JSON_QUESTION, PROMPTS, chat, check_json_mode, check_logit_bias, stream_text


class Cluster:
    """Prefill and decode instance processes and a gateway over them."""

    def __init__(self, transport, prefills=1, decodes=1, gateway_args=(), layer_wise=False):
        self.transport = transport
        self.layer_wise = layer_wise
        self.prefills = [self.start_instance("prefill") for _ in range(prefills)]
        self.decodes = [self.start_instance("decode") for _ in range(decodes)]
        args = [a for p in self.prefills for a in ("--prefill", p.address)]
        args += [a for d in self.decodes for a in ("--decode", d.address)]
        self.gateway = Server(*args, *gateway_args, command="gateway")

    def start_instance(self, role, port=0):
        args = ["--role", role, "--threads", "1", "--transport", self.transport, "--kv-cache-memory", "64MiB"]
        if self.layer_wise and role == "prefill":
            args += ["--kv-layer-wise"]
        if port:
            args += ["--port", str(port)]
        return Server(*args, command="instance")

    def stop(self):
        codes = [self.gateway.stop()] + [p.stop() for p in self.prefills + self.decodes]
        return codes


def instance_stats(server):
    with urllib.request.urlopen(server.base + "/internal/v1/stats", timeout=10) as r:
        return json.loads(r.read())


def wait_until(fn, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


def complete(client, prompt, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL_NAME, prompt=prompt, **kw)


def has_ucx():
    """Whether this pdserve was built with the ucx KV transport (`--version` lists it)."""
    r = subprocess.run([BIN, "--version"], capture_output=True, text=True, timeout=30)
    return "ucx" in r.stdout


@pytest.fixture(scope="module", params=["shm", "tcp", "ucx", "shm-layer-wise", "tcp-layer-wise"])
def cluster(request):
    if request.param == "ucx" and not has_ucx():
        pytest.skip("this pdserve was built without UCX (install libucx-dev and rebuild)")
    transport, _, layer_wise = request.param.partition("-")
    c = Cluster(transport, layer_wise=bool(layer_wise))
    yield c
    assert c.stop() == [0, 0, 0], "".join(c.gateway.log)


def test_greedy_output_equals_aggregated_mode(server, cluster):
    prompts = PROMPTS + ["The capital of France is", "def fibonacci(n):", "Once upon a time",
                         "1, 1, 2, 3, 5, 8,"]
    assert len(prompts) >= 20
    results = {}
    for name, s in (("aggregated", server), ("cluster", cluster.gateway)):
        client = s.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results[name] = list(pool.map(
                lambda p: complete(client, p, extra_body={"ignore_eos": True}), prompts))
    for p, a, d in zip(prompts, results["aggregated"], results["cluster"]):
        assert d.choices[0].text == a.choices[0].text, (cluster.transport, p)
        assert d.usage.completion_tokens == a.usage.completion_tokens, p
    m = cluster.gateway.wait_idle()
    assert m["pdserve_handoffs_total"] >= len(prompts)
    assert m["pdserve_kv_pulls_failed_total"] == 0
    # Every pull landed, with its bytes and time counted (the decode's view of the transfers).
    assert m["pdserve_kv_pulls_total"] >= len(prompts)
    assert m["pdserve_kv_pulled_bytes_total"] > 0 and m["pdserve_kv_pull_seconds_total"] > 0
    # Layer-wise: every KV left during its prefill's last pass (the prompts fit one step).
    assert m["pdserve_layer_wise_handoffs_total"] == (m["pdserve_handoffs_total"] if cluster.layer_wise else 0)
    assert wait_until(lambda: instance_stats(cluster.prefills[0])["metrics"]["prefill_slots_in_use"] == 0)


def test_streamed_chat_and_usage(cluster):
    client = cluster.gateway.client()
    full = chat(client, max_tokens=16)
    text, finish, usage, _ = stream_text(chat(client, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True}))
    assert text == full.choices[0].message.content and finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_logit_bias_reaches_the_prefill_and_the_decode(cluster):
    check_logit_bias(cluster.gateway)


def test_json_mode_holds_on_the_prefill_and_the_decode(server, cluster):
    greedy = check_json_mode(cluster.gateway)
    alone = chat(server.client(), JSON_QUESTION, max_tokens=400, response_format={"type": "json_object"})
    assert greedy == alone.choices[0].message.content


def test_killing_the_decode_mid_stream_ends_the_stream_with_an_error_and_a_new_decode_serves():
    c = Cluster("tcp", decodes=2)
    try:
        client = c.gateway.client()
        stream = client.completions.create(model=MODEL_NAME, prompt="Tell me a long story.", max_tokens=2000,
                                           stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        for _ in range(5):
            next(it)
        busy = [d for d in c.decodes if instance_stats(d)["metrics"]["running"] > 0]
        assert len(busy) == 1
        killed_at = time.time()
        busy[0].kill()
        with pytest.raises(openai.APIError) as err:
            for _ in it:
                pass
        assert time.time() - killed_at < 5
        assert "decode instance" in str(err.value)
        # The prefill freed its slot; new requests go to the surviving decode.
        assert wait_until(lambda: instance_stats(c.prefills[0])["metrics"]["prefill_slots_in_use"] == 0)
        for p in PROMPTS[:3]:
            r = complete(client, p, max_tokens=8, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8
        # A decode restarted on the same port rejoins and serves.
        survivor = [d for d in c.decodes if d is not busy[0]][0]
        port = int(busy[0].address.rsplit(":", 1)[1])
        restarted = c.start_instance("decode", port=port)
        c.decodes = [survivor, restarted]
        time.sleep(0.5)  # the gateway checks its instances every 200 ms
        survivor.kill()  # now only the restarted decode can serve
        for p in PROMPTS[:3]:
            r = complete(client, p, max_tokens=8, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8
        assert instance_stats(restarted)["metrics"]["steps_total"] > 0
    finally:
        c.stop()


def test_killing_a_prefill_before_the_first_token_retries_on_another():
    c = Cluster("shm", prefills=2)
    try:
        client = c.gateway.client()
        # Long enough that the prefill is still at it when killed, short enough for a TSan build.
        long_prompt = "Here is a long document. " + "The river flows quietly past the old mill. " * 60
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(complete, client, long_prompt, max_tokens=8)
            # The gateway gives the request to the first prefill (both idle); kill it mid-prefill.
            assert wait_until(lambda: instance_stats(c.prefills[0])["metrics"]["prefill_slots_in_use"] == 1)
            c.prefills[0].kill()
            r = fut.result(timeout=300)
        assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
        assert c.gateway.metrics()["pdserve_gateway_prefill_retries_total"] >= 1
    finally:
        c.stop()


def test_killing_a_layer_wise_prefill_after_its_early_handoff_retries_on_another():
    """The decode is already pulling the layers when the prefill dies: that attempt is given up and
    the request is prefilled again on the other prefill."""
    c = Cluster("shm", prefills=2, layer_wise=True)
    try:
        client = c.gateway.client()
        long_prompt = "Here is a long document. " + "The river flows quietly past the old mill. " * 50
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(complete, client, long_prompt, max_tokens=8)
            # The early handoff reached the decode, whose pull waits on the prefill's layers.
            assert wait_until(lambda: instance_stats(c.decodes[0])["metrics"]["kv_pulls_in_flight"] == 1,
                              timeout=60)
            busy = [p for p in c.prefills if instance_stats(p)["metrics"]["prefill_slots_in_use"] == 1]
            assert len(busy) == 1
            busy[0].kill()
            r = fut.result(timeout=300)
        assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
        assert c.gateway.metrics()["pdserve_gateway_prefill_retries_total"] >= 1
        # The gateway learns the instances' counters from their stats, polled every 200 ms.
        assert wait_until(lambda: c.gateway.metrics()["pdserve_layer_wise_handoffs_total"] >= 1)
        d = instance_stats(c.decodes[0])["metrics"]
        assert d["kv_pulls_in_flight"] == 0 and d["running"] == 0
    finally:
        c.stop()


def test_killing_the_gateway_frees_everything_on_the_instances():
    c = Cluster("shm")
    try:
        client = c.gateway.client()
        stream = client.completions.create(model=MODEL_NAME, prompt="Tell me a long story.", max_tokens=2000,
                                           stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        for _ in range(3):
            next(it)
        assert instance_stats(c.decodes[0])["metrics"]["running"] == 1
        c.gateway.kill()
        def idle():
            p = instance_stats(c.prefills[0])["metrics"]
            d = instance_stats(c.decodes[0])["metrics"]
            return (p["prefill_slots_in_use"] == 0 and p["kv"]["num_blocks_used"] == 0 and d["running"] == 0
                    and d["kv"]["num_blocks_used"] == 0)
        assert wait_until(idle, timeout=5)
    finally:
        for s in c.prefills + c.decodes:
            assert s.stop() == 0, "".join(s.log)
