"""A Hugging Face checkpoint directory as the model: config.json, bf16 safetensors shards and
tokenizer.json, written from the default model by tests/support/make_hf_checkpoint. `model info`
reads it; the CPU refuses it with the fix; on a GPU, `serve --model DIR --device cuda` answers the
openai client with the checkpoint's tokenizer and chat template, tokenizing every prompt exactly as
the GGUF it was written from."""

import os
import subprocess

import pytest

from conftest import BIN, MODEL_NAME, ROOT, Server
from test_device import has_gpu, skip_without_cuda_build
from test_server import PROMPTS

TOOL = os.environ.get("PDSERVE_MAKE_HF_CHECKPOINT",
                      os.path.join(ROOT, "build", "release", "tests", "support", "make_hf_checkpoint"))
GGUF = os.environ.get("PDSERVE_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not os.path.exists(TOOL):
        pytest.skip(f"{TOOL} is not built (set PDSERVE_MAKE_HF_CHECKPOINT)")
    directory = tmp_path_factory.mktemp("ckpt") / "SmolLM2-135M-Instruct"
    r = subprocess.run([TOOL, GGUF, str(directory)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return str(directory)


def pdserve(*args, timeout=60):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)


def test_model_info_reads_the_directory(checkpoint):
    r = pdserve("model", "info", checkpoint)
    assert r.returncode == 0, r.stderr
    assert "Hugging Face" in r.stdout
    assert "layers:          30" in r.stdout
    assert "neox ordering" in r.stdout  # Hugging Face's rotation, unlike the GGUF's
    assert "tokenizer:       gpt2 (pre-tokenizer smollm), 49152 tokens" in r.stdout
    assert "<|im_start|>" in r.stdout  # the chat template from tokenizer_config.json
    # Counted from the shards' tensors, as the GGUF's are from its tensors: the same weights.
    params = [line for line in r.stdout.splitlines() if line.startswith("parameters:")]
    gguf = pdserve("model", "info", GGUF)
    assert params and params == [line for line in gguf.stdout.splitlines() if line.startswith("parameters:")]


def test_the_cpu_refuses_a_checkpoint_with_the_fix(checkpoint):
    r = pdserve("serve", "--port", "0", "--model", checkpoint)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--device cuda" in r.stderr and "convert_hf_to_gguf.py" in r.stderr, r.stderr
    r = pdserve("generate", "--model", checkpoint, "--prompt", "hi")
    assert r.returncode != 0
    assert "--device cuda" in r.stderr, r.stderr


def test_a_directory_without_tokenizer_json_says_so(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(checkpoint):
        if not name.startswith("tokenizer"):
            os.symlink(os.path.join(checkpoint, name), bare / name)
    r = pdserve("model", "info", str(bare))
    assert "has no tokenizer.json" in r.stdout + r.stderr, r.stdout + r.stderr


def test_serve_a_checkpoint_on_the_gpu(checkpoint):
    if not has_gpu():
        pytest.skip("no GPU here: a checkpoint's weights run on a GPU only (the refusal is tested above)")
    skip_without_cuda_build()
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:10]]
    prompts.append([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])

    def run_all(server):
        return [server.client().chat.completions.create(model=MODEL_NAME, messages=m, max_tokens=24, temperature=0)
                for m in prompts]

    s = Server("--device", "cuda", "--kv-cache-memory", "1GiB", "--no-prefix-caching")
    try:
        from_gguf = run_all(s)
    finally:
        s.stop()
    s = Server("--model", checkpoint, "--device", "cuda", "--kv-cache-memory", "1GiB", "--no-prefix-caching")
    try:
        assert any("on cuda:0" in line for line in s.log), "".join(s.log)
        from_checkpoint = run_all(s)
    finally:
        s.stop()
    same_text = 0
    for m, a, b in zip(prompts, from_gguf, from_checkpoint):
        # tokenizer.json and the template give the GGUF's prompt tokens, one for one.
        assert b.usage.prompt_tokens == a.usage.prompt_tokens, m
        same_text += b.choices[0].message.content == a.choices[0].message.content
    assert "Paris" in from_checkpoint[-1].choices[0].message.content
    # The same bf16 weights; only the order of q·k's head dimensions differs (logits within 0.15),
    # so greedy answers part only at near ties.
    print(f"greedy answers equal to the GGUF's: {same_text} of {len(prompts)}")
    assert same_text >= len(prompts) // 2
