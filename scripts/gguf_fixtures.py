#!/usr/bin/env python3
"""Fixtures for src/model/gguf_quants.rs: random blocks of every GGML type
the loader reads (scales set to sane float16 values), and what `gguf`'s own
Python `dequantize` makes of them, as little-endian float32.

    pip install gguf numpy && python3 scripts/gguf_fixtures.py

Writes tests/fixtures/gguf_quants/<TYPE>.bin and <TYPE>.f32."""

import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/gguf_quants"
# Byte offsets of each block's float16 scale fields (d, and min/dmin).
SCALES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def main():
    rng = np.random.default_rng(20261207)
    OUT.mkdir(parents=True, exist_ok=True)
    for qtype in [T.F16, T.BF16, *SCALES]:
        per_block, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks = 4 if per_block == 256 else 16 if per_block == 32 else 512
        if qtype == T.F16:
            raw = rng.normal(size=blocks).astype(np.float16).view(np.uint8)
        elif qtype == T.BF16:
            raw = (rng.normal(size=blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
            for offset in SCALES[qtype]:
                scale = rng.uniform(-0.05, 0.05, size=blocks).astype(np.float16)
                raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(blocks, 2)
            raw = raw.reshape(-1)
        values = dequantize(raw, qtype).astype("<f4")
        assert values.size == blocks * per_block and np.isfinite(values).all()
        (OUT / f"{qtype.name}.bin").write_bytes(raw.tobytes())
        (OUT / f"{qtype.name}.f32").write_bytes(values.tobytes())
        print(f"{qtype.name}: {blocks} blocks, {values.size} values")


if __name__ == "__main__":
    main()
