//! The built-in `tiny` model, export round trips, the RoPE layout of GGUF
//! weights, and clear errors (never panics) for bad model inputs.

use std::path::Path;

use blossom_p2p::model::export::export_mlx_lm;
use blossom_p2p::model::generate::{SamplingParams, generate};
use blossom_p2p::model::tiny::{tiny_args, tiny_weights};
use blossom_p2p::model::{Decoder, LoadOptions, ModelError, QuantMode, load_model};
use mlx_rs::Array;

mod common;

fn tokens(ids: &[i32]) -> Array {
    Array::from_slice(ids, &[1, ids.len() as i32])
}

fn logits(decoder: &Decoder) -> Array {
    decoder.forward(&tokens(&[5, 17, 200, 3, 99, 42, 7]), None, None).expect("forward")
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    a.subtract(b).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap()
}

fn keep(source: &str) -> Result<blossom_p2p::model::LoadedModel, ModelError> {
    load_model(source, &LoadOptions { quant: QuantMode::Keep })
}

#[test]
fn tiny_is_deterministic_for_a_seed() {
    let a = keep("tiny:7").unwrap();
    let b = keep("tiny:7").unwrap();
    let c = keep("tiny:8").unwrap();
    assert_eq!(max_abs_diff(&logits(&a.decoder), &logits(&b.decoder)), 0.0);
    assert!(max_abs_diff(&logits(&a.decoder), &logits(&c.decoder)) > 1e-3);
    assert_eq!(a.identity, b.identity);
    assert_ne!(a.identity, c.identity);
    assert!(keep("tiny:x").is_err());
}

#[test]
fn tiny_greedy_generation_is_the_same_with_and_without_cache() {
    let model = keep("tiny").unwrap();
    let prompt = model.tokenizer.encode("hello there", false).unwrap();
    let params = SamplingParams {
        max_tokens: 24,
        ..Default::default()
    };
    let (cached, stats) = generate(&model.decoder, None, &prompt, &params, &[], true, |_| Ok(true)).unwrap();
    let (uncached, _) = generate(&model.decoder, None, &prompt, &params, &[], false, |_| Ok(true)).unwrap();
    assert_eq!(cached.len(), 24);
    assert_eq!(stats.generated_tokens, 24);
    assert_eq!(cached, uncached);
    // Seeded sampling repeats itself.
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.9,
        seed: 11,
        ..params
    };
    let run = || generate(&model.decoder, None, &prompt, &sampled, &[], true, |_| Ok(true)).unwrap().0;
    assert_eq!(run(), run());
}

/// llama.cpp stores Q and K rows interleaved for GPT-J-style ("traditional")
/// RoPE. Permuting the rows that way and switching to traditional RoPE must
/// give the same model: that is the relation the GGUF loader inverts.
#[test]
fn llama_cpp_row_permutation_equals_traditional_rope() {
    let args = tiny_args();
    let plain = Decoder::from_weights(args.clone(), tiny_weights(&args, 3)).unwrap();
    let mut permuted = tiny_weights(&args, 3);
    let head_dim = args.head_dim();
    for layer in 0..args.num_hidden_layers {
        for (proj, heads) in [("q_proj", args.num_attention_heads), ("k_proj", args.num_kv_heads())] {
            let name = format!("model.layers.{layer}.self_attn.{proj}.weight");
            let w = permuted.take(&name).unwrap();
            let shape = w.shape().to_vec();
            let w = w
                .reshape(&[heads, 2, head_dim / 2, shape[1]])
                .unwrap()
                .swap_axes(1, 2)
                .unwrap()
                .reshape(&shape)
                .unwrap();
            permuted.insert(name, w);
        }
    }
    let mut traditional_args = args.clone();
    traditional_args.rope_traditional = true;
    let traditional = Decoder::from_weights(traditional_args, permuted).unwrap();
    assert!(max_abs_diff(&logits(&plain), &logits(&traditional)) < 1e-4);
}

#[test]
fn export_round_trips_float_and_quantized_models() {
    let dir = tempfile::tempdir().unwrap();
    let model = keep("tiny:5").unwrap();
    export_mlx_lm(&model.decoder, &model.tokenizer, dir.path()).unwrap();
    let back = keep(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(max_abs_diff(&logits(&model.decoder), &logits(&back.decoder)), 0.0);
    assert_eq!(back.tokenizer.apply_chat_template(&[blossom_p2p::model::chat::ChatMessage::user("hi")], true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(back.tokenizer.encode("héllo", false).unwrap(), model.tokenizer.encode("héllo", false).unwrap());

    let mut quantized = model.decoder.clone();
    quantized.quantize(32, 4).unwrap();
    let qdir = tempfile::tempdir().unwrap();
    export_mlx_lm(&quantized, &model.tokenizer, qdir.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(qdir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization"]["bits"], 4);
    assert_eq!(config["quantization"]["group_size"], 32);
    let back = keep(qdir.path().to_str().unwrap()).unwrap();
    assert!(back.decoder.is_quantized());
    assert_eq!(max_abs_diff(&logits(&quantized), &logits(&back.decoder)), 0.0);
    // Auto on CPU dequantizes, and stays close to the quantized logits.
    let auto = load_model(qdir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    if auto.dequantized {
        assert!(max_abs_diff(&logits(&quantized), &logits(&auto.decoder)) < 1e-2);
    }
}

fn expect_err(source: &str) -> String {
    match keep(source) {
        Ok(_) => panic!("{source} should not load"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn missing_truncated_and_garbage_files_are_clear_errors() {
    let err = expect_err("/nonexistent/model.gguf");
    assert!(err.contains("no such file"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let model_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&model_path).expect("the default model (bash scripts/setup.sh)");
    for (name, data) in [
        ("truncated.gguf", bytes[..1 << 20].to_vec()),
        ("header-only.gguf", bytes[..64].to_vec()),
        ("garbage.gguf", (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
        ("empty.gguf", Vec::new()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        let err = expect_err(path.to_str().unwrap());
        assert!(err.contains(name), "{name}: {err}");
    }
}

fn exported_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = keep("tiny").unwrap();
    export_mlx_lm(&model.decoder, &model.tokenizer, dir.path()).unwrap();
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let dir = exported_tiny();
    edit_config(dir.path(), |c| c["model_type"] = "bert".into());
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("unsupported model architecture `bert`"), "{err}");
}

#[test]
fn shapes_that_disagree_with_config_name_the_tensor() {
    let dir = exported_tiny();
    edit_config(dir.path(), |c| c["intermediate_size"] = 96.into());
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("mlp.gate_proj.weight") && err.contains("[96, 64]") && err.contains("[128, 64]"), "{err}");

    let dir = exported_tiny();
    edit_config(dir.path(), |c| c["num_attention_heads"] = 3.into());
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("bad model config"), "{err}");

    let dir = exported_tiny();
    edit_config(dir.path(), |c| c["num_hidden_layers"] = 3.into());
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("tensor(s) this architecture does not use"), "{err}");
}

#[test]
fn broken_tokenizer_and_config_files_are_clear_errors() {
    let dir = exported_tiny();
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("tokenizer.json"), "{err}");

    let dir = exported_tiny();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("config.json") && err.contains("missing field"), "{err}");

    let dir = exported_tiny();
    std::fs::write(dir.path().join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("model.safetensors") || err.contains("no tensor"), "{err}");
}

use common::blossom;

#[test]
fn generate_command_streams_text_and_reports_bad_models() {
    let output = blossom(&["-q", "generate", "--model", "tiny", "--prompt", "hi", "--max-tokens", "8"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("generation: 8 tokens"));

    let output = blossom(&["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"]);
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("cannot load model /nonexistent.gguf"), "{err}");

    let output = blossom(&["generate", "--model", "tiny", "--prompt", "hi", "--top-p", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("top_p"));
}

#[test]
fn default_model_chats_through_the_cli_and_exports() {
    let output = blossom(&["-q", "generate", "--prompt", "What is the capital of France?", "--max-tokens", "12"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("Paris"));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let output = blossom(&["export", "--out", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization"]["bits"], 4);
    assert_eq!(config["quantization"]["model.embed_tokens"]["bits"], 8);
    // The exported folder loads in our own loader and answers the same.
    let output = blossom(&["-q", "generate", "--model", out.to_str().unwrap(), "--prompt", "What is the capital of France?", "--max-tokens", "12"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("Paris"));
}

#[test]
fn hub_models_load_from_the_cache_offline() {
    let (cache, snapshot) = common::fake_hub_cache("models", "blossom-test", "tiny");
    let model = keep("tiny:2").unwrap();
    export_mlx_lm(&model.decoder, &model.tokenizer, &snapshot).unwrap();
    let run = |spec: &str| common::run_offline(cache.path(), &["-q", "generate", "--model", spec, "--prompt", "hi", "--max-tokens", "4"]);
    let output = run("hf:blossom-test/tiny");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    common::assert_absent_repo_is_a_clear_error(&run("hf:blossom-test/absent"));
    let output = run("hf:not-a-repo");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected hf:org/name"));
}

/// A left-padded batch with a padding mask gives the real tokens the same
/// logits as running them alone (RoPE is relative, so the shift is harmless).
#[test]
fn padding_mask_hides_left_padding_in_a_batch() {
    let model = keep("tiny:4").unwrap();
    let long = [5, 17, 200, 3, 99];
    let short = [42, 7, 9];
    let batch = Array::from_slice(&[long.as_slice(), &[0, 0], short.as_slice()].concat(), &[2, 5]);
    let padding = Array::from_slice(&[true, true, true, true, true, false, false, true, true, true], &[2, 5]);
    let batched = model.decoder.forward(&batch, None, Some(&padding)).unwrap();
    let alone_long = model.decoder.forward(&tokens(&long), None, None).unwrap();
    let alone_short = model.decoder.forward(&tokens(&short), None, None).unwrap();
    let row = |a: &Array, b: i32, from: i32, to: i32| {
        a.take_axis(Array::from_int(b), 0)
            .unwrap()
            .take_axis(Array::from_slice(&(from..to).collect::<Vec<i32>>(), &[to - from]), 0)
            .unwrap()
    };
    assert!(max_abs_diff(&row(&batched, 0, 0, 5), &row(&alone_long, 0, 0, 5)) < 1e-4);
    let diff = max_abs_diff(&row(&batched, 1, 2, 5), &row(&alone_short, 0, 0, 3));
    assert!(diff < 1e-4, "padded sequence differs by {diff}");
    // Without the mask the padding leaks into the short sequence.
    let unmasked = model.decoder.forward(&batch, None, None).unwrap();
    assert!(max_abs_diff(&row(&unmasked, 1, 2, 5), &row(&alone_short, 0, 0, 3)) > 1e-3);
}

#[test]
fn sharded_safetensors_and_chat_template_jinja_load() {
    let dir = exported_tiny();
    let single = dir.path().join("model.safetensors");
    let arrays = Array::load_safetensors(&single).unwrap();
    let before = keep(dir.path().to_str().unwrap()).unwrap();
    // Split the tensors over two shards and write the index, as transformers does.
    let mut names: Vec<&String> = arrays.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        Array::save_safetensors(part.iter().map(|n| (n.as_str(), &arrays[*n])), None, dir.path().join(shard)).unwrap();
        for name in part {
            weight_map.insert((*name).clone(), shard.into());
        }
    }
    std::fs::remove_file(&single).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    // A chat_template.jinja file wins over tokenizer_config.json's template.
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}").unwrap();
    let after = keep(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(max_abs_diff(&logits(&before.decoder), &logits(&after.decoder)), 0.0);
    let text = after.tokenizer.apply_chat_template(&[blossom_p2p::model::chat::ChatMessage::user("hi")], true).unwrap();
    assert_eq!(text, "[user] hi\n");
    assert_ne!(before.identity, after.identity);

    // A shard outside the folder is refused.
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": { "x": "../escape.safetensors" } }).to_string(),
    )
    .unwrap();
    let err = expect_err(dir.path().to_str().unwrap());
    assert!(err.contains("plain file name"), "{err}");
}
