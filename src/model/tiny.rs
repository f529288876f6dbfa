//! `tiny`: a model of the default architecture (Llama / SmolLM2) with a few
//! layers, a byte-level vocabulary and seeded random weights, built in code.
//! Tests and benchmarks of the machinery use it: it loads instantly and needs
//! no file.

use mlx_rs::Array;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::rng::SeededRng;

use super::ModelError;
use super::args::ModelArgs;
use super::tokenizer::{GgufVocab, Tokenizer};
use super::weights::WeightMap;

/// SmolLM's chat template (ChatML), so `tiny` chats like the default model.
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Whether a model source names the built-in tiny model (`tiny` or `tiny:SEED`).
pub fn is_tiny(source: &str) -> bool {
    source == "tiny" || source.starts_with("tiny:")
}

pub fn tiny_args() -> ModelArgs {
    ModelArgs {
        model_type: "llama".into(),
        hidden_size: 64,
        num_hidden_layers: 4,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        // 3 special tokens + 256 bytes, rounded up to a multiple of 32 so it
        // quantizes with group size 32.
        vocab_size: 288,
        rope_theta: 100_000.0,
        rope_traditional: false,
        rope_scaling: None,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        max_position_embeddings: Some(2048),
        query_pre_attn_scalar: None,
        sliding_window: None,
        sliding_window_pattern: None,
        rope_local_base_freq: None,
        quantization: None,
    }
}

/// Uniform(-1/√fan_in, 1/√fan_in) weights from `rng`, as nn.Linear inits.
fn random_matrix(rng: &mut SeededRng, rows: i32, cols: i32) -> Array {
    let bound = 1.0 / (cols as f64).sqrt();
    let values: Vec<f32> = (0..rows * cols).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
    Array::from_slice(&values, &[rows, cols])
}

/// Seeded random weights under mlx-lm's names.
pub fn tiny_weights(args: &ModelArgs, seed: u64) -> WeightMap {
    let mut rng = SeededRng::new(seed);
    let mut weights = WeightMap::new();
    let (dim, hidden, head_dim) = (args.hidden_size, args.intermediate_size, args.head_dim());
    let ones = |n: i32| Array::from_slice(&vec![1.0f32; n as usize], &[n]);
    weights.insert("model.embed_tokens.weight".into(), random_matrix(&mut rng, args.vocab_size, dim));
    for i in 0..args.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", args.num_attention_heads * head_dim, dim),
            ("self_attn.k_proj", args.num_kv_heads() * head_dim, dim),
            ("self_attn.v_proj", args.num_kv_heads() * head_dim, dim),
            ("self_attn.o_proj", dim, args.num_attention_heads * head_dim),
            ("mlp.gate_proj", hidden, dim),
            ("mlp.up_proj", hidden, dim),
            ("mlp.down_proj", dim, hidden),
        ] {
            weights.insert(format!("{p}.{name}.weight"), random_matrix(&mut rng, rows, cols));
        }
        weights.insert(format!("{p}.input_layernorm.weight"), ones(dim));
        weights.insert(format!("{p}.post_attention_layernorm.weight"), ones(dim));
    }
    weights.insert("model.norm.weight".into(), ones(dim));
    weights
}

/// A byte-level tokenizer: every byte is a token, plus ChatML's specials.
pub fn tiny_tokenizer() -> Result<Tokenizer, ModelError> {
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort_unstable();
    let tokens: Vec<String> = SPECIAL_TOKENS
        .iter()
        .map(|s| s.to_string())
        .chain(bytes.into_iter().map(String::from))
        .collect();
    let token_types = (0..tokens.len()).map(|i| if i < SPECIAL_TOKENS.len() { 3 } else { 1 }).collect();
    Tokenizer::from_gguf(&GgufVocab {
        model: "gpt2".into(),
        pre: "gpt2".into(),
        tokens,
        merges: Vec::new(),
        token_types: Some(token_types),
        bos_token_id: None,
        eos_token_id: Some(2),
        add_bos_token: false,
        chat_template: Some(CHATML_TEMPLATE.into()),
    })
}
