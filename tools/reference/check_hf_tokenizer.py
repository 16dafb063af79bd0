#!/usr/bin/env python3
"""Checks the tokenizer.json files the golden test writes with Hugging Face's own tokenizer.

    PDSERVE_HF_TOKENIZER_DIR=/tmp/hf build/release/tests/golden/tokenizer_golden_test \
        --gtest_filter='*HfTokenizerJson*'
    python -m pip install tokenizers   # Hugging Face's tokenizer, from PyPI
    python tools/reference/check_hf_tokenizer.py /tmp/hf

tests/golden/tokenizer_golden_test.cpp writes the default model's vocabulary as Hugging Face
tokenizer directories (smollm2: the model's own pre-tokenizer; bpe_gpt2, bpe_llama_bpe, bpe_qwen2:
the byte-level variants of tokenizer_variants.json) and checks that pdserve, reading them, gives
llama.cpp's results. This script closes the loop from the other side: it loads the same files with
the `tokenizers` package and compares its ids with the same llama.cpp fixtures, so the files are
what Hugging Face itself reads as those tokenizers (not only what pdserve's reader expects).
Texts that are not valid UTF-8 are skipped (Python strings cannot hold them). Qwen 2's NFC
normalizer is applied by Hugging Face and not by llama.cpp; the script shows that it accounts for
every difference of that tokenizer. Exit status 0 when nothing else differs.
"""

import json
import pathlib
import sys

import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "golden" / "data"
FNV_BASIS = 14695981039346656037


def fnv1a(data: bytes) -> str:
    h = FNV_BASIS
    for b in data:
        h ^= b
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def text_of(case):
    if "text" in case:
        return case["text"]
    raw = bytes.fromhex(case["text_hex"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    root = pathlib.Path(sys.argv[1])
    fixture = json.loads((DATA / "tokenizer_smollm2.json").read_text())
    variants = json.loads((DATA / "tokenizer_variants.json").read_text())["variants"]
    failures = 0
    runs = [(name, False) for name in ["smollm2", "bpe_gpt2", "bpe_llama_bpe", "bpe_qwen2"]]
    # Qwen 2's NFC normalizer: Hugging Face applies it, llama.cpp (and so pdserve) does not. Run
    # again without it to show that NFC accounts for every difference.
    runs.append(("bpe_qwen2", True))
    expected_failures = 0
    for name, without_normalizer in runs:
        spec = json.loads((root / name / "tokenizer.json").read_text())
        if without_normalizer:
            spec["normalizer"] = None
        tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        checked = skipped = bad = 0
        for case in fixture["cases"]:
            text = text_of(case)
            if text is None:
                skipped += 1
                continue
            # Hugging Face always matches added tokens in the text (llama.cpp's parse_special).
            plain = tok.encode(text, add_special_tokens=False).ids
            added = tok.encode(text, add_special_tokens=True).ids
            if name == "smollm2":
                ok = plain == case["ids_special"] and added == case["ids_add_special"]
            else:
                want = variants[name]["cases"][case["name"]]
                ok = fnv1a(",".join(map(str, plain)).encode()) == want[0] and fnv1a(
                    ",".join(map(str, added)).encode()) == want[2]
            checked += 1
            if not ok:
                bad += 1
                print(f"  {name}: {case['name']}: Hugging Face differs from llama.cpp")
        label = name + (" without its NFC normalizer" if without_normalizer else "")
        print(f"{label}: {checked - bad} of {checked} texts give llama.cpp's ids ({skipped} not UTF-8, skipped)")
        if spec.get("normalizer") is not None:
            expected_failures += bad  # the documented NFC difference
        else:
            failures += bad
    if expected_failures:
        print(f"{expected_failures} differences come from NFC normalization alone (not applied by llama.cpp)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
