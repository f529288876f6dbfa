//! Adapters in mlx-lm's format: `adapters.safetensors` (mlx-lm parameter
//! names and shapes) and `adapter_config.json` (fine_tune_type, num_layers,
//! lora_parameters). They load in `mlx_lm.generate --adapter-path`, and ours
//! load mlx-lm's.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use mlx_rs::Array;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::lora::{AdapterParams, LoraSettings};
use crate::model::Decoder;

pub const WEIGHTS_FILE: &str = "adapters.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AdapterConfig {
    fine_tune_type: String,
    num_layers: usize,
    lora_parameters: LoraParameters,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LoraParameters {
    rank: i32,
    scale: f32,
    #[serde(default)]
    dropout: f32,
    #[serde(default)]
    keys: Option<Vec<String>>,
}

/// Writes both files into `dir` (created if need be), each atomically.
pub fn save(dir: &Path, params: &AdapterParams, settings: &LoraSettings) -> Result<(), TrainError> {
    let io = |what: &str, e: &dyn std::fmt::Display| TrainError::Io(format!("{}: {e}", dir.join(what).display()));
    std::fs::create_dir_all(dir).map_err(|e| io("", &e))?;
    let mut names: Vec<&Rc<str>> = params.keys().collect();
    names.sort();
    // MLX picks the format from the extension, so the temporary name keeps it.
    let temp = dir.join(format!(".tmp-{WEIGHTS_FILE}"));
    let metadata = HashMap::from([("format".to_owned(), "mlx".to_owned())]);
    Array::save_safetensors(names.iter().map(|n| (n.as_ref(), &params[*n])), &metadata, &temp).map_err(|e| io(WEIGHTS_FILE, &e))?;
    std::fs::rename(&temp, dir.join(WEIGHTS_FILE)).map_err(|e| io(WEIGHTS_FILE, &e))?;
    let config = AdapterConfig {
        fine_tune_type: if settings.dora { "dora" } else { "lora" }.to_owned(),
        num_layers: settings.num_layers,
        lora_parameters: LoraParameters {
            rank: settings.rank,
            scale: settings.scale,
            dropout: settings.dropout,
            keys: Some(settings.keys.clone()),
        },
    };
    let text = serde_json::to_string_pretty(&config).map_err(|e| io(CONFIG_FILE, &e))? + "\n";
    crate::durable::write_atomically(&dir.join(format!(".{CONFIG_FILE}.tmp")), &dir.join(CONFIG_FILE), text.as_bytes(), "adapter-config-write")
        .map_err(|e| io(CONFIG_FILE, &e))
}

/// Reads an adapter directory (ours or mlx-lm's) and checks it against `decoder`.
pub fn load(dir: &Path, decoder: &Decoder) -> Result<(AdapterParams, LoraSettings), TrainError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| TrainError::Adapter(format!("{}: {e}", config_path.display())))?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| TrainError::Adapter(format!("{}: {e}", config_path.display())))?;
    let dora = match config.fine_tune_type.as_str() {
        "lora" => false,
        "dora" => true,
        other => return Err(TrainError::Adapter(format!("{}: fine_tune_type `{other}` is not supported (lora, dora)", config_path.display()))),
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    let arrays = Array::load_safetensors(&weights_path).map_err(|e| TrainError::Adapter(format!("{}: {e}", weights_path.display())))?;
    let params: AdapterParams = arrays.into_iter().map(|(k, v)| (Rc::from(k.as_str()), v)).collect();
    let keys = match config.lora_parameters.keys {
        Some(keys) => keys,
        // mlx-lm's default: every projection of the block.
        None => decoder
            .linears()
            .into_iter()
            .filter_map(|(path, _)| path.strip_prefix("model.layers.0.").map(str::to_owned))
            .collect(),
    };
    let settings = LoraSettings {
        dora,
        num_layers: config.num_layers,
        rank: config.lora_parameters.rank,
        scale: config.lora_parameters.scale,
        dropout: config.lora_parameters.dropout,
        keys,
    };
    // The shapes a fresh adapter of these settings has on this model.
    let expected = settings.init(decoder, 0).map_err(|e| TrainError::Adapter(format!("{} does not fit this model: {e}", dir.display())))?;
    check_compatible(&expected, &params).map_err(|e| TrainError::Adapter(format!("{} does not match this model: {e}", dir.display())))?;
    Ok((params, settings))
}

/// Same names, shapes and dtypes: adapters that can replace one another.
pub fn check_compatible(current: &AdapterParams, new: &AdapterParams) -> Result<(), TrainError> {
    for (name, array) in current {
        let Some(other) = new.get(name) else {
            return Err(TrainError::Adapter(format!("tensor `{name}` is missing")));
        };
        if other.shape() != array.shape() || other.dtype() != array.dtype() {
            return Err(TrainError::Adapter(format!(
                "tensor `{name}` is {:?} {:?}, expected {:?} {:?}",
                other.dtype(),
                other.shape(),
                array.dtype(),
                array.shape()
            )));
        }
    }
    if let Some(extra) = new.keys().find(|k| !current.contains_key(*k)) {
        return Err(TrainError::Adapter(format!("unexpected tensor `{extra}`")));
    }
    Ok(())
}
