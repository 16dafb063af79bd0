#!/usr/bin/env python3
"""Regenerates tests/golden/data/dequant_gguf_py.json with gguf-py (the reference).

    source tools/reference/env.sh && python tools/reference/gen_dequant_fixtures.py   (from the repository root)

For every weight type pdserve computes with (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
Q5_K, Q6_K) it draws random blocks — random payload bytes with sane fp16 scales and mins, so the
values are finite — and decodes them with gguf-py's `gguf.quants.dequantize`, which ships with
llama.cpp in the llama-cpp-python source package. The fixture stores, per type, the raw bytes
(hex) and the decoded float32 values (hex of their little-endian bytes, so they round-trip
exactly). tests/golden/dequant_golden_test.cpp decodes the same bytes with pdserve's
dequantize_row and compares.
"""
import json
import os
import struct

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "data", "dequant_gguf_py.json")

# (type, byte offsets of fp16 fields to overwrite with sane values: (offset, scale of the value))
TYPES = {
    "F16": [],
    "BF16": [],
    "Q4_0": [(0, 0.02)],
    "Q4_1": [(0, 0.02), (2, -0.15)],
    "Q5_0": [(0, 0.02)],
    "Q5_1": [(0, 0.02), (2, -0.3)],
    "Q8_0": [(0, 0.01)],
    "Q4_K": [(0, 0.002), (2, 0.002)],
    "Q5_K": [(0, 0.002), (2, 0.002)],
    "Q6_K": [(208, 0.002)],
}


def main():
    rng = np.random.default_rng(20261121)
    out = {"generator": "gguf-py gguf.quants.dequantize", "types": {}}
    for name, fields in TYPES.items():
        qtype = GGMLQuantizationType[name]
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        n_blocks = 64 if block_elems > 1 else 512
        if name in ("F16", "BF16"):
            vals = rng.normal(0, 1, n_blocks).astype(np.float32)
            if name == "F16":
                raw = vals.astype(np.float16).tobytes()
            else:
                raw = (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            blocks = bytearray(rng.integers(0, 256, n_blocks * block_bytes, dtype=np.uint8).tobytes())
            for b in range(n_blocks):
                for off, scale in fields:
                    v = np.float16(scale * rng.uniform(0.1, 1.0))
                    blocks[b * block_bytes + off:b * block_bytes + off + 2] = v.tobytes()
            raw = bytes(blocks)
        decoded = dequantize(np.frombuffer(raw, dtype=np.uint8), qtype).astype(np.float32).reshape(-1)
        assert np.all(np.isfinite(decoded)), name
        out["types"][name] = {
            "elements": int(decoded.size),
            "bytes_hex": raw.hex(),
            "floats_hex": b"".join(struct.pack("<f", float(x)) for x in decoded).hex(),
        }
        print(f"{name}: {decoded.size} values")
    with open(OUT, "w") as f:
        json.dump(out, f)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
