//! Writing a model as an mlx-lm model folder: `config.json` (with the
//! `quantization` block, per-layer entries included), `model.safetensors`
//! under Hugging Face parameter names, `tokenizer.json` and
//! `tokenizer_config.json` with the chat template. This is how GGUF users
//! move to mlx-lm (`python -m mlx_lm generate --model DIR`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mlx_rs::Array;

use super::{Decoder, ModelError, Tokenizer};

#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub tensors: usize,
    pub quantized_modules: usize,
}

pub fn export_mlx_lm(decoder: &Decoder, tokenizer: &Tokenizer, out: &Path) -> Result<ExportSummary, ModelError> {
    let io_err = |what: &str, e: std::io::Error| ModelError::Load {
        path: out.join(what).display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| io_err("", e))?;

    let weights = decoder.weights()?.into_inner();
    let metadata = HashMap::from([("format".to_owned(), "mlx".to_owned())]);
    Array::save_safetensors(weights.iter().map(|(k, v)| (k.as_str(), v)), &metadata, out.join("model.safetensors")).map_err(|e| ModelError::Load {
        path: out.join("model.safetensors").display().to_string(),
        message: e.to_string(),
    })?;

    let quantized = decoder.quantized_modules();
    // Through text, not to_value: that widens f32 to f64 and writes 1e-5 as
    // 9.999999747378752e-6.
    let mut config: serde_json::Value = serde_json::to_string(decoder.args())
        .and_then(|text| serde_json::from_str(&text))
        .map_err(|e| ModelError::BadConfig(e.to_string()))?;
    if let Some((group_size, bits)) = most_common(quantized.iter().map(|(_, g, b)| (*g, *b))) {
        let mut block = serde_json::Map::new();
        block.insert("group_size".into(), group_size.into());
        block.insert("bits".into(), bits.into());
        // mlx-lm takes per-module entries for modules that differ from the default.
        for (module, g, b) in &quantized {
            if (*g, *b) != (group_size, bits) {
                block.insert(module.clone(), serde_json::json!({ "group_size": g, "bits": b }));
            }
        }
        config["quantization"] = serde_json::Value::Object(block);
    }
    write_json(out, "config.json", &config)?;

    std::fs::write(out.join("tokenizer.json"), tokenizer.to_json()?).map_err(|e| io_err("tokenizer.json", e))?;
    let mut tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    if let Some(template) = tokenizer.chat_template() {
        tokenizer_config["chat_template"] = template.into();
    }
    if let Some(bos) = tokenizer.bos_token() {
        tokenizer_config["bos_token"] = bos.into();
    }
    if let Some(eos) = tokenizer.eos_token() {
        tokenizer_config["eos_token"] = eos.into();
    }
    write_json(out, "tokenizer_config.json", &tokenizer_config)?;
    Ok(ExportSummary {
        tensors: weights.len(),
        quantized_modules: quantized.len(),
    })
}

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::BadConfig(e.to_string()))?;
    std::fs::write(dir.join(name), text + "\n").map_err(|e| ModelError::Load {
        path: dir.join(name).display().to_string(),
        message: e.to_string(),
    })
}

/// The most frequent value; ties go to the smallest, so the result is stable.
fn most_common<T: Ord + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(item, _)| item)
}
