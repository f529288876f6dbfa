#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/tiny-mixed.gguf: a tiny llama model whose tensors
use every GGUF type MLX loads (F32, F16, Q8_0, Q4_0, Q4_1), with Q and K rows
permuted as llama.cpp's converter does, a byte-level BPE vocabulary and a
chat template; and tiny-kquants.gguf, wider (K-quant rows are multiples of
256), with the types this project dequantizes itself (Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K, Q5_0, Q5_1, BF16). Each comes with the logits Python mlx-lm
0.32.2 computes for a fixed prompt from the weights as llama.cpp
dequantizes them (gguf-py): reference.safetensors, reference-kquants.safetensors.
So the tests check the type mapping and the RoPE permutation against an
independent reference. gguf-py has no K-quant quantizer: those tensors are
random blocks with scales sized so the weights are about 1/sqrt(dim), and
their weights are what the blocks decode to.

Needs mlx-lm 0.32.2, MLX 0.32.2 and gguf-py:
    .venv-mlx/bin/pip install "mlx-lm==0.32.2" "mlx[cpu]==0.32.2" gguf
    .venv-mlx/bin/python scripts/make_gguf_fixture.py
"""
import pathlib

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from mlx_lm.models import llama

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf"
LAYERS, HEADS, KV_HEADS, VOCAB = 2, 4, 2, 288
TOKENS = [1, 40, 77, 100, 3, 250, 17, 9, 61, 200]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"


def bytes_to_unicode():
    """GPT-2's byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def permute(w, heads):
    """llama.cpp convert_hf_to_gguf.py's permute for Q and K."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The largest |code| a block's scales multiply, per K-quant type (for the
# scale of random blocks).
K_CODES = {T.Q2_K: 45, T.Q3_K: 128, T.Q4_K: 945, T.Q5_K: 1953, T.Q6_K: 4096}
# Byte offsets of the float16 scales in a block.
K_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_k_blocks(rng, shape, ggml_type):
    """Random blocks of a K-quant type whose weights are about 1/sqrt(row)."""
    per_block, block_bytes = gguf.constants.GGML_QUANT_SIZES[ggml_type]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, block_bytes), dtype=np.uint8)
    for offset in K_SCALES[ggml_type]:
        scale = (rng.uniform(0.5, 1.0, len(blocks)) / np.sqrt(cols) / K_CODES[ggml_type]).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def main():
    build("tiny-mixed.gguf", "reference.safetensors", dim=64, ff=128, seed=1234,
          top=dict(token_embd=T.Q8_0, output=T.Q8_0, output_norm=T.F32, attn_norm=T.F32, ffn_norm=T.F16),
          layers={0: dict(attn_q=T.Q4_0, attn_k=T.Q4_1, attn_v=T.F16, attn_output=T.Q8_0, ffn_gate=T.Q4_0, ffn_up=T.Q4_1, ffn_down=T.Q8_0),
                  1: dict(attn_q=T.F16, attn_k=T.F32, attn_v=T.Q4_1, attn_output=T.F32, ffn_gate=T.Q8_0, ffn_up=T.F16, ffn_down=T.Q4_0)})
    build("tiny-kquants.gguf", "reference-kquants.safetensors", dim=256, ff=512, seed=4321,
          top=dict(token_embd=T.Q6_K, output=T.Q4_K, output_norm=T.F32, attn_norm=T.BF16, ffn_norm=T.F32),
          layers={0: dict(attn_q=T.Q4_K, attn_k=T.Q5_K, attn_v=T.Q6_K, attn_output=T.Q2_K, ffn_gate=T.Q3_K, ffn_up=T.Q5_0, ffn_down=T.Q5_1),
                  1: dict(attn_q=T.BF16, attn_k=T.Q6_K, attn_v=T.Q4_K, attn_output=T.Q5_K, ffn_gate=T.Q2_K, ffn_up=T.Q3_K, ffn_down=T.Q4_K)})


def build(file_name, reference_name, dim, ff, seed, top, layers):
    DIM, FF = dim, ff
    HEAD_DIM = DIM // HEADS
    rng = np.random.default_rng(seed)
    uniform = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(shape[-1])
    hf = {"model.embed_tokens.weight": uniform(VOCAB, DIM), "model.norm.weight": rng.uniform(0.5, 1.5, DIM).astype(np.float32), "lm_head.weight": uniform(VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        hf[f"{p}.self_attn.q_proj.weight"] = uniform(HEADS * HEAD_DIM, DIM)
        hf[f"{p}.self_attn.k_proj.weight"] = uniform(KV_HEADS * HEAD_DIM, DIM)
        hf[f"{p}.self_attn.v_proj.weight"] = uniform(KV_HEADS * HEAD_DIM, DIM)
        hf[f"{p}.self_attn.o_proj.weight"] = uniform(DIM, HEADS * HEAD_DIM)
        hf[f"{p}.mlp.gate_proj.weight"] = uniform(FF, DIM)
        hf[f"{p}.mlp.up_proj.weight"] = uniform(FF, DIM)
        hf[f"{p}.mlp.down_proj.weight"] = uniform(DIM, FF)
        hf[f"{p}.input_layernorm.weight"] = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
        hf[f"{p}.post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, DIM).astype(np.float32)

    # GGUF name, HF name, type, permute heads (Q/K of llama).
    plan = [("token_embd.weight", "model.embed_tokens.weight", top["token_embd"], None),
            ("output_norm.weight", "model.norm.weight", top["output_norm"], None),
            ("output.weight", "lm_head.weight", top["output"], None)]
    types = layers
    names = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj", attn_output="self_attn.o_proj",
                 ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")
    for i in range(LAYERS):
        for short, ggml_type in types[i].items():
            heads = HEADS if short == "attn_q" else KV_HEADS if short == "attn_k" else None
            plan.append((f"blk.{i}.{short}.weight", f"model.layers.{i}.{names[short]}.weight", ggml_type, heads))
        plan.append((f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", top["attn_norm"], None))
        plan.append((f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", top["ffn_norm"], None))

    writer = gguf.GGUFWriter(str(OUT / file_name), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    tokens = SPECIAL + bytes_to_unicode() + [f"<|unused_{i}|>" for i in range(VOCAB - 259)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_types([3] * 3 + [1] * 256 + [5] * (VOCAB - 259))
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)

    reference = {}
    for gguf_name, hf_name, ggml_type, heads in plan:
        w = hf[hf_name]
        stored = permute(w, heads) if heads else w
        if ggml_type in (T.F32, T.F16):
            data = stored.astype(np.float16 if ggml_type == T.F16 else np.float32)
            writer.add_tensor(gguf_name, data)
            restored = data.astype(np.float32)
        elif ggml_type in K_CODES:
            data = random_k_blocks(rng, stored.shape, ggml_type)
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
            restored = gguf.quants.dequantize(data, ggml_type).reshape(stored.shape).astype(np.float32)
        else:
            data = gguf.quants.quantize(stored, ggml_type)
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
            restored = gguf.quants.dequantize(data, ggml_type).reshape(stored.shape).astype(np.float32)
        if heads:  # undo the permutation for the HF-layout reference
            restored = restored.reshape(heads, HEAD_DIM // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        reference[hf_name] = mx.array(restored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    args = llama.ModelArgs(model_type="llama", hidden_size=DIM, num_hidden_layers=LAYERS, intermediate_size=FF,
                           num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, vocab_size=VOCAB,
                           rope_theta=10000.0, tie_word_embeddings=False)
    model = llama.Model(args)
    model.load_weights(list(reference.items()))
    logits = model(mx.array([TOKENS]))
    mx.save_safetensors(str(OUT / reference_name),
                        {"tokens": mx.array([TOKENS], dtype=mx.int32), "logits": logits.astype(mx.float32)})
    print("wrote", OUT / file_name, (OUT / file_name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
