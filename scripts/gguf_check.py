#!/usr/bin/env python3
"""Reads a GGUF file with the `gguf` package (llama.cpp's own reader) and
checks that every key and tensor is readable and consistent.

Usage: gguf_check.py FILE.gguf
Prints one line per check and OK; exits 77 (skipped) without the package.
"""

import sys

try:
    import gguf
    import numpy as np
except ImportError:
    print("SKIP: the gguf package is not installed (pip install gguf)")
    sys.exit(77)


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def main():
    reader = gguf.GGUFReader(sys.argv[1])
    fields = {}
    for name, field in reader.fields.items():
        # Every value decodes (strings, numbers, arrays).
        fields[name] = field.contents()
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        fail(f"general.architecture is {arch!r}")
    required = [
        f"{arch}.context_length", f"{arch}.embedding_length", f"{arch}.block_count", f"{arch}.feed_forward_length",
        f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv", f"{arch}.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "general.file_type",
    ]
    missing = [k for k in required if k not in fields]
    if missing:
        fail(f"missing keys {missing}")
    vocab = len(fields["tokenizer.ggml.tokens"])
    print(f"keys: {len(fields)} ({arch}, {vocab} tokens, chat template: {'tokenizer.chat_template' in fields})")
    names = set()
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if data.size == 0:
            fail(f"tensor {tensor.name} has no data")
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            if data.size != tensor.n_elements or not np.all(np.isfinite(data)):
                fail(f"tensor {tensor.name}: {data.size} values for {tensor.n_elements} elements, or non-finite ones")
        else:
            values = gguf.quants.dequantize(data, tensor.tensor_type)
            if values.size != tensor.n_elements or not np.all(np.isfinite(values)):
                fail(f"tensor {tensor.name}: dequantized to {values.size} values for {tensor.n_elements}")
        names.add(tensor.name)
    blocks = fields[f"{arch}.block_count"]
    for i in range(blocks):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"):
            if f"blk.{i}.{part}.weight" not in names:
                fail(f"blk.{i}.{part}.weight is missing")
    if "token_embd.weight" not in names or "output_norm.weight" not in names:
        fail("token_embd.weight or output_norm.weight is missing")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    print(f"tensors: {len(reader.tensors)} read, types {types}")
    print("OK")


main()
