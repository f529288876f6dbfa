//! `blossom-p2p train`: LoRA/DoRA fine-tuning on one machine, with a progress
//! bar, periodic validation, metrics JSONL, resumable checkpoints, and (on
//! the built-in task) exact match before and after.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::config::Config;
use crate::model::{LoadOptions, load_model};
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::lora::LoraSettings;
use crate::train::metrics::exact_match_rate;
use crate::train::{LocalTrainer, MlxTrainer, TrainError, adapters};

use super::args::{DataArgs, ModelArgs, QuantArgs};

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write adapters.safetensors, adapter_config.json, checkpoints and metrics.jsonl.
    #[arg(long, value_name = "DIR", default_value = "adapters")]
    pub adapter_path: PathBuf,
    /// Number of optimizer steps.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: u64,
    /// Evaluate on the validation rows every N steps.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps_per_eval: u64,
    /// Validation rows used for each evaluation.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub val_rows: u64,
    /// Write a resumable checkpoint every N steps.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub save_every: u64,
    /// Continue from the checkpoint in --adapter-path, if there is one.
    #[arg(long)]
    pub resume: bool,
    /// Held-out rows for the exact-match check before and after training (built-in task; 0 skips it).
    #[arg(long, default_value_t = 50)]
    pub exact_match_rows: u64,
}

impl TrainArgs {
    pub fn apply(&self, config: &mut Config) {
        self.model.apply(config);
        self.data.apply(config);
    }
}

/// Bad input (settings, data, files) is exit code 2; a failure while running is 1.
pub(crate) fn train_error_exit(context: &str, err: &TrainError) -> ExitCode {
    eprintln!("error: {context}: {err}");
    match err {
        TrainError::Mlx(_) | TrainError::Io(_) => ExitCode::FAILURE,
        _ => ExitCode::from(2),
    }
}

pub fn run(config: &Config, args: &TrainArgs) -> ExitCode {
    match train(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => train_error_exit("training failed", &err),
    }
}

fn train(config: &Config, args: &TrainArgs) -> Result<(), TrainError> {
    let dataset = crate::train::load_data(config)?;
    let loaded = load_model(&config.model.source, &LoadOptions { quant: args.quant.quant })?;
    tracing::info!(
        model = %config.model.source,
        data = %dataset.name,
        fingerprint = %&dataset.fingerprint[..16],
        train_rows = dataset.train.len(),
        "training"
    );
    let settings = LoraSettings::from_config(&config.lora);
    let mut trainer = MlxTrainer::new(loaded.decoder, loaded.tokenizer, settings, config.train.clone(), args.iters)?;
    let checkpoint_dir = args.adapter_path.join("checkpoint");
    let mut step = 0;
    if args.resume && let Some(state) = checkpoint::load(&checkpoint_dir, &mut trainer, &dataset.fingerprint)? {
        tracing::info!(step = state.step, "resumed from checkpoint");
        step = state.step;
    }
    let exact_rows = &dataset.test[..(args.exact_match_rows as usize).min(dataset.test.len())];
    let builtin = config.data.dataset == "builtin";
    if builtin && !exact_rows.is_empty() && step == 0 {
        let before = exact_match_rate(&trainer.decoder, &trainer.tokenizer, None, exact_rows)?;
        println!("exact match before training: {:.1}% of {} held-out rows", before * 100.0, exact_rows.len());
    }

    std::fs::create_dir_all(&args.adapter_path).map_err(|e| TrainError::Io(format!("{}: {e}", args.adapter_path.display())))?;
    let metrics_path = args.adapter_path.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", metrics_path.display())))?;
    let val_rows = &dataset.valid[..(args.val_rows as usize).min(dataset.valid.len())];

    let bar = ProgressBar::new(args.iters);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(step);
    let _ = mlx_rs::memory::reset_peak_memory();
    while step < args.iters {
        // Train up to the next evaluation or checkpoint boundary.
        let next = [args.iters, (step / args.steps_per_eval + 1) * args.steps_per_eval, (step / args.save_every + 1) * args.save_every]
            .into_iter()
            .min()
            .unwrap_or(args.iters);
        let chunk = next - step;
        let started = std::time::Instant::now();
        let mut done = 0;
        let mut report_loss = 0.0;
        let mut report_tokens = 0;
        let mut learning_rate = 0.0;
        // One step at a time, so the bar moves with each.
        while done < chunk {
            let report = trainer.train_steps(&dataset.train, 1, step + done)?;
            done += 1;
            report_loss += report.loss;
            report_tokens += report.tokens;
            learning_rate = report.last_learning_rate;
            let peak = mlx_rs::memory::peak_memory().unwrap_or(0) as f64 / 1e6;
            bar.set_message(format!(
                "loss {:.3} | {:.0} tok/s | lr {:.2e} | peak {:.0} MB",
                report.loss,
                report_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                learning_rate,
                peak
            ));
            bar.inc(1);
        }
        step = next;
        let mut record = json!({
            "step": step,
            "train_loss": report_loss / chunk as f32,
            "learning_rate": learning_rate,
            "tokens_per_sec": report_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            "peak_memory_mb": mlx_rs::memory::peak_memory().unwrap_or(0) as f64 / 1e6,
        });
        if (step % args.steps_per_eval == 0 || step == args.iters) && !val_rows.is_empty() {
            let eval = trainer.evaluate(val_rows)?;
            record["val_loss"] = json!(eval.loss);
            bar.suspend(|| println!("step {step}: train loss {:.3}, val loss {:.3}", report_loss / chunk as f32, eval.loss));
        }
        writeln!(metrics, "{record}").map_err(|e| TrainError::Io(format!("{}: {e}", metrics_path.display())))?;
        if step % args.save_every == 0 || step == args.iters {
            let state = CheckpointState {
                step,
                seed: config.train.seed,
                dataset: dataset.fingerprint.clone(),
            };
            checkpoint::save(&checkpoint_dir, &trainer, &state)?;
        }
    }
    bar.finish();
    adapters::save(&args.adapter_path, trainer.adapter(), &trainer.settings)?;
    println!("adapters saved to {}", args.adapter_path.display());
    if builtin && !exact_rows.is_empty() {
        let after = exact_match_rate(&trainer.decoder, &trainer.tokenizer, Some((trainer.adapter(), &trainer.settings)), exact_rows)?;
        println!("exact match after training: {:.1}% of {} held-out rows", after * 100.0, exact_rows.len());
    }
    print_done(&args.adapter_path);
    Ok(())
}

fn print_done(dir: &Path) {
    println!("try: blossom-p2p generate --adapter-path {} --prompt \"Reverse the order of these words: apple river stone\"", dir.display());
}
