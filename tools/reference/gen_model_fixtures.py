#!/usr/bin/env python3
"""Writes the model golden fixtures from llama.cpp (the reference implementation).

    source tools/reference/env.sh && python tools/reference/gen_model_fixtures.py [MODEL.gguf]

Output: tests/golden/data/model_smollm2.json with, for each prompt, the reference token ids, the
greedy continuation (64 tokens, stopping at an end-of-generation token) with the top-1/top-2
logit gap at each generated position, and for a few prompts the top-10 logits at every prompt
position. pdserve's golden test feeds the same token ids, so tokenization is not under test here.
CI never runs this script; the fixtures it writes are committed.
"""
import json
import pathlib
import sys

import jinja2
import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = ROOT / "tests/golden/data/model_smollm2.json"
NUM_GREEDY = 64
TOP_K = 10

RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\n",
    "The quick brown fox",
    "In 1969, Neil Armstrong",
    "List of prime numbers: 2, 3, 5, 7,",
    "The most important thing about machine learning is",
    "Photosynthesis is the process by which",
    "SELECT name, age FROM users WHERE",
]
CHAT_PROMPTS = [
    "What is the capital of Japan?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in one paragraph.",
    "How many legs does a spider have?",
    "Give me three tips for better sleep.",
    "Translate 'good morning' into Spanish and French.",
    "What is 12 times 7?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Name a famous painting by Leonardo da Vinci.",
]
LOGIT_PROMPTS = [0, 2, 12]  # indexes into the combined prompt list: top-10 logits everywhere


def chat_text(template: str, user: str) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True
    )


def main() -> None:
    llm = llama_cpp.Llama(
        model_path=MODEL, n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0
    )
    template = llm.metadata.get("tokenizer.chat_template")
    prompts = [{"kind": "raw", "text": p} for p in RAW_PROMPTS]
    prompts += [{"kind": "chat", "text": chat_text(template, u), "user": u} for u in CHAT_PROMPTS]
    eog = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)}
    cases = []
    for idx, p in enumerate(prompts):
        ids = llm.tokenize(p["text"].encode(), add_bos=True, special=p["kind"] == "chat")
        llm.reset()
        llm.eval(ids)
        case = {"kind": p["kind"], "text": p["text"], "tokens": ids}
        if idx in LOGIT_PROMPTS:
            scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
            top = []
            for row in scores:
                order = np.argsort(-row, kind="stable")[:TOP_K]
                top.append({"ids": order.tolist(), "logits": [float(row[i]) for i in order]})
            case["top_logits"] = top
        greedy, gaps = [], []
        for _ in range(NUM_GREEDY):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-row, kind="stable")[:2]
            tok = int(order[0])
            greedy.append(tok)
            gaps.append(float(row[order[0]] - row[order[1]]))
            if tok in eog:
                break
            llm.eval([tok])
        case["greedy"] = greedy
        case["greedy_gaps"] = gaps
        cases.append(case)
        print(f"{idx + 1}/{len(prompts)}: {len(ids)} prompt tokens, {len(greedy)} generated", file=sys.stderr)
    out = {
        "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
        "model": pathlib.Path(MODEL).name,
        "eog_ids": sorted(eog),
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
