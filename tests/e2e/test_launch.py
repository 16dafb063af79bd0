"""End-to-end tests of `pdserve launch cluster.toml` and `pdserve gateway --config`: two scenarios,
each with its own prefill and decode process, a gateway labelling requests by header, metadata,
model name and system prompt; a crashed instance restarted; Ctrl-C stopping every process."""

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import BIN, MODEL_NAME, Server, parse_metrics


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_config(path, gateway_port, ports, extra=""):
    chat_p, chat_d, code_p, code_d = ports
    path.write_text(f"""
transport = "shm"
{extra}
[gateway]
port = {gateway_port}
served_model_name = "{MODEL_NAME}"
default_scenario = "chat"

[instance_defaults]
threads = 1
kv_cache_memory = "64MiB"
prefill_slots = 2

[[scenario]]
name = "chat"
models = ["chat-model"]
ttft_budget_ms = 30000

[[scenario]]
name = "code"
models = ["code-model"]
system_prompt_prefixes = ["You are a coding assistant"]

[[instance]]
name = "chat-p"
scenario = "chat"
role = "prefill"
port = {chat_p}

[[instance]]
scenario = "chat"
role = "decode"
port = {chat_d}

[[instance]]
scenario = "code"
role = "prefill"
port = {code_p}

[[instance]]
scenario = "code"
role = "decode"
port = {code_d}
""")
    return str(path)


class Launch:
    """One `pdserve launch` process; ready when its gateway answers /health."""

    def __init__(self, config, *args, wait_ready=True):
        if not os.path.exists(BIN):
            pytest.skip(f"{BIN} is not built (set PDSERVE_BIN)")
        env = dict(os.environ)
        env.pop("PDSERVE_API_KEY", None)
        self.proc = subprocess.Popen([BIN, "launch", config, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.log = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        port = int(re.search(r"port = (\d+)", open(config).read()).group(1))
        self.base = f"http://127.0.0.1:{port}"
        if wait_ready:
            deadline = time.time() + 90
            while not self.healthy():
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("the cluster did not become ready:\n" + "".join(self.log))
                time.sleep(0.1)

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def healthy(self):
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def pids(self):
        """{process name: pid} of the processes launch started, latest start of each."""
        out = {}
        for line in list(self.log):
            m = re.match(r"launch: (?:re)?started (\S+) \(pid (\d+)\)", line)
            if m:
                out[m.group(1)] = int(m.group(2))
        return out

    def client(self):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self):
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def wait(self, timeout):
        """Waits for launch to exit and for its whole output; returns the exit status."""
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def scenario_requests(m):
    return {s: m[f'pdserve_gateway_scenario_requests_total{{scenario="{s}"}}'] for s in ("chat", "code")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    gateway_port, *ports = free_ports(5)
    config = write_config(tmp_path_factory.mktemp("launch") / "cluster.toml", gateway_port, ports)
    c = Launch(config, "--restart-min-uptime", "1")
    c.ports = ports
    yield c
    pids = c.pids()
    assert c.stop() == 0, "".join(c.log)
    assert len(pids) == 5
    assert not [name for name, pid in pids.items() if alive(pid)], "".join(c.log)
    assert "launch: stopped\n" in c.log
    # Every process stopped cleanly (a sanitizer report would make its exit status non-zero).
    for name in pids:
        assert f"launch: {name} exited with status 0\n" in c.log, "".join(c.log)


def test_requests_are_labelled_and_reach_their_scenario(cluster):
    client = cluster.client()
    before = scenario_requests(cluster.metrics())
    ask = dict(prompt="def add(a, b):", max_tokens=6, temperature=0)
    texts = [
        client.completions.create(model=MODEL_NAME, **ask, extra_headers={"X-PDServe-Scenario": "code"}),
        client.completions.create(model=MODEL_NAME, **ask, extra_body={"metadata": {"scenario": "code"}}),
        client.completions.create(model="code-model", **ask),
        client.completions.create(model=MODEL_NAME, **ask),  # unlabelled: the default, chat
        client.completions.create(model="chat-model", **ask),
    ]
    r = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "You are a coding assistant. Answer in Python."},
                  {"role": "user", "content": "Add two numbers."}])
    assert r.usage.completion_tokens == 6
    # Both groups run the same model: greedy text is the same whichever served it.
    assert len({t.choices[0].text for t in texts}) == 1
    assert texts[2].model == "code-model"
    after = scenario_requests(cluster.metrics())
    assert after["code"] - before["code"] == 4
    assert after["chat"] - before["chat"] == 2
    models = {m.id for m in client.models.list()}
    assert models == {MODEL_NAME, "chat-model", "code-model"}


def test_an_unknown_scenario_in_the_header_is_a_400_naming_the_known_ones(cluster):
    client = cluster.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2,
                                  extra_headers={"X-PDServe-Scenario": "nope"})
    assert "'nope'" in str(err.value) and "chat, code" in str(err.value)
    # In metadata (the client's own field too) an unknown name is ignored: the default serves it.
    before = scenario_requests(cluster.metrics())
    r = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2,
                                  extra_body={"metadata": {"scenario": "nope"}})
    assert r.usage.completion_tokens == 2
    assert scenario_requests(cluster.metrics())["chat"] - before["chat"] == 1


def test_instances_refuse_internal_calls_without_the_clusters_token(cluster):
    # launch made a token and gave it to every process; a caller without it gets 401.
    for port in cluster.ports:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/internal/v1/stats")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
        assert "internal token" in err.value.read().decode()


def test_a_crashed_instance_is_restarted_and_serves_again(cluster):
    client = cluster.client()
    time.sleep(1.2)  # past --restart-min-uptime
    old = cluster.pids()["chat-p"]
    os.kill(old, signal.SIGKILL)
    deadline = time.time() + 60
    while cluster.pids()["chat-p"] == old and time.time() < deadline:
        time.sleep(0.1)
    assert cluster.pids()["chat-p"] != old, "".join(cluster.log)
    # The gateway sees it back (its stats poll) and the scenario serves again.
    deadline = time.time() + 60
    while True:
        try:
            r = client.completions.create(model="chat-model", prompt="Hello", max_tokens=4, temperature=0)
            break
        except openai.APIError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    assert r.usage.completion_tokens == 4
    assert any("restarting it in 1 s (restart 1)" in line for line in cluster.log)


def test_gateway_config_alone_over_instances_started_by_hand(tmp_path):
    gateway_port, *ports = free_ports(5)
    config = write_config(tmp_path / "cluster.toml", gateway_port, ports)
    common = ["--threads", "1", "--transport", "shm", "--kv-cache-memory", "64MiB", "--internal-token", "s3cret"]
    instances = [Server("--role", role, "--port", str(port), *common, command="instance")
                 for role, port in zip(["prefill", "decode", "prefill", "decode"], ports)]
    try:
        with pytest.raises(RuntimeError) as err:
            Server("--config", config, "--internal-token", "wrong", command="gateway")
        assert "refused the gateway's internal token" in str(err.value)
        gw = Server("--config", config, "--internal-token", "s3cret", command="gateway")
        try:
            client = gw.client()
            r = client.completions.create(model="code-model", prompt="Hello", max_tokens=4, temperature=0)
            assert r.usage.completion_tokens == 4
            assert scenario_requests(gw.metrics())["code"] == 1
        finally:
            assert gw.stop() == 0, "".join(gw.log)
    finally:
        for i in instances:
            i.stop()


def test_a_process_that_fails_at_start_stops_the_cluster_with_an_error(tmp_path):
    gateway_port, *ports = free_ports(5)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", ports[1]))
    blocker.listen()
    try:
        config = write_config(tmp_path / "cluster.toml", gateway_port, ports)
        c = Launch(config, wait_ready=False)
        assert c.wait(120) == 1
        log = "".join(c.log)
        assert "chat-decode-0 exited with status 1" in log and "stopping the cluster" in log, log
        assert not [pid for pid in c.pids().values() if alive(pid)], log
    finally:
        blocker.close()


def test_launch_rejects_a_bad_config_with_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[gateway]\nport = 8000\nadmision = "baseline"\n')
    r = subprocess.run([BIN, "launch", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "bad.toml:3:" in r.stderr and "gateway.admision: unknown key" in r.stderr, r.stderr


def test_a_bad_setting_stops_the_cluster_instead_of_restarting_it(tmp_path):
    # Exit status 2 (a bad setting) is never restarted, even past --restart-min-uptime.
    gateway_port, *ports = free_ports(5)
    path = tmp_path / "cluster.toml"
    write_config(path, gateway_port, ports)
    path.write_text(path.read_text().replace('kv_cache_memory = "64MiB"', 'kv_cache_memory = "lots"'))
    c = Launch(str(path), "--restart-min-uptime", "0", wait_ready=False)
    assert c.wait(120) == 1
    log = "".join(c.log)
    assert "--kv-cache-memory" in log and "exited with status 2" in log and "stopping the cluster" in log, log
    assert "restarting" not in log, log
    assert not [pid for pid in c.pids().values() if alive(pid)], log
