#!/usr/bin/env python3
"""Generates the reference checkpoints that tests/model_architectures.rs checks
our decoders against: for each architecture, a small mlx-lm model with seeded
random weights (config.json + model.safetensors) and its logits for a fixed
prompt (reference.safetensors).

Needs Python mlx-lm 0.32.2 with MLX 0.32.2, e.g.
    python3 -m venv .venv-mlx && .venv-mlx/bin/pip install "mlx-lm==0.32.2" "mlx[cpu]==0.32.2"
    .venv-mlx/bin/python scripts/make_model_fixtures.py
The output is committed; rerun only to change the fixtures.
"""
import json
import pathlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
TOKENS = [1, 5, 9, 2, 7, 3, 11, 4, 15, 20, 33, 60]

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=128,
)

FIXTURES = {
    "llama3": dict(
        BASE,
        model_type="llama",
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "mistral": dict(BASE, model_type="mistral", num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=False),
    "qwen2": dict(BASE, model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=4096),
    "gemma3": dict(
        BASE,
        model_type="gemma3_text",
        num_hidden_layers=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=4,
        sliding_window_pattern=2,
        rope_local_base_freq=10000.0,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # MLX 4-bit, group 32, with the output head at 8 bits (a per-layer entry).
    "llama_q4": dict(BASE, model_type="llama", rope_theta=100000.0, tie_word_embeddings=False, quantize=True),
}


def build(name, config, seed):
    config = dict(config)
    quantize = config.pop("quantize", False)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    gemma = config["model_type"].startswith("gemma")
    # Norm weights start at 1 (or 0 for Gemma's 1 + w): perturb them so the
    # test sees whether every norm is applied, and applied right.
    params = []
    for key, value in tree_flatten(model.parameters()):
        if "norm" in key:
            value = mx.random.uniform(-0.5, 0.5, value.shape) + (0.0 if gemma else 1.0)
        params.append((key, value))
    model.load_weights(params)
    if gemma:
        # Real Gemma 3 ties its output head to the embedding.
        model.tie_word_embeddings = True
        model.pop("lm_head")
    if quantize:
        def predicate(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            return {"group_size": 32, "bits": 8} if path == "lm_head" else True

        nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)
        config["quantization"] = {"group_size": 32, "bits": 4, "lm_head": {"group_size": 32, "bits": 8}}
    mx.eval(model.parameters())
    logits = model(mx.array([TOKENS]))
    dest = OUT / name
    dest.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    mx.save_safetensors(
        str(dest / "reference.safetensors"),
        {"tokens": mx.array([TOKENS], dtype=mx.int32), "logits": logits.astype(mx.float32)},
    )
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"{name}: {len(weights)} tensors, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    for index, (name, config) in enumerate(FIXTURES.items()):
        build(name, config, seed=index + 1)
