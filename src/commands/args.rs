//! Flags that several commands share: which base model, which data set, and
//! how to hold quantized weights. Every command that loads a model takes
//! `--model`, every command that loads data takes `--data`, with the same
//! meaning and the same defaults (the configuration's `model.source` and
//! `data.dataset`).

use clap::Args;

use crate::config::Config;
use crate::model::QuantMode;

/// Which base model to load.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face / mlx-lm folder, `hf:org/name`, or
    /// `tiny[:SEED]` (default: model.source, the embedded SmolLM2-135M-Instruct).
    #[arg(long, value_name = "PATH|hf:ORG/NAME|tiny")]
    pub model: Option<String>,
}

/// Which data set to load.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// `builtin` (the word-reversal task), a folder of jsonl or Parquet files,
    /// or `hf:org/name` (a Hub data set) (default: data.dataset; for
    /// `bench train`, generated rows of --seq-len tokens).
    #[arg(long, value_name = "builtin|DIR|hf:ORG/NAME")]
    pub data: Option<String>,
}

/// How to hold quantized and half-precision weights.
#[derive(Debug, Args)]
pub struct QuantArgs {
    /// `auto` makes quantized, float16 and bfloat16 weights float32 on CPU
    /// when memory allows (much faster there) and keeps them as they are on
    /// Metal/CUDA.
    #[arg(long, value_enum, default_value_t = QuantMode::Auto)]
    pub quant: QuantMode,
}

impl ModelArgs {
    pub fn apply(&self, config: &mut Config) {
        if let Some(model) = &self.model {
            config.model.source = model.clone();
        }
    }
}

impl DataArgs {
    pub fn apply(&self, config: &mut Config) {
        if let Some(data) = &self.data {
            config.data.dataset = data.clone();
        }
    }
}
