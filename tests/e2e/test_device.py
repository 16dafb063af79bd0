"""`--device`: the backend chosen at start-up. Where a GPU is, `serve --device cuda` answers the
openai client; elsewhere it refuses with the reason (and every bad combination is a bad setting)."""

import shutil
import subprocess

import pytest

from conftest import BIN, MODEL_NAME, Server


def has_gpu():
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


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
        (["instance", "--port", "0", "--role", "prefill", "--device", "cuda"], "--role mixed"),
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
    probe = run("serve", "--port", "0", "--device", "cuda:999")
    if "built without the CUDA backend" in probe.stderr:
        pytest.skip("this pdserve was built without the CUDA backend")
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
    finally:
        s.stop()
