"""Integration tests of `pdserve bench` against pdserve_instant_server (and a tiny run against
the real `pdserve serve`). Binaries come in via PDSERVE_BIN and PDSERVE_INSTANT_SERVER."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PDSERVE_BIN", os.path.join(ROOT, "build", "release", "src", "bin", "pdserve"))
INSTANT = os.environ.get(
    "PDSERVE_INSTANT_SERVER", os.path.join(ROOT, "build", "release", "tests", "integration", "pdserve_instant_server"))


class Instant:
    def __init__(self, *args):
        if not os.path.exists(INSTANT):
            pytest.skip(f"{INSTANT} is not built")
        self.proc = subprocess.Popen([INSTANT, "--port", "0", *args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on [0-9.]+:(\d+)", line)
        assert m, line
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def instant():
    servers = []

    def start(*args):
        s = Instant(*args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def bench(tmp_path, url, *args, check=True, timeout=120):
    if not os.path.exists(BIN):
        pytest.skip(f"{BIN} is not built")
    out = tmp_path / "bench.json"
    r = subprocess.run([BIN, "bench", "--base-url", url, "--json", str(out), "-q", *args], capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text()) if out.exists() else None
    return r, report


def check_records(run, expected_output=None):
    for q in run["requests"]:
        assert "error" not in q, q
        assert q["usage_reported"]
        assert q["output_tokens"] == q["num_chunks"]  # usage agrees with the streamed tokens
        if expected_output is not None:
            assert q["output_tokens"] == expected_output
        assert q["output_tokens"] == q["planned_output_tokens"]
        assert q["prompt_tokens"] == q["planned_input_tokens"]  # exact prompt lengths via /tokenize
        assert 0 <= q["ttft_ms"] <= q["e2e_ms"]
        assert q["send_s"] <= q["first_token_s"] <= q["end_s"]
        assert len(q["chunk_s"]) == q["num_chunks"]


def test_completions_open_loop(tmp_path, instant):
    s = instant()
    r, rep = bench(tmp_path, s.url, "-n", "300", "--rate", "400", "--input-len", "uniform:5:60", "--output-len",
                   "20", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100")
    run = rep["runs"][0]
    summ = run["summary"]
    assert summ["num_ok"] == 300 and summ["num_errors"] == 0
    assert summ["output_tokens"] == 300 * 20
    assert summ["slo_attainment"] == 1.0
    assert summ["ttft_ms"]["p50"] <= summ["e2e_ms"]["p50"]
    check_records(run, 20)
    assert {q["planned_input_tokens"] for q in run["requests"]} <= set(range(5, 61))
    assert rep["model"] == "instant"
    # /metrics deltas of the counters the server exposes
    assert run["server_metric_deltas"]["instant_requests_total"] == 300
    assert run["server_metric_deltas"]["instant_generated_tokens_total"] == 6000
    assert "TTFT" in r.stdout and "300 ok, 0 failed" in r.stdout


def test_chat_closed_loop_scenarios(tmp_path, instant):
    s = instant("--threads", "2")
    scenarios = json.dumps([
        {"name": "chat", "input": "normal:40:5", "output": "uniform:3:9", "system_tokens": 20, "weight": 3},
        {"name": "code", "input": 30, "output": 4, "system_prompt": "You write code."},
    ])
    _, rep = bench(tmp_path, s.url, "--api", "chat", "--arrival", "closed", "--users", "16", "-n", "400",
                   "--scenarios", scenarios, "--client-threads", "2")
    run = rep["runs"][0]
    assert run["summary"]["num_ok"] == 400
    for q in run["requests"]:
        assert "error" not in q
        assert q["output_tokens"] == q["num_chunks"] == q["planned_output_tokens"]
        assert q["ttft_ms"] <= q["e2e_ms"]
    assert set(run["per_scenario"]) == {"chat", "code"}
    n_chat = run["per_scenario"]["chat"]["num_requests"]
    assert 240 <= n_chat <= 360  # weight 3 : 1
    assert rep["scenarios"] == ["chat", "code"]


def test_latencies_match_server_delays(tmp_path, instant):
    s = instant("--ttft-ms", "50", "--itl-ms", "10")
    _, rep = bench(tmp_path, s.url, "-n", "20", "--rate", "20", "--input-len", "10", "--output-len", "11")
    summ = rep["runs"][0]["summary"]
    assert 50 <= summ["ttft_ms"]["p50"] <= 65, summ["ttft_ms"]
    assert 10 <= summ["tpot_ms"]["p50"] <= 13, summ["tpot_ms"]
    assert 10 <= summ["itl_ms"]["p50"] <= 13, summ["itl_ms"]
    assert 150 <= summ["e2e_ms"]["p50"] <= 180, summ["e2e_ms"]


def test_errors_by_type_and_exit_code(tmp_path, instant):
    s = instant("--fail-every", "4")
    r, rep = bench(tmp_path, s.url, "-n", "40", "--rate", "200", "--input-len", "8", "--output-len", "3", check=False)
    assert r.returncode == 1
    summ = rep["runs"][0]["summary"]
    assert summ["errors_by_type"] == {"http_500": 10}
    assert summ["num_ok"] == 30
    failed = [q for q in rep["runs"][0]["requests"] if "error" in q]
    assert all(q["error_message"] == "injected failure" and q["http_status"] == 500 for q in failed)


def test_api_key(tmp_path, instant):
    s = instant("--api-key", "k1")
    r, rep = bench(tmp_path, s.url, "-n", "5", "--model", "instant", "--no-server-tokenize", "--input-len", "8",
                   "--output-len", "2", check=False)
    assert r.returncode == 1 and rep["runs"][0]["summary"]["errors_by_type"] == {"http_401": 5}
    _, rep = bench(tmp_path, s.url, "-n", "5", "--api-key", "k1", "--input-len", "8", "--output-len", "2")
    assert rep["runs"][0]["summary"]["num_ok"] == 5


def test_trace_replay_mooncake(tmp_path, instant):
    s = instant()
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": i * 100, "input_length": 600 + i, "output_length": 10 + i, "hash_ids": [0, 1 + i]}
            for i in range(20)]
    trace.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    _, rep = bench(tmp_path, s.url, "--trace", str(trace), "--trace-speedup", "10", "--trace-input-scale", "0.1",
                   "--trace-output-scale", "0.5", "-n", "0")
    run = rep["runs"][0]
    assert len(run["requests"]) == 20
    for i, q in enumerate(run["requests"]):
        assert q["planned_input_tokens"] == int((600 + i) * 0.1 + 0.5)  # rounded half up
        assert q["planned_output_tokens"] == int((10 + i) * 0.5 + 0.5)
        assert abs(q["scheduled_s"] - i * 0.01) < 1e-9
    check_records(run)


def test_sweep(tmp_path, instant):
    s = instant("--ttft-ms", "5")
    r, rep = bench(tmp_path, s.url, "-n", "30", "--input-len", "5", "--output-len", "2", "--sweep-rates",
                   "50,100", "--slo-ttft-ms", "500")
    assert [run["rate_rps"] for run in rep["runs"]] == [50, 100]
    assert "highest rate with SLO attainment >= 90 %: 100 req/s" in r.stdout


def test_sweep_search_control(tmp_path, instant):
    s = instant("--ttft-ms", "5")
    common = ["-n", "20", "--input-len", "5", "--output-len", "2", "--sweep-search", "50,200"]
    r, rep = bench(tmp_path, s.url, *common, "--slo-ttft-ms", "1")  # even the low rate misses
    assert [run["rate_rps"] for run in rep["runs"]] == [50]
    assert "no rate reached SLO attainment" in r.stdout
    r, rep = bench(tmp_path, s.url, *common, "--slo-ttft-ms", "1000")  # the high rate meets it
    assert [run["rate_rps"] for run in rep["runs"]] == [50, 200]
    assert "highest rate with SLO attainment >= 90 %: 200 req/s" in r.stdout
    r, _ = bench(tmp_path, s.url, *common, check=False)
    assert r.returncode == 2 and "needs --slo-ttft-ms" in r.stderr


def test_ab_comparison(tmp_path, instant):
    a = instant("--ttft-ms", "5")
    b = instant("--ttft-ms", "25")
    r, rep = bench(tmp_path, a.url, "--ab-base-url", b.url, "--ab-rounds", "2", "-n", "10", "--rate", "100",
                   "--input-len", "5", "--output-len", "3")
    assert [run["label"] for run in rep["runs"]] == ["A round 1", "B round 1", "B round 2", "A round 2"]
    ttft = {run["label"]: run["summary"]["ttft_ms"]["p50"] for run in rep["runs"]}
    assert ttft["B round 1"] > ttft["A round 1"] + 15
    m = re.search(r"TTFT p50 ms\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", r.stdout)
    assert m and 3 < float(m.group(3)) < 6, r.stdout


def test_ctrl_c_prints_the_partial_report(tmp_path, instant):
    s = instant("--itl-ms", "20")
    out = tmp_path / "partial.json"
    p = subprocess.Popen([BIN, "bench", "--base-url", s.url, "-n", "1000", "--rate", "10", "--input-len", "5",
                          "--output-len", "500", "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(2.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 130, stderr
    assert "interrupted: partial results" in stdout
    summ = json.loads(out.read_text())["runs"][0]["summary"]
    assert summ["num_cancelled"] >= 15  # the ones streaming when Ctrl-C came
    assert summ["num_not_sent"] >= 900
    assert summ["num_errors"] == 0


@pytest.mark.parametrize("args,message", [
    (["--input-len", "uniform:9"], "length 'uniform:9'"),
    (["--trace", "BAD"], "t.jsonl:2: missing field 'output_length'"),
    (["--scenarios", '[{"name": "a", "rate": 0}]'], "field 'rate': expected a number > 0"),
    (["https://x"], "https is not supported"),
])
def test_bad_flags_give_clear_errors(tmp_path, instant, args, message):
    s = instant()
    url = s.url
    if args[:2] == ["--trace", "BAD"]:
        bad = tmp_path / "t.jsonl"
        bad.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1, "input_length": 1}\n')
        args = ["--trace", str(bad)]
    if args[0].startswith("https"):
        url, args = args[0], []
    r, _ = bench(tmp_path, url, *args, check=False)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_unreachable_server(tmp_path):
    r, _ = bench(tmp_path, "http://127.0.0.1:1", "-n", "1", check=False)
    assert r.returncode == 2 and "cannot reach the server" in r.stderr


# ---- a tiny run against the real server

def test_real_server_tiny_run(tmp_path):
    model = os.environ.get("PDSERVE_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not os.path.exists(BIN) or not os.path.exists(model):
        pytest.skip("needs the pdserve binary and the default model")
    help_text = subprocess.run([BIN, "serve", "--help"], capture_output=True, text=True)
    if help_text.returncode != 0:
        pytest.skip("this pdserve has no serve command")
    p = subprocess.Popen([BIN, "serve", "--mode", "aggregated", "--port", "0", "-m", model, "-t", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = p.stdout.readline()
            m = re.search(r"listening on http://[0-9.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "pdserve serve did not print its port"
        url = f"http://127.0.0.1:{port}"
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except Exception:
                time.sleep(0.1)
        for api in ["completions", "chat"]:
            _, rep = bench(tmp_path, url, "--api", api, "-n", "4", "--rate", "4", "--input-len", "uniform:20:40",
                           "--output-len", "8", timeout=300)
            run = rep["runs"][0]
            assert run["summary"]["num_ok"] == 4
            for q in run["requests"]:
                assert "error" not in q, q
                assert q["output_tokens"] == 8  # ignore_eos honoured
                assert q["usage_reported"] and q["num_chunks"] <= q["output_tokens"]
                assert 0 <= q["ttft_ms"] <= q["e2e_ms"]
                if api == "completions":
                    assert q["prompt_tokens"] == q["planned_input_tokens"]  # exact length via /tokenize
            assert run["server_metric_deltas"], "no /metrics deltas"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
