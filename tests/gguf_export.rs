//! `export --format gguf`: the fused model written as GGUF, read back two
//! ways: by our own GGUF loader (logits and greedy output against the fused
//! MLX model) and by llama.cpp's Python `gguf` reader
//! (scripts/gguf_check.py; skipped, saying so, without the package).

mod common;

use std::path::Path;
use std::process::Command;

use blossom_p2p::model::generate::{SamplingParams, generate};
use blossom_p2p::model::{Decoder, LoadOptions, QuantMode, load_model};
use blossom_p2p::train::adapters;
use blossom_p2p::train::lora::fuse;
use mlx_rs::Array;

/// Logits of a fixed token sequence.
fn logits(decoder: &Decoder, tokens: &[i32]) -> Vec<f32> {
    let input = Array::from_slice(tokens, &[1, tokens.len() as i32]);
    let out = decoder.forward(&input, None, None).unwrap().as_dtype(mlx_rs::Dtype::Float32).unwrap();
    out.eval().unwrap();
    out.as_slice::<f32>().to_vec()
}

/// Largest difference, relative to the largest reference logit.
fn relative_gap(reference: &[f32], other: &[f32]) -> f32 {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    reference.iter().zip(other).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn greedy(decoder: &Decoder, prompt: &[u32], tokens: u32) -> Vec<u32> {
    let params = SamplingParams {
        max_tokens: tokens,
        ..SamplingParams::default()
    };
    generate(decoder, None, prompt, &params, &[], true, |_| Ok(true)).unwrap().0
}

/// Runs scripts/gguf_check.py on `file` when the `gguf` package is there.
fn python_reader_accepts(file: &Path) {
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gguf_check.py"))
        .arg(file)
        .env("PYTHONPATH", common::python_path())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.code() == Some(77) {
        common::skip_unless_ci(&format!("the gguf reader: {}", stdout.trim()));
        return;
    }
    assert!(output.status.success() && stdout.ends_with("OK\n"), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
}

fn export(args: &[&str]) {
    let output = common::blossom(&[&["-q", "--set", "lora.num_layers=4"], args].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn a_fused_tiny_model_round_trips_through_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    export(&["train", "--model", "tiny", "--iters", "8", "--val-rows", "2", "--exact-match-rows", "0", "--adapter-path", adapter.to_str().unwrap()]);
    // The fused MLX model is the reference.
    let mut reference = load_model("tiny", &LoadOptions { quant: QuantMode::Dequantize }).unwrap();
    let (params, settings) = adapters::load(&adapter, &reference.decoder).unwrap();
    let base_logits = logits(&reference.decoder, &[5, 17, 200, 3, 99, 42, 7, 250]);
    fuse(&mut reference.decoder, &params, &settings).unwrap();
    let tokens = [5, 17, 200, 3, 99, 42, 7, 250];
    let expected = logits(&reference.decoder, &tokens);
    assert!(relative_gap(&expected, &base_logits) > 1e-3, "the adapter must change the model for this test to mean anything");
    let prompt = reference.tokenizer.encode("hello world", true).unwrap();
    let expected_greedy = greedy(&reference.decoder, &prompt, 16);

    for (quant, tolerance) in [("f16", 0.005), ("q8_0", 0.03), ("q4_1", 0.4)] {
        let file = dir.path().join(format!("tiny-{quant}.gguf"));
        export(&[
            "export", "--model", "tiny", "--fuse", "--adapter-path", adapter.to_str().unwrap(), "--format", "gguf", "--quant", quant,
            "--out", file.to_str().unwrap(),
        ]);
        let loaded = load_model(file.to_str().unwrap(), &LoadOptions { quant: QuantMode::Dequantize }).unwrap();
        assert_eq!(loaded.tokenizer.encode("hello world", true).unwrap(), prompt, "{quant}: the tokenizer survives");
        assert_eq!(loaded.tokenizer.chat_template(), reference.tokenizer.chat_template());
        let gap = relative_gap(&expected, &logits(&loaded.decoder, &tokens));
        eprintln!("{quant}: largest logit gap {gap:.5} of the logits' scale");
        assert!(gap <= tolerance, "{quant}: logits differ by {gap} of their scale");
        if quant != "q4_1" {
            assert_eq!(greedy(&loaded.decoder, &prompt, 16), expected_greedy, "{quant}: greedy output");
        }
        python_reader_accepts(&file);
    }
}

/// The embedded default (SmolLM2-135M, a llama model: Q/K permuted) exported
/// as Q8_0 answers a chat prompt with the same greedy text.
#[test]
fn the_default_model_exported_as_q8_0_gives_the_same_greedy_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(blossom_p2p::default_model::DEFAULT_MODEL_PATH);
    let file = dir.path().join("default-q8_0.gguf");
    export(&["export", "--model", model.to_str().unwrap(), "--format", "gguf", "--quant", "q8_0", "--out", file.to_str().unwrap()]);
    python_reader_accepts(&file);
    let reference = load_model(model.to_str().unwrap(), &LoadOptions { quant: QuantMode::Dequantize }).unwrap();
    let exported = load_model(file.to_str().unwrap(), &LoadOptions { quant: QuantMode::Dequantize }).unwrap();
    let messages = [blossom_p2p::model::chat::ChatMessage::user("What is the capital of France?")];
    let prompt = reference.tokenizer.encode_chat(&messages).unwrap();
    assert_eq!(exported.tokenizer.encode_chat(&messages).unwrap(), prompt);
    let expected = greedy(&reference.decoder, &prompt, 12);
    let got = greedy(&exported.decoder, &prompt, 12);
    let text = |ids: &[u32]| reference.tokenizer.decode(ids, true).unwrap();
    assert_eq!(text(&got), text(&expected));
    let tokens: Vec<i32> = prompt.iter().map(|t| *t as i32).collect();
    let gap = relative_gap(&logits(&reference.decoder, &tokens), &logits(&exported.decoder, &tokens));
    eprintln!("default model, q8_0: largest logit gap {gap:.5} of the logits' scale; greedy: {:?}", text(&got));
    assert!(gap < 0.05, "logits differ by {gap} of their scale");
}
