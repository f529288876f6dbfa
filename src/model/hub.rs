//! `hf:org/name[@revision]`: models from the Hugging Face Hub through the
//! standard cache (`HF_HOME`, or `HF_HUB_CACHE`), shared with Python tools.
//! With `HF_HUB_OFFLINE=1` only the cache is used, and a model that is not
//! there is a clear error instead of a network timeout.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use super::ModelError;

/// Files a model folder may have besides the weights.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["tokenizer_config.json", "chat_template.jinja", "generation_config.json"];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Parses `org/name[@revision]` (after `hf:`).
pub fn parse_spec(spec: &str) -> Result<(String, String), ModelError> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, revision)) if !revision.is_empty() => (id, revision),
        Some(_) => return Err(ModelError::BadInput(format!("hf:{spec}: empty revision after `@`"))),
        None => (spec, "main"),
    };
    let valid = |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && part != ".." && part != ".";
    match id.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) => Ok((id.to_owned(), revision.to_owned())),
        _ => Err(ModelError::BadInput(format!("hf:{spec}: expected hf:org/name or hf:org/name@revision"))),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(path) => Cache::new(PathBuf::from(path)),
        None => Cache::from_env(),
    }
}

/// The local folder (a snapshot in the Hugging Face cache) holding the model,
/// downloading what is missing unless offline.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let (id, revision) = parse_spec(spec)?;
    let repo = Repo::with_revision(id.clone(), RepoType::Model, revision.clone());
    let cache = cache();
    let cached = cache.repo(repo.clone());
    let err = |message: String| ModelError::Load {
        path: format!("hf:{spec}"),
        message,
    };
    if offline() {
        let config = cached.get("config.json").ok_or_else(|| {
            err(format!(
                "not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; download it once online (unset HF_HUB_OFFLINE) or pass a local folder",
                cache.path().display()
            ))
        })?;
        let dir = snapshot_dir(&config)?;
        for file in REQUIRED {
            if cached.get(file).is_none() {
                return Err(err(format!("the cached snapshot {} lacks {file}", dir.display())));
            }
        }
        if cached.get(INDEX).is_none() && cached.get(SINGLE).is_none() {
            return Err(err(format!("the cached snapshot {} has no {SINGLE} or {INDEX}", dir.display())));
        }
        return Ok(dir);
    }
    let api = ApiBuilder::from_env()
        .with_cache_dir(cache.path().clone())
        .with_progress(true)
        .build()
        .map_err(|e| err(format!("cannot reach the Hugging Face Hub: {e}")))?;
    let remote = api.repo(repo);
    let fetch = |file: &str| remote.get(file).map_err(|e| err(format!("{file}: {e} (set HF_HUB_OFFLINE=1 to use only the cache)")));
    let config = fetch("config.json")?;
    for file in &REQUIRED[1..] {
        fetch(file)?;
    }
    for file in OPTIONAL {
        // Absent on many models; a real failure shows up when loading.
        let _ = remote.get(file);
    }
    match remote.get(INDEX) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| err(format!("{INDEX}: {e}")))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("{INDEX}: {e}")))?;
            let mut shards: Vec<&str> = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| err(format!("{INDEX} has no weight_map")))?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                fetch(shard)?;
            }
        }
        Err(_) => {
            fetch(SINGLE)?;
        }
    }
    snapshot_dir(&config)
}

fn snapshot_dir(config: &Path) -> Result<PathBuf, ModelError> {
    config.parent().map(Path::to_path_buf).ok_or_else(|| ModelError::Load {
        path: config.display().to_string(),
        message: "has no parent folder".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_rejected() {
        assert_eq!(parse_spec("org/name").unwrap(), ("org/name".into(), "main".into()));
        assert_eq!(parse_spec("org/name@v1.0").unwrap(), ("org/name".into(), "v1.0".into()));
        for bad in ["name", "org/", "/name", "org/name@", "org/../x", "a/b/c", "org/na me"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}
