//! Each architecture against a reference: small checkpoints with seeded random
//! weights made by Python mlx-lm 0.32.2 (scripts/make_model_fixtures.py), and
//! the logits mlx-lm computed for a fixed prompt.

use std::path::PathBuf;

use blossom_p2p::model::attention::{Layout, PackedRows};
use blossom_p2p::model::load::load_hf_weights;
use blossom_p2p::model::{Decoder, KvCache};
use mlx_rs::Array;

fn fixture(name: &str) -> (Decoder, Array, Array) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name);
    let (args, weights, _) = load_hf_weights(&dir).expect("fixture loads");
    let decoder = Decoder::from_weights(args, weights).expect("fixture builds");
    let reference = Array::load_safetensors(dir.join("reference.safetensors")).expect("reference loads");
    (decoder, reference["tokens"].clone(), reference["logits"].clone())
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let diff = a.subtract(b).unwrap().abs().unwrap().max(None).unwrap();
    diff.try_item_cast::<f32>().unwrap()
}

/// The whole prompt at once, then the same prompt in two pieces through the
/// KV cache (which also crosses Gemma's sliding window): both match mlx-lm.
fn check(name: &str) {
    let (decoder, tokens, want) = fixture(name);
    // A degenerate reference (all logits equal) would match almost anything.
    let spread = want.max(None).unwrap().subtract(want.min(None).unwrap()).unwrap().try_item_cast::<f32>().unwrap();
    assert!(spread > 0.1, "{name}: reference logits barely vary ({spread})");
    let got = decoder.forward(&tokens, None, None).expect("forward");
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{name}: logits differ from mlx-lm by {diff}");

    let mut cache: Vec<KvCache> = decoder.new_cache();
    let split = 7;
    let len = tokens.shape()[1];
    let first = tokens.take_axis(Array::from_slice(&(0..split).collect::<Vec<i32>>(), &[split]), 1).unwrap();
    let rest = tokens.take_axis(Array::from_slice(&(split..len).collect::<Vec<i32>>(), &[len - split]), 1).unwrap();
    let a = decoder.forward(&first, Some(&mut cache), None).unwrap();
    let b = decoder.forward(&rest, Some(&mut cache), None).unwrap();
    let stitched = mlx_rs::ops::concatenate(&[a, b], 1).unwrap();
    let diff = max_abs_diff(&stitched, &want);
    assert!(diff < 1e-4, "{name}: cached logits differ from mlx-lm by {diff}");

    // The two pieces packed into one sequence, the second first: each row
    // sees only itself, from position 0, as it would alone.
    let packed_tokens = mlx_rs::ops::concatenate(&[&rest, &first], 1).unwrap();
    let (n_rest, n_first) = ((len - split) as usize, split as usize);
    let segments: Vec<i32> = std::iter::repeat_n(0, n_rest).chain(std::iter::repeat_n(1, n_first)).collect();
    let positions: Vec<i32> = (0..n_rest as i32).chain(0..n_first as i32).collect();
    let rows = PackedRows {
        segments: Array::from_slice(&segments, &[1, len]),
        positions: Array::from_slice(&positions, &[1, len]),
    };
    let packed = decoder.forward_adapted(&packed_tokens, None, Layout::Packed(&rows), None).expect("packed forward");
    let pieces = packed.split_at_indices(&[len - split], 1).unwrap();
    let alone = decoder.forward(&rest, None, None).unwrap();
    let diff = max_abs_diff(&pieces[0], &alone).max(max_abs_diff(&pieces[1], &first_positions(&want, split)));
    assert!(diff < 1e-4, "{name}: packed rows' logits differ from the rows alone by {diff}");
}

/// The reference logits of the first `split` positions.
fn first_positions(want: &Array, split: i32) -> Array {
    want.take_axis(Array::from_slice(&(0..split).collect::<Vec<i32>>(), &[split]), 1).unwrap()
}

#[test]
fn llama3_with_rope_scaling_matches_mlx_lm() {
    check("llama3");
}

#[test]
fn mistral_matches_mlx_lm() {
    check("mistral");
}

#[test]
fn qwen2_with_qkv_bias_matches_mlx_lm() {
    check("qwen2");
}

#[test]
fn qwen3_with_qk_norm_matches_mlx_lm() {
    check("qwen3");
}

#[test]
fn gemma3_with_sliding_window_matches_mlx_lm() {
    check("gemma3");
}

#[test]
fn mlx_quantized_llama_with_per_layer_bits_matches_mlx_lm() {
    let (decoder, _, _) = fixture("llama_q4");
    let quantized = decoder.quantized_modules();
    assert!(quantized.iter().any(|(name, g, b)| name == "lm_head" && (*g, *b) == (32, 8)), "{quantized:?}");
    assert!(quantized.iter().any(|(name, _, b)| name.ends_with("q_proj") && *b == 4));
    check("llama_q4");
}

/// A GGUF file with F32, F16, Q8_0, Q4_0 and Q4_1 tensors and llama.cpp's
/// Q/K row permutation (scripts/make_gguf_fixture.py), against mlx-lm's logits
/// from the weights as llama.cpp dequantizes them.
#[test]
fn gguf_tensor_types_and_rope_permutation_match_the_reference() {
    use blossom_p2p::model::{LoadOptions, QuantMode, load_model};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let reference = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let (tokens, want) = (&reference["tokens"], &reference["logits"]);
    let path = dir.join("tiny-mixed.gguf");
    for quant in [QuantMode::Keep, QuantMode::Dequantize] {
        let model = load_model(path.to_str().unwrap(), &LoadOptions { quant }).expect("the GGUF loads");
        let bits: Vec<i32> = model.decoder.quantized_modules().iter().map(|(_, _, b)| *b).collect();
        if quant == QuantMode::Keep {
            assert!(bits.contains(&4) && bits.contains(&8), "{bits:?}");
        } else {
            assert!(bits.is_empty());
        }
        let got = model.decoder.forward(tokens, None, None).unwrap();
        let diff = max_abs_diff(&got, want);
        // Dequantized to float32 the weights are exactly llama.cpp's; kept
        // quantized, MLX's kernel works in the scales' float16.
        let tolerance = if quant == QuantMode::Keep { 2e-3 } else { 1e-5 };
        assert!(diff < tolerance, "{quant:?}: logits differ from the reference by {diff}");
        assert_eq!(model.tokenizer.eos_ids(), &[2]);
        assert_eq!(model.tokenizer.encode("hi <|im_end|>", false).unwrap().last(), Some(&2));
    }
}

/// A GGUF file with the types MLX cannot load (Q2_K to Q6_K, Q5_0, Q5_1,
/// BF16; scripts/make_gguf_fixture.py), read here: Q4_K as MLX 4-bit groups
/// (kept with `keep`), the rest dequantized to float32. Its logits are
/// mlx-lm's from the weights as llama.cpp's `gguf` dequantizes them.
#[test]
fn gguf_k_quants_dequantize_to_the_reference() {
    use blossom_p2p::model::{LoadOptions, QuantMode, load_model};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let reference = Array::load_safetensors(dir.join("reference-kquants.safetensors")).unwrap();
    let (tokens, want) = (&reference["tokens"], &reference["logits"]);
    let path = dir.join("tiny-kquants.gguf");
    for quant in [QuantMode::Keep, QuantMode::Auto] {
        let model = load_model(path.to_str().unwrap(), &LoadOptions { quant }).expect("the K-quant GGUF loads");
        let quantized: Vec<(String, i32, i32)> = model.decoder.quantized_modules();
        if quant == QuantMode::Keep {
            // The Q4_K tensors: layer 0's q, layer 1's v and down, the head.
            let names: Vec<&str> = quantized.iter().map(|(n, g, b)| { assert_eq!((*g, *b), (32, 4)); n.as_str() }).collect();
            assert_eq!(names, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj", "lm_head"]);
        } else {
            assert!(quantized.is_empty(), "{quantized:?}");
        }
        let got = model.decoder.forward(tokens, None, None).unwrap();
        let scale = want.abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(scale > 0.1, "a degenerate reference: logits up to {scale}");
        let diff = max_abs_diff(&got, want);
        // Float32 weights are llama.cpp's exactly; MLX's quantized matmul
        // sums in another order.
        let tolerance = if quant == QuantMode::Keep { 1e-4 } else { 1e-5 };
        assert!(diff < tolerance * scale.max(1.0), "{quant:?}: logits differ from the reference by {diff} (scale {scale})");
    }
}

/// A bfloat16 checkpoint (most of the hub's): `--quant auto` on the CPU
/// widens it to float32 (MLX's CPU bfloat16 matmul is slow), `keep` leaves
/// it; both give the same logits up to bfloat16 arithmetic.
#[test]
fn bfloat16_weights_are_widened_to_float32_on_the_cpu() {
    use blossom_p2p::model::QuantMode;
    use blossom_p2p::model::load::hold_weights;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    let (args, weights, _) = load_hf_weights(&dir).unwrap();
    let half: blossom_p2p::model::weights::WeightMap = weights.into_inner().into_iter().map(|(k, v)| (k, v.as_dtype(mlx_rs::Dtype::Bfloat16).unwrap())).collect();
    let reference = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let mut logits = Vec::new();
    for quant in [QuantMode::Keep, QuantMode::Auto] {
        let mut decoder = Decoder::from_weights(args.clone(), half.clone()).unwrap();
        assert!(decoder.has_half_precision());
        let widened = hold_weights(&mut decoder, quant).unwrap();
        assert_eq!(widened, quant == QuantMode::Auto, "{quant:?}");
        assert_eq!(decoder.has_half_precision(), !widened);
        logits.push(decoder.forward(&reference["tokens"], None, None).unwrap().as_dtype(mlx_rs::Dtype::Float32).unwrap());
    }
    let scale = logits[1].abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
    let diff = max_abs_diff(&logits[0], &logits[1]);
    assert!(diff < 0.05 * scale, "bfloat16 and float32 logits differ by {diff} (scale {scale})");
}
