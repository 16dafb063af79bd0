"""End-to-end tests of `pdserve serve --mode aggregated` with the official `openai` client."""

import concurrent.futures
import json
import math
import shutil
import socket
import subprocess
import time
import uuid

import openai
import pytest

from conftest import API_KEY, MODEL_NAME

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def chat(client, messages=QUESTION, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kw)


def stream_text(stream):
    """(text, finish_reason, usage, chunks) of a streamed chat or completion."""
    text, finish, usage, chunks = "", None, None, []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text += piece or ""
            finish = c.finish_reason or finish
    return text, finish, usage, chunks


# ---- chat and completions ----------------------------------------------------------------------

def test_models(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert server.client().models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_non_streaming(server):
    r = chat(server.client())
    assert r.object == "chat.completion"
    assert r.model == MODEL_NAME
    assert r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant"
    assert "Paris" in c.message.content
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_matches_non_streaming(server):
    client = server.client()
    whole = chat(client)
    stream = chat(client, stream=True, stream_options={"include_usage": True})
    text, finish, usage, chunks = stream_text(stream)
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # The usage chunk comes last, without choices, and matches the non-streamed usage.
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    # Without include_usage there is no usage chunk.
    _, _, usage2, chunks2 = stream_text(chat(client, stream=True))
    assert usage2 is None and chunks2[-1].choices[0].finish_reason is not None


def test_completions_streamed_and_not(server):
    client = server.client()
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.startswith(" Paris")
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    s = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  stream=True, stream_options={"include_usage": True})
    text, finish, usage, _ = stream_text(s)
    assert text == r.choices[0].text and finish == "length"
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.completion_tokens == 12


def test_completions_default_max_tokens_is_16(server):
    r = server.client().completions.create(model=MODEL_NAME, prompt="Once upon a time", temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_completions_echo_prompt_list_and_token_ids(server):
    client = server.client()
    r = client.completions.create(model=MODEL_NAME, prompt=["The capital of France is", "One, two, three,"],
                                  max_tokens=4, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("The capital of France is Paris")
    assert r.choices[1].text.startswith("One, two, three,")
    ids = json.loads(server.request("POST", "/tokenize", json.dumps({"content": "The capital of France is"}))[2])
    t = client.completions.create(model=MODEL_NAME, prompt=ids["tokens"], max_tokens=4, temperature=0)
    assert "The capital of France is" + t.choices[0].text == r.choices[0].text


def test_stop_strings(server):
    client = server.client()
    full = chat(client, max_tokens=32).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    cut = full[:full.index(stop)]
    r = chat(client, max_tokens=32, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    text, finish, _, _ = stream_text(chat(client, max_tokens=32, stop=stop, stream=True))
    assert text == cut and finish == "stop"


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    kw = dict(temperature=0.9, top_p=0.95, max_tokens=24, extra_body={"ignore_eos": True})
    a = chat(client, seed=1234, **kw).choices[0].message.content
    b = chat(client, seed=1234, **kw).choices[0].message.content
    assert a == b
    others = {chat(client, seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should give different samples"
    # Streaming samples the same tokens as non-streaming.
    text, _, _, _ = stream_text(chat(client, seed=1234, stream=True, **kw))
    assert text == a


def test_n_choices_use_seed_plus_i(server):
    client = server.client()
    kw = dict(temperature=0.9, max_tokens=16, extra_body={"ignore_eos": True})
    r = chat(client, n=3, seed=77, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 48
    # Choice i samples with seed + i.
    assert r.choices[1].message.content == chat(client, seed=78, **kw).choices[0].message.content
    stream = chat(client, n=3, seed=77, stream=True, **kw)
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in r.choices]


def test_chat_logprobs(server):
    r = chat(server.client(), logprobs=True, top_logprobs=3, max_tokens=12)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert "".join(t.token for t in lp).startswith(r.choices[0].message.content)
    for t in lp:
        assert t.logprob <= 0 and bytes(t.bytes) == t.token.encode()
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        # Greedy: the chosen token is the most likely one.
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5
    streamed = chat(server.client(), logprobs=True, top_logprobs=3, max_tokens=12, stream=True)
    tokens = [t.token for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert tokens == [t.token for t in lp]


def test_completion_logprobs(server):
    r = server.client().completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=6,
                                           temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == 0
    for i in range(1, 6):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1].encode())
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(lp.tokens[i] in lp.top_logprobs[i] for i in range(6))


def token_id(server, text):
    """The id of `text`, which must tokenize to one token."""
    status, _, body = server.request("POST", "/tokenize",
                                     json.dumps({"content": text, "add_special": False, "parse_special": False}))
    assert status == 200, body
    tokens = json.loads(body)["tokens"]
    assert len(tokens) == 1, (text, tokens)
    return tokens[0]


def check_logit_bias(server):
    """Banning the greedy first token gives the runner-up, its log-probability renormalized without
    the banned one; +100 on a token makes every token that one, the first (a prefill's) included."""
    client = server.client()
    kw = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0].logprobs
    (best, lp_best), (runner_up, lp_runner_up) = sorted(plain.top_logprobs[0].items(), key=lambda kv: -kv[1])
    assert plain.tokens[0] == best
    banned = client.completions.create(**kw, logit_bias={str(token_id(server, best)): -100}).choices[0].logprobs
    assert banned.tokens[0] == runner_up
    assert banned.token_logprobs[0] == pytest.approx(lp_runner_up - math.log1p(-math.exp(lp_best)), abs=1e-3)
    forced = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                       temperature=1.0, seed=3, logit_bias={str(token_id(server, runner_up)): 100},
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].text == runner_up * 5


def test_logit_bias(server):
    check_logit_bias(server)
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, logit_bias={"1000000": 1})
    assert "logit_bias names token id 1000000, outside the vocabulary" in str(e.value)
    assert e.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, logit_bias={"5": 101})
    assert "'logit_bias.5' must be between -100 and 100" in str(e.value)


JSON_QUESTION = [{"role": "user", "content": "Describe a cat as a JSON object with its name, age and color."}]


def check_json_mode(server):
    """JSON mode: the greedy answer and sampled ones are each one JSON object, and its end ends the
    generation; streamed as not. Returns the greedy answer."""
    client = server.client()
    fmt = {"type": "json_object"}
    greedy = chat(client, JSON_QUESTION, max_tokens=400, response_format=fmt).choices[0]
    assert greedy.finish_reason == "stop", greedy.message.content
    assert isinstance(json.loads(greedy.message.content), dict), greedy.message.content
    text, finish, _, _ = stream_text(chat(client, JSON_QUESTION, max_tokens=400, response_format=fmt, stream=True))
    assert (text, finish) == (greedy.message.content, "stop")
    sampled = chat(client, JSON_QUESTION, max_tokens=400, response_format=fmt, temperature=1.0, n=4, seed=11)
    for c in sampled.choices:
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(json.loads(c.message.content), dict), c.message.content
    return greedy.message.content


def test_json_mode(server):
    client = server.client()
    # Without it, this model answers in prose or a fenced block: not JSON.
    plain = chat(client, JSON_QUESTION, max_tokens=400).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(plain)
    check_json_mode(server)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": {}}})
    assert "JSON schemas are not implemented" in str(e.value) and e.value.param == "response_format"


def test_tokenize_detokenize(server):
    status, _, body = server.request("POST", "/tokenize", json.dumps({"content": "Hello world", "add_special": False}))
    assert status == 200
    tokens = json.loads(body)["tokens"]
    assert len(tokens) >= 2
    status, _, body = server.request("POST", "/detokenize", json.dumps({"tokens": tokens}))
    assert status == 200 and json.loads(body)["content"] == "Hello world"


# ---- many clients, preemption, prefix cache, disconnects --------------------------------------

PROMPTS = [f"Write a short list of {k} facts about {topic}." for k, topic in
           zip(range(2, 18), ["cats", "rivers", "Mars", "bread", "chess", "music", "rain", "gold", "owls",
                               "glass", "snow", "tea", "maps", "bees", "ships", "salt"])]


def greedy_stream(client, prompt, max_tokens):
    s = chat(client, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
             extra_body={"ignore_eos": True})
    text, finish, _, _ = stream_text(s)
    return text, finish


def test_64_concurrent_greedy_streams_match_alone(server):
    client = server.client()
    alone = {p: greedy_stream(client, p, 24) for p in PROMPTS}
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda p: greedy_stream(client, p, 24), jobs))
    for p, (text, finish) in zip(jobs, results):
        assert finish == "length"
        assert text == alone[p][0], p
    m = server.wait_idle()
    assert m["pdserve_kv_blocks_used"] == 0
    assert m["pdserve_sequences_running"] == 0


def test_preemption_under_a_tiny_kv_cache(tiny_kv_server):
    client = tiny_kv_server.client()
    prompts = PROMPTS[:8]
    alone = {p: greedy_stream(client, p, 96) for p in prompts}
    before = tiny_kv_server.metrics()["pdserve_preemptions_total"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: greedy_stream(client, p, 96), prompts))
    for p, (text, finish) in zip(prompts, results):
        assert finish == "length"
        assert text == alone[p][0], p
    m = tiny_kv_server.wait_idle()
    assert m["pdserve_preemptions_total"] > before, "the KV budget should have forced preemption"
    assert m["pdserve_kv_blocks_used"] == 0


def test_request_beyond_the_tiny_kv_cache_is_400(tiny_kv_server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(tiny_kv_server.client(), max_tokens=400)
    assert "256 tokens" in str(e.value)


def test_shared_system_prompt_hits_the_prefix_cache(server, nocache_server):
    nonce = uuid.uuid4().hex[:8]
    system = (f"[{nonce}] You are a meticulous travel assistant. " +
              "Always answer with accurate facts about geography, history, culture and food. " * 14)
    n_system = len(json.loads(server.request("POST", "/tokenize", json.dumps({"content": system}))[2])["tokens"])
    assert n_system >= 200
    client = server.client()
    first = chat(client, messages=[{"role": "system", "content": system},
                                   {"role": "user", "content": "Name a famous bridge."}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    before = server.metrics()["pdserve_prefix_cache_hit_tokens_total"]
    second_msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a famous river."}]
    second = chat(client, messages=second_msgs)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 192 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert server.metrics()["pdserve_prefix_cache_hit_tokens_total"] - before >= cached
    # Unchanged output: the same request on a server without prefix caching.
    reference = chat(nocache_server.client(), messages=second_msgs)
    assert reference.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == reference.choices[0].message.content


def test_disconnect_mid_stream_frees_the_sequence(server):
    client = server.client()
    before = server.metrics()
    stream = chat(client, max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 5:
            break
    assert server.metrics()["pdserve_sequences_running"] >= 1
    stream.close()
    m = server.wait_idle(timeout=10)
    assert m["pdserve_sequences_running"] == 0 and m["pdserve_kv_blocks_used"] == 0
    assert m["pdserve_client_disconnects_total"] > before["pdserve_client_disconnects_total"]
    assert (m['pdserve_engine_requests_finished_total{reason="cancelled"}'] >
            before['pdserve_engine_requests_finished_total{reason="cancelled"}'])


def test_disconnect_while_waiting_for_a_non_streamed_answer(server):
    before = server.metrics()
    body = json.dumps({"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 10
        while server.metrics()["pdserve_sequences_running"] == 0 and time.time() < deadline:
            time.sleep(0.02)
    m = server.wait_idle(timeout=10)
    assert m["pdserve_sequences_running"] == 0 and m["pdserve_kv_blocks_used"] == 0
    assert m["pdserve_client_disconnects_total"] > before["pdserve_client_disconnects_total"]


# ---- metrics -------------------------------------------------------------------------------------

def test_metrics_pass_promtool(server):
    chat(server.client(), max_tokens=4)
    status, headers, body = server.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for name in ["pdserve_time_to_first_token_seconds_bucket", "pdserve_time_per_output_token_seconds_bucket",
                 "pdserve_e2e_request_latency_seconds_bucket", "pdserve_sequences_running", "pdserve_sequences_waiting",
                 "pdserve_kv_blocks_used", "pdserve_kv_blocks_free", "pdserve_prefix_cache_hit_ratio",
                 "pdserve_prompt_tokens_total", "pdserve_generation_tokens_total", "pdserve_engine_step_seconds_total",
                 "pdserve_engine_step_duration_seconds_bucket", "pdserve_engine_step_tokens_bucket",
                 'pdserve_http_requests_total{endpoint="/v1/chat/completions",status="200"}']:
        assert name in text, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'): skipped 'promtool check metrics'")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


# ---- errors over real HTTP -----------------------------------------------------------------------

def error_of(status_body):
    status, headers, body = status_body
    return status, headers, json.loads(body)["error"]


def test_malformed_json_is_400_with_position(server):
    status, _, e = error_of(server.request("POST", "/v1/chat/completions", '{"messages": [}',
                                           {"Content-Type": "application/json"}))
    assert status == 400 and "not valid JSON" in e["message"] and "column 15" in e["message"]
    assert e["type"] == "invalid_request_error" and e["code"] == "invalid_json"


def test_wrong_types_and_missing_messages_via_openai(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    assert "'messages' must not be empty" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature="hot")
    assert "'temperature' must be a number, got string" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-17", messages=QUESTION)
    assert "'gpt-17' does not exist" in str(e.value) and e.value.code == "model_not_found"


def test_context_overflow_names_the_numbers(server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server.client(), max_tokens=9000)
    msg = str(e.value)
    assert "max_tokens (9000)" in msg and "8192" in msg
    assert e.value.code == "context_length_exceeded"


def test_unknown_route_and_wrong_method(server):
    status, _, e = error_of(server.get("/v1/embeddings"))
    assert status == 404 and "no route GET /v1/embeddings" in e["message"]
    status, headers, e = error_of(server.get("/v1/chat/completions"))
    assert status == 405 and headers["Allow"] == "POST"


def test_api_key(strict_server):
    assert strict_server.get("/health")[0] == 200
    status, headers, e = error_of(strict_server.get("/v1/models"))
    assert status == 401 and e["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        strict_server.client(api_key="wrong").models.list()
    assert strict_server.client(api_key=API_KEY).models.list().data[0].id == MODEL_NAME
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert strict_server.get("/metrics", headers=auth)[0] == 200
    assert strict_server.get("/metrics")[0] == 401


def test_body_too_large_is_413(strict_server):
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    body = json.dumps({"model": MODEL_NAME, "prompt": "x" * 8000})
    status, _, e = error_of(strict_server.request("POST", "/v1/completions", body, auth))
    assert status == 413 and "4096 bytes" in e["message"]


def test_queue_full_is_429_with_retry_after(strict_server):
    client = strict_server.client(api_key=API_KEY)
    with pytest.raises(openai.RateLimitError) as e:
        chat(client, max_tokens=4)
    assert e.value.response.headers["Retry-After"] == "1"
    assert "already waiting" in str(e.value)
