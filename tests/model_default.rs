//! The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF, fetched by
//! scripts/setup.sh): it chats sensibly, its quantized and dequantized paths
//! agree, the KV cache changes nothing, and its tokenizer is right.

use blossom_p2p::default_model::DEFAULT_MODEL_PATH;
use blossom_p2p::model::chat::ChatMessage;
use blossom_p2p::model::generate::{SamplingParams, generate};
use blossom_p2p::model::{LoadOptions, LoadedModel, QuantMode, load_model};
use mlx_rs::{Array, Dtype};

fn default_model(quant: QuantMode) -> LoadedModel {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.ends_with(DEFAULT_MODEL_PATH));
    load_model(path, &LoadOptions { quant }).expect("the default model loads (run bash scripts/setup.sh)")
}

fn answer(model: &LoadedModel, question: &str, max_tokens: u32) -> String {
    let prompt = model.tokenizer.encode_chat(&[ChatMessage::user(question)]).expect("prompt");
    let params = SamplingParams {
        max_tokens,
        ..Default::default()
    };
    let (tokens, _) = generate(&model.decoder, None, &prompt, &params, model.tokenizer.eos_ids(), true, |_| Ok(true)).expect("generate");
    model.tokenizer.decode(&tokens, true).expect("decode")
}

#[test]
fn answers_simple_factual_questions() {
    let model = default_model(QuantMode::Auto);
    for (question, expected) in [
        ("What is the capital of France?", "Paris"),
        ("How many days are in a week?", "7"),
        ("What color is the sky on a clear day?", "blue"),
    ] {
        let text = answer(&model, question, 24);
        assert!(text.contains(expected), "{question} -> {text:?} (expected {expected:?})");
    }
}

#[test]
fn quantized_and_dequantized_logits_agree() {
    let quantized = default_model(QuantMode::Keep);
    assert!(!quantized.dequantized && quantized.decoder.is_quantized());
    let mut dequantized = quantized.decoder.clone();
    dequantized.dequantize(Dtype::Float32).expect("dequantize");
    assert!(!dequantized.is_quantized());

    let ids = quantized.tokenizer.encode("The quick brown fox jumps over the lazy dog. 1234", false).unwrap();
    let tokens = Array::from_slice(&ids.iter().map(|&t| t as i32).collect::<Vec<_>>(), &[1, ids.len() as i32]);
    let a = quantized.decoder.forward(&tokens, None, None).unwrap().as_dtype(Dtype::Float32).unwrap();
    let b = dequantized.forward(&tokens, None, None).unwrap();
    let scale = b.abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
    let diff = a.subtract(&b).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
    assert!(diff / scale < 2e-2, "max |Δlogit| {diff} against max |logit| {scale}");
    // And they predict the same next token at every position.
    let argmax = |x: &Array| mlx_rs::ops::indexing::argmax_axis(x, -1, None).unwrap();
    let same = argmax(&a).eq(argmax(&b)).unwrap().all(None).unwrap();
    assert!(same.try_item_cast::<bool>().unwrap());
}

#[test]
fn greedy_generation_with_and_without_the_kv_cache_agree() {
    let model = default_model(QuantMode::Auto);
    let prompt = model.tokenizer.encode_chat(&[ChatMessage::user("Name three fruits.")]).unwrap();
    let params = SamplingParams {
        max_tokens: 16,
        ..Default::default()
    };
    let (cached, _) = generate(&model.decoder, None, &prompt, &params, &[], true, |_| Ok(true)).unwrap();
    let (uncached, _) = generate(&model.decoder, None, &prompt, &params, &[], false, |_| Ok(true)).unwrap();
    assert_eq!(cached.len(), 16);
    assert_eq!(cached, uncached);
}

#[test]
fn tokenizer_round_trips_and_knows_its_special_tokens() {
    let model = default_model(QuantMode::Keep);
    let tokenizer = &model.tokenizer;
    assert_eq!(tokenizer.vocab_size(), 49152);
    for text in ["Hello, world!", "  leading spaces and\ttabs\n", "Zürich, 東京, emoji 🌸", "x = 12345 * 6789;"] {
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    // SmolLM splits digits one by one.
    let digits = tokenizer.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tokenizer.eos_ids(), &[2]);
    // Special tokens inside text are single tokens.
    let ids = tokenizer.encode("<|im_start|>user", false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "user");
}

#[test]
fn chat_template_comes_from_the_gguf() {
    let model = default_model(QuantMode::Keep);
    let text = model.tokenizer.apply_chat_template(&[ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = model
        .tokenizer
        .apply_chat_template(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")], false)
        .unwrap();
    assert_eq!(with_system, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}
