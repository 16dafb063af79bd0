"""`--device`: the backend chosen at start-up. Where a GPU is, `serve --device cuda` answers the
openai client, and a prefill and a decode instance on GPUs (KV over cuda-ipc) give the same greedy
output as one aggregated instance; elsewhere it refuses with the reason (and every bad combination
is a bad setting)."""

import shutil
import subprocess
import time

import pytest

from conftest import BIN, MODEL_NAME, Server
from test_launch import Launch, free_ports
from test_server import PROMPTS, check_json_mode, check_logit_bias


def gpu_count():
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    r = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return r.stdout.count("GPU ") if r.returncode == 0 else 0


def has_gpu():
    return gpu_count() > 0


def skip_without_cuda_build():
    probe = run("serve", "--port", "0", "--device", "cuda:999")
    if "built without the CUDA backend" in probe.stderr:
        pytest.skip("this pdserve was built without the CUDA backend")


def run(*args, timeout=60):
    if not BIN or not shutil.os.path.exists(BIN):
        pytest.skip(f"{BIN} is not built (set PDSERVE_BIN)")
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, says",
    [
        (["serve", "--port", "0", "--device", "gpu"], "give cpu, cuda (GPU 0) or cuda:N"),
        (["serve", "--port", "0", "--device", "cuda:x"], "give cpu, cuda (GPU 0) or cuda:N"),
        (["serve", "--port", "0", "--device", "cuda", "--mode", "disaggregated"], "--mode aggregated"),
        (["serve", "--port", "0", "--dtype", "fp16"], "--dtype fp16 is for --device cuda"),
        (["instance", "--port", "0", "--role", "decode", "--transport", "cuda-ipc"], "give --transport shm, tcp or ucx"),
    ],
)
def test_bad_device_settings_are_refused_with_the_fix(args, says):
    r = run(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr, r.stderr


def test_cuda_without_a_gpu_says_why():
    if has_gpu():
        pytest.skip("this machine has a GPU (the serving test below covers it)")
    r = run("serve", "--port", "0", "--device", "cuda")
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("no GPU here" in r.stderr and "--device cpu" in r.stderr) or "built without the CUDA backend" in r.stderr, \
        r.stderr


def test_serve_on_the_gpu_answers_the_openai_client():
    if not has_gpu():
        pytest.skip("no GPU here: `serve --device cuda` is covered by the refusal test above")
    skip_without_cuda_build()
    s = Server("--device", "cuda", "--kv-cache-memory", "1GiB")
    try:
        assert any("on cuda:0" in line for line in s.log), "".join(s.log)
        r = s.client().chat.completions.create(
            model=MODEL_NAME, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        assert "Paris" in r.choices[0].message.content
        stream = s.client().completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=12,
                                               temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in stream if c.choices)
        assert "5" in text, text
        # Rows with biases or in JSON mode are drawn on the host.
        check_logit_bias(s)
        check_json_mode(s)
    finally:
        s.stop()


def test_prefill_and_decode_on_gpus_equal_aggregated(tmp_path):
    """`pdserve launch` with a prefill on GPU 0 and a decode on GPU 1 (GPU 0 again where there is
    one): the KV moves GPU to GPU over cuda-ipc, and greedy output equals one aggregated GPU
    instance's. Requests go one at a time and prefix caching is off, so both run the same kernels
    on the same batch shapes (the GPU backend is not batch-invariant)."""
    if not has_gpu():
        pytest.skip("no GPU here")
    skip_without_cuda_build()
    decode_device = "cuda:1" if gpu_count() > 1 else "cuda:0"
    prompts = PROMPTS + ["The capital of France is", "def fibonacci(n):", "Once upon a time",
                         "1, 1, 2, 3, 5, 8,"]
    assert len(prompts) >= 20

    def run_all(client):
        return [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=32, temperature=0,
                                          extra_body={"ignore_eos": True}) for p in prompts]

    s = Server("--device", "cuda:0", "--kv-cache-memory", "1GiB", "--no-prefix-caching", "--max-context", "2048")
    try:
        aggregated = run_all(s.client())
    finally:
        s.stop()

    gateway_port, p_port, d_port = free_ports(3)
    config = tmp_path / "gpus.toml"
    config.write_text(f"""
transport = "cuda-ipc"
[gateway]
port = {gateway_port}
served_model_name = "{MODEL_NAME}"
[instance_defaults]
kv_cache_memory = "1GiB"
max_context = 2048
no_prefix_caching = true
[[instance]]
role = "prefill"
port = {p_port}
device = "cuda:0"
[[instance]]
role = "decode"
port = {d_port}
device = "{decode_device}"
""")
    c = Launch(str(config))
    try:
        assert any("on cuda:0" in line for line in c.log) and any(f"on {decode_device}" in line for line in c.log), \
            "".join(c.log)
        disaggregated = run_all(c.client())
        for p, a, d in zip(prompts, aggregated, disaggregated):
            assert d.choices[0].text == a.choices[0].text, p
            assert d.usage.completion_tokens == a.usage.completion_tokens, p
        deadline = time.time() + 10  # the gateway's view of the instances' counters lags a little
        while (m := c.metrics())["pdserve_handoffs_total"] < len(prompts) and time.time() < deadline:
            time.sleep(0.1)
        assert m["pdserve_handoffs_total"] >= len(prompts)
        assert m["pdserve_kv_pulls_failed_total"] == 0
    finally:
        assert c.stop() == 0, "".join(c.log)
