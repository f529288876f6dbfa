//! Resumable training: the adapter, the optimizer state and the step, written
//! atomically every N steps. Batch order and dropout masks are pure functions
//! of (seed, step), so the step is all the RNG state there is.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use mlx_rs::Array;
use serde::{Deserialize, Serialize};

use super::{LocalTrainer, MlxTrainer, TrainError, adapters};

const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Steps done; training resumes at this global step.
    pub step: u64,
    pub seed: u64,
    /// The data set's fingerprint: resuming on other data is refused.
    pub dataset: String,
}

pub fn save(dir: &Path, trainer: &MlxTrainer, state: &CheckpointState) -> Result<(), TrainError> {
    let io = |e: &dyn std::fmt::Display| TrainError::Io(format!("checkpoint {}: {e}", dir.display()));
    adapters::save(dir, trainer.adapter(), &trainer.settings)?;
    let mut names: Vec<&Rc<str>> = trainer.optimizer.state.keys().collect();
    names.sort();
    let temp = dir.join(format!(".tmp-{OPTIMIZER_FILE}"));
    if names.is_empty() {
        // SGD has no state; an empty file keeps the layout uniform.
        std::fs::write(&temp, b"").map_err(|e| io(&e))?;
    } else {
        Array::save_safetensors(names.iter().map(|n| (n.as_ref(), &trainer.optimizer.state[*n])), None, &temp).map_err(|e| io(&e))?;
    }
    std::fs::rename(&temp, dir.join(OPTIMIZER_FILE)).map_err(|e| io(&e))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| io(&e))?;
    crate::durable::write_atomically(&dir.join(format!(".{STATE_FILE}.tmp")), &dir.join(STATE_FILE), text.as_bytes(), "train-checkpoint-write").map_err(|e| io(&e))
}

/// Loads a checkpoint into `trainer`; `None` when `dir` holds none.
pub fn load(dir: &Path, trainer: &mut MlxTrainer, dataset: &str) -> Result<Option<CheckpointState>, TrainError> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.exists() {
        return Ok(None);
    }
    let bad = |e: &dyn std::fmt::Display| TrainError::Io(format!("checkpoint {}: {e}", dir.display()));
    let text = std::fs::read_to_string(&state_path).map_err(|e| bad(&e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| bad(&e))?;
    if state.dataset != dataset {
        return Err(TrainError::Data(format!(
            "checkpoint {} was made on another data set (fingerprint {}); start a fresh run or remove it",
            dir.display(),
            state.dataset
        )));
    }
    let (params, _) = adapters::load(dir, &trainer.decoder)?;
    trainer.set_adapter(params)?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let empty = std::fs::metadata(&optimizer_path).map(|m| m.len() == 0).map_err(|e| bad(&e))?;
    trainer.optimizer.state = if empty {
        HashMap::new()
    } else {
        Array::load_safetensors(&optimizer_path)
            .map_err(|e| bad(&e))?
            .into_iter()
            .map(|(k, v)| (Rc::from(k.as_str()), v))
            .collect()
    };
    Ok(Some(state))
}
