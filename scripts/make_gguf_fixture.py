#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/tiny-mixed.gguf: a tiny llama model whose tensors
use every GGUF type the loader supports (F32, F16, Q8_0, Q4_0, Q4_1), with Q
and K rows permuted as llama.cpp's converter does, a byte-level BPE vocabulary
and a chat template. Also writes reference.safetensors: the logits Python
mlx-lm 0.32.2 computes for a fixed prompt from the weights as llama.cpp
dequantizes them (gguf-py), so the test checks the type mapping and the RoPE
permutation against an independent reference.

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
DIM, LAYERS, HEADS, KV_HEADS, FF, VOCAB = 64, 2, 4, 2, 128, 288
HEAD_DIM = DIM // HEADS
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


def main():
    rng = np.random.default_rng(1234)
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
    plan = [("token_embd.weight", "model.embed_tokens.weight", T.Q8_0, None),
            ("output_norm.weight", "model.norm.weight", T.F32, None),
            ("output.weight", "lm_head.weight", T.Q8_0, None)]
    types = {0: dict(attn_q=T.Q4_0, attn_k=T.Q4_1, attn_v=T.F16, attn_output=T.Q8_0, ffn_gate=T.Q4_0, ffn_up=T.Q4_1, ffn_down=T.Q8_0),
             1: dict(attn_q=T.F16, attn_k=T.F32, attn_v=T.Q4_1, attn_output=T.F32, ffn_gate=T.Q8_0, ffn_up=T.F16, ffn_down=T.Q4_0)}
    names = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj", attn_output="self_attn.o_proj",
                 ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")
    for i in range(LAYERS):
        for short, ggml_type in types[i].items():
            heads = HEADS if short == "attn_q" else KV_HEADS if short == "attn_k" else None
            plan.append((f"blk.{i}.{short}.weight", f"model.layers.{i}.{names[short]}.weight", ggml_type, heads))
        plan.append((f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", T.F32, None))
        plan.append((f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", T.F16, None))

    writer = gguf.GGUFWriter(str(OUT / "tiny-mixed.gguf"), "llama")
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
    mx.save_safetensors(str(OUT / "reference.safetensors"),
                        {"tokens": mx.array([TOKENS], dtype=mx.int32), "logits": logits.astype(mx.float32)})
    print("wrote", OUT / "tiny-mixed.gguf", (OUT / "tiny-mixed.gguf").stat().st_size, "bytes")


if __name__ == "__main__":
    main()
