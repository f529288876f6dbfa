//! `blossom-p2p bench …`: figures measured side by side in one run, so the
//! ratios hold even on a noisy shared machine.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::data::{Row, Sample};
use crate::model::generate::measure_speed;
use crate::model::{LoadOptions, QuantMode, load_model};
use crate::train::lora::LoraSettings;
use crate::train::{LocalTrainer, MlxTrainer, TrainError, TrainReport};

use super::args::{DataArgs, ModelArgs, QuantArgs};
use super::model_error_exit;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prompt and generation tokens/s and peak memory: quantized weights, and
    /// dequantized to float32 (on CPU), in one run.
    Generate(BenchGenerateArgs),
    /// Training tokens/s, step time and peak memory (LoRA settings from the config).
    Train(BenchTrainArgs),
    /// Time and wire bytes for an adapter to reach every node of a loopback network.
    Gossip(super::bench_gossip::BenchGossipArgs),
    /// Bytes per node per round from 4 to 256 simulated nodes, each exchange
    /// against a Flower client, as a table and a log-log plot.
    Traffic(super::bench_traffic::BenchTrafficArgs),
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Tokens a row when generating the rows.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..=65536))]
    pub seq_len: u32,
    /// Timed steps (after two warm-up steps and one step of each batch
    /// shape an epoch holds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub steps: u64,
    /// Also print where a step's time goes: data, forward, backward,
    /// optimizer (the forward pass is timed once more on its own, op by op,
    /// so under `train.compile` the forward/backward split is approximate).
    #[arg(long)]
    pub profile: bool,
    /// Also run the steps op by op (`train.compile = false`), alternating
    /// step by step with the configured trainer on the same batches, and
    /// print the ratio of the two: measured side by side, so a busy
    /// machine slows both alike. Short for `--against train.compile=false`.
    #[arg(long, conflicts_with = "against")]
    pub against_uncompiled: bool,
    /// Also run the steps with this one setting changed (`SECTION.KEY=VALUE`,
    /// as `--set` takes it, e.g. `train.pipeline=false`), alternating with
    /// the configured trainer in blocks of `--block` steps on the same
    /// batches, and print the ratio of the two.
    #[arg(long, value_name = "SECTION.KEY=VALUE")]
    pub against: Option<String>,
    /// Steps a block when alternating (`--against`): 1 interleaves step by
    /// step; more lets a pipelined trainer queue steps ahead.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub block: u64,
    /// Instead, measure tokens/s and peak memory at each of these batch
    /// sizes in turn (e.g. `1,2,4,8,16,32`), on the same rows: the batch
    /// that fills the device is where tokens/s stops growing.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["against", "against_uncompiled", "profile"], value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_sizes: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub prompt_tokens: u32,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub max_tokens: u32,
    /// Timed runs per variant (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeats: u32,
}

impl BenchCommand {
    pub fn apply(&self, config: &mut Config) {
        match self {
            BenchCommand::Generate(args) => args.model.apply(config),
            BenchCommand::Train(args) => {
                args.model.apply(config);
                args.data.apply(config);
            }
            BenchCommand::Gossip(_) => {}
            BenchCommand::Traffic(args) => args.apply(config),
        }
    }

    pub fn run(&self, config: &Config) -> ExitCode {
        match self {
            BenchCommand::Generate(args) => bench_generate(config, args),
            BenchCommand::Train(args) => bench_train(config, args),
            BenchCommand::Gossip(args) => super::bench_gossip::bench_gossip(args),
            BenchCommand::Traffic(args) => super::bench_traffic::bench_traffic(config, args),
        }
    }
}

/// One measured variant of the model.
struct Figures {
    label: &'static str,
    prompt_tps: f64,
    generation_tps: f64,
    peak_bytes: usize,
}

pub fn bench_generate(config: &Config, args: &BenchGenerateArgs) -> ExitCode {
    let source = &config.model.source;
    let mut rows = Vec::new();
    for (label, quant) in [("as stored", QuantMode::Keep), ("float32", QuantMode::Dequantize)] {
        let _ = mlx_rs::memory::clear_cache();
        let _ = mlx_rs::memory::reset_peak_memory();
        let loaded = match load_model(source, &LoadOptions { quant }) {
            Ok(loaded) => loaded,
            Err(err) => return model_error_exit(&format!("cannot load model {source}"), &err),
        };
        if quant == QuantMode::Keep && !loaded.decoder.is_quantized() && !loaded.decoder.has_half_precision() {
            eprintln!("note: {source} has float32 weights; only the float32 row is measured");
            continue;
        }
        match measure_speed(&loaded.decoder, &loaded.tokenizer, args.prompt_tokens, args.max_tokens, args.repeats) {
            Ok((prompt_tps, generation_tps)) => rows.push(Figures {
                label,
                prompt_tps,
                generation_tps,
                peak_bytes: mlx_rs::memory::peak_memory().unwrap_or(0),
            }),
            Err(err) => return model_error_exit("benchmark run failed", &err),
        }
    }
    println!(
        "bench generate: {source}, device {}, prompt {} tokens, {} generated, median of {}",
        crate::mlx_env::backend().name(),
        args.prompt_tokens,
        args.max_tokens,
        args.repeats
    );
    println!("{:<24} {:>14} {:>14} {:>14}", "weights", "prompt tok/s", "gen tok/s", "peak MLX MB");
    for row in &rows {
        println!(
            "{:<24} {:>14.1} {:>14.1} {:>14.1}",
            row.label,
            row.prompt_tps,
            row.generation_tps,
            row.peak_bytes as f64 / 1e6
        );
    }
    if let [stored, float] = rows.as_slice() {
        println!(
            "float32 / as stored: prompt {:.2}x, generation {:.2}x, peak memory {:.2}x",
            float.prompt_tps / stored.prompt_tps,
            float.generation_tps / stored.generation_tps,
            float.peak_bytes as f64 / stored.peak_bytes.max(1) as f64
        );
    }
    if let (_, Some(peak)) = crate::simulation::memory_mb() {
        println!("process peak RSS: {peak:.1} MB");
    }
    ExitCode::SUCCESS
}

/// Two steps, then one of every batch shape an epoch of `rows` holds, so
/// that no trace (and on a GPU no kernel build) falls inside the timed
/// steps (in `bench/compare_mlx_lm.sh`, mlx_lm's timed steps, its second
/// report, follow as many untimed ones, which meet its shapes). Returns
/// the shapes traced.
fn warm_up(trainer: &mut MlxTrainer, rows: &[Row]) -> Result<usize, TrainError> {
    trainer.train_steps(rows, 2, 0)?;
    trainer.trace_every_shape(rows)
}

/// Tokens/s, step time and peak memory at each of `args.batch_sizes`, one
/// trainer after another on the same model and rows (each warmed up
/// first).
fn batch_sweep(loaded: &crate::model::LoadedModel, settings: &LoraSettings, train_config: &crate::config::TrainConfig, rows: &[Row], args: &BenchTrainArgs) -> Result<(), TrainError> {
    println!(
        "bench train: {}, device {}, {} (rank {}, {} layers), seq len {}, {} steps a batch size",
        loaded.source,
        crate::mlx_env::backend().name(),
        if settings.dora { "DoRA" } else { "LoRA" },
        settings.rank,
        settings.num_layers,
        train_config.max_seq_length,
        args.steps
    );
    println!("{:>6} {:>12} {:>10} {:>10} {:>9}", "batch", "train tok/s", "step s", "peak MB", "padding");
    let mut fastest: Option<(u32, f64)> = None;
    for &batch_size in &args.batch_sizes {
        let _ = mlx_rs::memory::clear_cache();
        let _ = mlx_rs::memory::reset_peak_memory();
        let mut config = train_config.clone();
        config.batch_size = batch_size;
        let mut trainer = MlxTrainer::new(loaded.decoder.clone(), loaded.tokenizer.clone(), settings.clone(), config, args.steps + 2)?;
        warm_up(&mut trainer, rows)?;
        let report = trainer.train_steps(rows, args.steps, 2)?;
        let seconds = report.elapsed.as_secs_f64().max(1e-9);
        let rate = report.processed_tokens as f64 / seconds;
        println!(
            "{batch_size:>6} {rate:>12.1} {:>10.3} {:>10.1} {:>8.1}%",
            seconds / report.steps.max(1) as f64,
            mlx_rs::memory::peak_memory().unwrap_or(0) as f64 / 1e6,
            100.0 * (1.0 - report.processed_tokens as f64 / report.computed_tokens.max(1) as f64)
        );
        if fastest.is_none_or(|(_, best)| rate > best) {
            fastest = Some((batch_size, rate));
        }
    }
    if let Some((batch_size, rate)) = fastest {
        println!("fastest: batch {batch_size} ({rate:.1} train tok/s)");
    }
    Ok(())
}

pub fn bench_train(config: &Config, args: &BenchTrainArgs) -> ExitCode {
    match train_figures(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: training benchmark failed: {err}");
            ExitCode::from(2)
        }
    }
}

fn train_figures(config: &Config, args: &BenchTrainArgs) -> Result<(), TrainError> {
    let source = &config.model.source;
    let _ = mlx_rs::memory::clear_cache();
    let _ = mlx_rs::memory::reset_peak_memory();
    let loaded = load_model(source, &LoadOptions { quant: args.quant.quant })?;
    let rows: Vec<Row> = match &args.data.data {
        Some(_) => crate::train::load_data(config)?.train,
        None => {
            // Text rows of about seq_len tokens: repeated prose, truncated by max_seq_length.
            let text = "The river carried the small boat past fields of wheat and old stone houses, while the sun rose over the hills. ";
            let per_copy = loaded.tokenizer.encode(text, false)?.len().max(1);
            let copies = args.seq_len as usize / per_copy + 2;
            (0..64)
                .map(|i| Row {
                    index: i,
                    sample: Sample::Text {
                        text: format!("{i}. {}", text.repeat(copies)),
                    },
                })
                .collect()
        }
    };
    let mut train_config = config.train.clone();
    if args.data.data.is_none() {
        train_config.max_seq_length = args.seq_len;
    }
    let settings = LoraSettings::from_config(&config.lora);
    if !args.batch_sizes.is_empty() {
        return batch_sweep(&loaded, &settings, &train_config, &rows, args);
    }
    let against = match (&args.against, args.against_uncompiled) {
        (Some(setting), _) => Some(setting.as_str()),
        (None, true) => Some("train.compile=false"),
        (None, false) => None,
    };
    let mut other = match against {
        Some(setting) => {
            let changed = config.with_override(setting).map_err(|err| TrainError::Settings(format!("--against {setting}: {err}")))?;
            if changed.lora != config.lora {
                return Err(TrainError::Settings(format!("--against {setting}: only settings outside [lora] can change (both trainers train the same adapter shape)")));
            }
            let mut changed_train = changed.train;
            changed_train.max_seq_length = train_config.max_seq_length;
            Some((setting, MlxTrainer::new(loaded.decoder.clone(), loaded.tokenizer.clone(), settings.clone(), changed_train, args.steps + 2)?))
        }
        None => None,
    };
    let mut trainer = MlxTrainer::new(loaded.decoder, loaded.tokenizer, settings.clone(), train_config.clone(), args.steps + 2)?;
    let shapes = warm_up(&mut trainer, &rows)?;
    let report = match &mut other {
        None => trainer.train_steps(&rows, args.steps, 2)?,
        Some((setting, other)) => {
            warm_up(other, &rows)?;
            let (mut ours, mut theirs) = (TrainReport::default(), TrainReport::default());
            let mut step = 2;
            while step < 2 + args.steps {
                let block = args.block.min(2 + args.steps - step);
                ours.absorb(trainer.train_steps(&rows, block, step)?);
                theirs.absorb(other.train_steps(&rows, block, step)?);
                step += block;
            }
            let rate = |r: &TrainReport| r.processed_tokens as f64 / r.elapsed.as_secs_f64().max(1e-9);
            println!(
                "configured {:.1} tok/s, with {setting} {:.1} tok/s, alternating in blocks of {} steps: {:.2}x (loss {:.4} vs {:.4})",
                rate(&ours),
                rate(&theirs),
                args.block,
                rate(&ours) / rate(&theirs).max(1e-9),
                ours.loss,
                theirs.loss
            );
            ours
        }
    };
    let peak = mlx_rs::memory::peak_memory().unwrap_or(0) as f64 / 1e6;
    let seconds = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "bench train: {source}, device {}, {} (rank {}, scale {}, {} layers, keys {:?}), batch {}, seq len {}, {} steps",
        crate::mlx_env::backend().name(),
        if settings.dora { "DoRA" } else { "LoRA" },
        settings.rank,
        settings.scale,
        settings.num_layers,
        settings.keys,
        train_config.batch_size,
        train_config.max_seq_length,
        report.steps
    );
    println!("step time: {:.3} s", seconds / report.steps as f64);
    println!("trained tokens/s: {:.1}", report.tokens as f64 / seconds);
    println!("peak memory: {peak:.1} MB");
    println!("train tok/s: {:.1}", report.processed_tokens as f64 / seconds);
    println!("loss: {:.4} (mean of the timed steps)", report.loss);
    let padding = 1.0 - report.processed_tokens as f64 / report.computed_tokens.max(1) as f64;
    println!("padding: {:.1}% of the positions computed", 100.0 * padding);
    if train_config.compile {
        println!(
            "traced shapes: {} (the compiled step traces each batch shape once: train.pad_to; {shapes} an epoch, traced before the clock started)",
            trainer.traced_shapes()
        );
    }
    if report.streams > 1 {
        println!("cpu streams: {} (a batch's rows, or a long row's positions, split over them: train.cpu_streams)", report.streams);
    }
    // The compute limit, measured now under the same load as the steps.
    let mean_len = report.processed_tokens as f64 / report.examples.max(1) as f64;
    let flops = crate::train::flops::per_token(&trainer.decoder, &settings, mean_len.round() as usize);
    let achieved = flops * report.processed_tokens as f64 / seconds / 1e9;
    match crate::mlx_env::matmul_limit(mlx_rs::Dtype::Float32) {
        Ok(limit) => println!(
            "compute: {:.0} MFLOP a token, {achieved:.1} GFLOP/s, {:.0}% of the {:.1} GFLOP/s matmul limit",
            flops / 1e6,
            100.0 * achieved / limit.gflops,
            limit.gflops
        ),
        Err(err) => println!("compute: {:.0} MFLOP a token, {achieved:.1} GFLOP/s (matmul limit not measured: {err:#})", flops / 1e6),
    }
    if args.profile {
        let accumulation = u64::from(train_config.grad_accumulation_steps.max(1));
        let forward = trainer.time_forward(&rows, 2 * accumulation..(2 + args.steps) * accumulation)?;
        let phases = report.phases;
        let backward = phases.forward_backward.saturating_sub(forward);
        let other = report.elapsed.saturating_sub(phases.data + phases.forward_backward + phases.optimizer);
        for (name, time) in [("data", phases.data), ("forward", forward), ("backward", backward), ("optimizer", phases.optimizer), ("other", other)] {
            println!(
                "profile {name}: {:.3} s a step, {:.1}%",
                time.as_secs_f64() / report.steps as f64,
                100.0 * time.as_secs_f64() / seconds
            );
        }
        if phases.queuing > Duration::ZERO {
            // Pipelined steps (train.pipeline): the host builds and queues
            // step n + 1 while the device computes step n.
            for (name, time) in [("host queuing steps", phases.queuing), ("waiting for the device", phases.waiting)] {
                println!(
                    "profile {name}: {:.3} s a step, {:.1}% (of forward and backward)",
                    time.as_secs_f64() / report.steps as f64,
                    100.0 * time.as_secs_f64() / phases.forward_backward.as_secs_f64().max(1e-9)
                );
            }
        }
    }
    Ok(())
}
