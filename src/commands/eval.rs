//! `blossom-p2p eval`: loss and perplexity on the test split (the validation
//! split when there is no test split), and exact match on the built-in task.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::model::{LoadOptions, load_model};
use crate::train::lora::LoraSettings;
use crate::train::metrics::exact_match_rate;
use crate::train::{LocalTrainer, MlxTrainer, TrainError, adapters};

use super::args::{DataArgs, ModelArgs, QuantArgs};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// An mlx-lm adapter directory to evaluate (default: the base model alone).
    #[arg(long, value_name = "DIR")]
    pub adapter_path: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Rows of the test split to use (0 = all).
    #[arg(long, default_value_t = 0)]
    pub rows: u64,
}

impl EvalArgs {
    pub fn apply(&self, config: &mut Config) {
        self.model.apply(config);
        self.data.apply(config);
    }
}

pub fn run(config: &Config, args: &EvalArgs) -> ExitCode {
    match evaluate(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => super::train::train_error_exit("evaluation failed", &err),
    }
}

fn evaluate(config: &Config, args: &EvalArgs) -> Result<(), TrainError> {
    let dataset = crate::train::load_data(config)?;
    let loaded = load_model(&config.model.source, &LoadOptions { quant: args.quant.quant })?;
    let adapter = match &args.adapter_path {
        Some(dir) => Some(adapters::load(dir, &loaded.decoder)?),
        None => None,
    };
    let with_adapter = adapter.is_some();
    let settings = match &adapter {
        Some((_, settings)) => settings.clone(),
        // The base model: a fresh adapter has B = 0 and changes nothing (for
        // DoRA too, m being the row norms of W); fit it to the model's depth.
        None => {
            let mut settings = LoraSettings::from_config(&config.lora);
            settings.num_layers = settings.num_layers.min(loaded.decoder.num_layers());
            settings
        }
    };
    let mut trainer = MlxTrainer::new(loaded.decoder, loaded.tokenizer, settings, config.train.clone(), 1)?;
    if let Some((params, _)) = adapter {
        trainer.set_adapter(params)?;
    }
    let (split, rows) = if dataset.test.is_empty() { ("valid", &dataset.valid) } else { ("test", &dataset.test) };
    let rows = if args.rows == 0 { &rows[..] } else { &rows[..(args.rows as usize).min(rows.len())] };
    if rows.is_empty() {
        return Err(TrainError::Data(format!("{} has no held-out rows to evaluate", dataset.name)));
    }
    let report = trainer.evaluate(rows)?;
    println!("{split}: {} rows, {} tokens, loss {:.4}, perplexity {:.3}", rows.len(), report.tokens, report.loss, report.perplexity());
    if config.data.dataset == "builtin" {
        let adapter = with_adapter.then_some((&trainer.params, &trainer.settings));
        let rate = exact_match_rate(&trainer.decoder, &trainer.tokenizer, adapter, rows)?;
        println!("exact match: {:.1}%", rate * 100.0);
    }
    Ok(())
}
