//! Models from the Hugging Face Hub (`hf:org/name[@revision]`): the files of
//! a model folder, fetched through the shared cache (see `crate::hub`).

use std::path::{Path, PathBuf};

use super::ModelError;
use crate::hub::{HubError, HubRepo, RepoType};

const OPTIONAL: &[&str] = &["tokenizer_config.json", "chat_template.jinja", "generation_config.json"];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

impl From<HubError> for ModelError {
    fn from(err: HubError) -> Self {
        ModelError::Load {
            path: format!("hf:{}", err.spec),
            message: err.message,
        }
    }
}

/// The local folder (a snapshot in the Hugging Face cache) holding the model.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let repo = HubRepo::open(spec, RepoType::Model)?;
    let config = repo.get("config.json")?;
    repo.get("tokenizer.json")?;
    for file in OPTIONAL {
        // Absent on many models; a real failure shows up when loading.
        let _ = repo.get_optional(file);
    }
    match repo.get_optional(INDEX) {
        Some(index) => {
            let bad = |message: String| ModelError::Load {
                path: format!("hf:{spec}"),
                message,
            };
            let text = std::fs::read_to_string(&index).map_err(|e| bad(format!("{INDEX}: {e}")))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("{INDEX}: {e}")))?;
            let mut shards: Vec<&str> = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad(format!("{INDEX} has no weight_map")))?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard)?;
            }
        }
        None => {
            repo.get(SINGLE)?;
        }
    }
    config.parent().map(Path::to_path_buf).ok_or_else(|| ModelError::Load {
        path: config.display().to_string(),
        message: "has no parent folder".into(),
    })
}
