//! Training data: the mlx-lm row formats in jsonl or Parquet files, where a
//! data set's splits are (`layout`), prompt templates, the built-in
//! task, and what every node must agree on: a stable index for each row and
//! a fingerprint of the whole data set. Knows nothing of models or training.

pub mod builtin;
pub mod jsonl;
pub mod layout;
pub mod parquet;
pub mod template;

use serde::Serialize;

use crate::model::chat::ChatMessage;

/// One example, in one of mlx-lm's formats.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Sample {
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat; the last
    /// assistant turn is the completion.
    Messages { messages: Vec<ChatMessage> },
    /// `{"prompt": ..., "completion": ...}`.
    PromptCompletion { prompt: String, completion: String },
    /// `{"text": ...}`: plain text, all of it trained on.
    Text { text: String },
    /// Any row rendered by a prompt template (`data.template`, e.g. Alpaca's
    /// instruction/input/output): used as it is, without the chat template.
    Templated { templated_prompt: String, completion: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Stable across nodes and runs: the row's position in its split file
    /// (train rows first, then valid, then test, for the built-in task).
    pub index: u64,
    pub sample: Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub train: Vec<Row>,
    pub valid: Vec<Row>,
    pub test: Vec<Row>,
    /// blake3 of the canonical JSON of every row of every split, in order.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}:{line}: {message}")]
    BadRow { file: String, line: usize, message: String },
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("data set {0}")]
    Invalid(String),
    #[error("prompt template: {0}")]
    Template(String),
}

impl Dataset {
    pub fn new(name: String, train: Vec<Row>, valid: Vec<Row>, test: Vec<Row>) -> Result<Self, DataError> {
        if train.is_empty() {
            return Err(DataError::Invalid(format!("`{name}` has no training rows")));
        }
        let mut hasher = blake3::Hasher::new();
        for (split, rows) in [("train", &train), ("valid", &valid), ("test", &test)] {
            hasher.update(split.as_bytes());
            for row in rows {
                let json = serde_json::to_vec(&row.sample).map_err(|e| DataError::Invalid(e.to_string()))?;
                hasher.update(&row.index.to_le_bytes());
                hasher.update(&(json.len() as u64).to_le_bytes());
                hasher.update(&json);
            }
        }
        Ok(Self {
            name,
            train,
            valid,
            test,
            fingerprint: hasher.finalize().to_hex().to_string(),
        })
    }

    pub fn split(&self, split: Split) -> &[Row] {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }
}

/// Resolves `data.dataset`: `builtin`, a local folder, or
/// `hf:org/name[@revision]` (a Hub data set), each in one of the layouts
/// `layout` describes (jsonl or Parquet). Rows go through `template` when
/// one is given.
pub fn load_dataset(source: &str, seed: u64, template: Option<&template::PromptTemplate>) -> Result<Dataset, DataError> {
    if source == "builtin" {
        return builtin::dataset(seed);
    }
    if let Some(spec) = source.strip_prefix("hf:") {
        let hub = |e: crate::hub::HubError| DataError::Read {
            path: format!("hf:{}", e.spec),
            message: e.message,
        };
        let repo = crate::hub::HubRepo::open(spec, crate::hub::RepoType::Dataset).map_err(hub)?;
        let layout = layout::Layout::find(&repo.files().map_err(hub)?).map_err(|message| DataError::Read {
            path: source.to_owned(),
            message,
        })?;
        return layout::load(source, &layout, |file| repo.get(file).map_err(hub), template);
    }
    layout::load_folder(std::path::Path::new(source), template)
}
