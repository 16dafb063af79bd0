"""End-to-end tests of `pdserve serve --mode disaggregated` (a prefill and a decode instance in one
process, in-process KV transfer, the gateway's router) with the official `openai` client, compared
with `--mode aggregated` on the same requests."""

import concurrent.futures
import shutil
import subprocess

import openai
import pytest

from conftest import MODEL_NAME, Server
from test_server import PROMPTS, chat, greedy_stream, stream_text


@pytest.fixture(scope="module")
def pd_server():
    s = Server("--mode", "disaggregated", "--threads", "2")
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def pd_tight_server():
    # One prefill slot and a 1 ms budget at the gateway: a burst must overflow it.
    s = Server("--mode", "disaggregated", "--threads", "2", "--prefill-slots", "1", "--ttft-budget-ms", "1")
    yield s
    assert s.stop() == 0, "".join(s.log)


def complete(client, prompt, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL_NAME, prompt=prompt, **kw)


def test_greedy_output_equals_aggregated_mode(server, pd_server):
    prompts = PROMPTS + ["The capital of France is", "def fibonacci(n):", "Once upon a time",
                         "1, 1, 2, 3, 5, 8,"]
    assert len(prompts) >= 20
    results = {}
    for name, s in (("aggregated", server), ("disaggregated", pd_server)):
        client = s.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            # ignore_eos: every answer runs its 24 tokens, so every request reaches the decode.
            results[name] = list(pool.map(lambda p: complete(client, p, extra_body={"ignore_eos": True}), prompts))
    for p, a, d in zip(prompts, results["aggregated"], results["disaggregated"]):
        assert d.choices[0].text == a.choices[0].text, p
        assert d.choices[0].finish_reason == a.choices[0].finish_reason, p
        assert d.usage.prompt_tokens == a.usage.prompt_tokens, p
        assert d.usage.completion_tokens == a.usage.completion_tokens, p
    m = pd_server.wait_idle()
    assert m["pdserve_handoffs_total"] >= len(prompts)
    assert m["pdserve_kv_pulls_failed_total"] == 0
    # Every pull landed, with its bytes and time counted (the decode's view of the transfers).
    assert m["pdserve_kv_pulls_total"] >= len(prompts)
    assert m["pdserve_kv_pulled_bytes_total"] > 0 and m["pdserve_kv_pull_seconds_total"] > 0


def test_streamed_chat_equals_aggregated_and_non_streamed(server, pd_server):
    for p in PROMPTS[:4]:
        want, want_finish = greedy_stream(server.client(), p, 24)
        got, got_finish = greedy_stream(pd_server.client(), p, 24)
        assert got == want and got_finish == want_finish, p
    client = pd_server.client()
    full = chat(client, max_tokens=16)
    text, finish, usage, _ = stream_text(chat(client, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True}))
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_seeded_sampling_equals_aggregated_mode(server, pd_server):
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    a = chat(server.client(), **kw).choices[0].message.content
    d = chat(pd_server.client(), **kw).choices[0].message.content
    assert a == d


def test_max_tokens_one_and_stop_in_the_prefill(pd_server):
    client = pd_server.client()
    r = complete(client, "The capital of France is", max_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"
    m = pd_server.wait_idle()
    assert m["pdserve_prefill_slots_in_use"] == 0


def test_disconnect_mid_stream_frees_everything(pd_server):
    client = pd_server.client()
    before = pd_server.metrics()
    stream = chat(client, max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    m = pd_server.wait_idle(timeout=10)
    assert m["pdserve_sequences_running"] == 0 and m["pdserve_kv_blocks_used"] == 0
    assert m["pdserve_prefill_slots_in_use"] == 0 and m["pdserve_handoffs_outstanding"] == 0
    assert (m['pdserve_engine_requests_finished_total{reason="cancelled"}'] >
            before['pdserve_engine_requests_finished_total{reason="cancelled"}'])


def test_requests_beyond_the_ttft_budget_get_504_naming_the_scenario(pd_tight_server):
    client = pd_tight_server.client()

    def one(i):
        try:
            r = complete(client, f"Write a long story number {i} about a lighthouse keeper.", max_tokens=8)
            return ("ok", r.usage.completion_tokens)
        except openai.APIStatusError as e:
            return (e.status_code, str(e))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    ok = [r for r in results if r[0] == "ok"]
    timed_out = [r for r in results if r[0] == 504]
    assert ok and timed_out, results
    assert len(ok) + len(timed_out) == len(results), results
    assert all("scenario 'default'" in msg and "waited" in msg for _, msg in timed_out)
    m = pd_tight_server.wait_idle()
    assert m["pdserve_gateway_timeouts_total"] == len(timed_out)
    assert m["pdserve_prefill_slots_in_use"] == 0


def test_metrics_pass_promtool(pd_server):
    chat(pd_server.client(), max_tokens=4)
    status, _, body = pd_server.get("/metrics")
    assert status == 200
    for name in ["pdserve_prefill_slots_in_use", "pdserve_handoffs_total", "pdserve_gateway_waiting",
                 "pdserve_kv_pulls_failed_total", "pdserve_gateway_timeouts_total"]:
        assert name in body.decode(), name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_a_small_kv_budget_is_split_within_it():
    # 8 MiB holds 22 blocks of 16 tokens of this model: the prefill and the decode share them, and
    # the longest sequence is what each side can hold (as in aggregated mode), refused up front.
    s = Server("--mode", "disaggregated", "--threads", "1", "--kv-cache-memory", "8MiB")
    try:
        assert 2 <= s.metrics()["pdserve_kv_blocks_capacity"] <= 22
        client = s.client()
        r = complete(client, "Hello", max_tokens=4)
        assert r.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError):
            complete(client, "word " * 400, max_tokens=4)
        assert s.wait_idle()["pdserve_kv_blocks_used"] == 0
    finally:
        assert s.stop() == 0, "".join(s.log)
