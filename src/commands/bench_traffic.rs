//! `blossom-p2p bench traffic`: bytes a node moves per round as the network
//! grows, for each exchange and compression, next to a Flower client's (its adapter up, the
//! average down), measured on the simulated links of whole simulations, each
//! in its own process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::config::{CompressionKind, Config, ExchangeMode};
use crate::plot::{Series, plot_scaling};
use crate::wire::compression::Compression;

use super::args::ModelArgs;

#[derive(Debug, Args)]
pub struct BenchTrafficArgs {
    /// Network sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4, 8, 16, 32, 64, 128, 256], value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub nodes: Vec<u32>,
    /// Rounds of each simulation.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Exchanges to compare (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![ExchangeMode::Gossip, ExchangeMode::Reduce])]
    pub exchange: Vec<ExchangeMode>,
    /// Compressions to compare (comma-separated: none, fp16, int8, topk; default:
    /// the configured `federation.compression`).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub compression: Vec<CompressionKind>,
    /// Largest network the gossip exchange runs at (every node receives every
    /// update: above a few tens of nodes it outgrows one machine); larger
    /// sizes run the other exchanges only.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub gossip_max_nodes: u32,
    /// Draw the table and the plot from the records in --output (an earlier
    /// run's, perhaps cut short) instead of simulating.
    #[arg(long)]
    pub replot: bool,
    /// Network scenario for every simulation (netsim/scenarios/*.toml).
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// The table as JSONL; the plot goes next to it as .svg.
    #[arg(long, value_name = "FILE", default_value = "bench-traffic.jsonl")]
    pub output: PathBuf,
    /// The model (default: the built-in tiny model, so that hundreds of nodes fit one machine).
    #[command(flatten)]
    pub model: ModelArgs,
}

impl BenchTrafficArgs {
    pub fn apply(&self, config: &mut Config) {
        config.model.source = self.model.model.clone().unwrap_or_else(|| "tiny".to_owned());
        if crate::model::tiny::is_tiny(&config.model.source) {
            // The tiny model has fewer blocks than the default adapts.
            let blocks = crate::model::tiny::tiny_args().num_hidden_layers;
            config.lora.num_layers = config.lora.num_layers.min(blocks as u32);
        }
        config.federation.rounds = self.rounds;
    }
}

fn name(exchange: ExchangeMode) -> &'static str {
    match exchange {
        ExchangeMode::Gossip => "gossip",
        ExchangeMode::Reduce => "reduce",
    }
}

fn compression_name(compression: CompressionKind) -> &'static str {
    Compression::from(compression).name()
}

/// One simulation's figures, from its summary record.
struct Run {
    exchange: ExchangeMode,
    compression: CompressionKind,
    nodes: u32,
    summary: serde_json::Value,
}

impl Run {
    fn figure(&self, key: &str) -> f64 {
        self.summary[key].as_f64().unwrap_or(f64::NAN)
    }
}

/// Runs one simulation as a child process (each gets a fresh process, so
/// its peak memory is its own and nothing of the previous one lingers) and
/// returns its summary record.
fn simulate_in_child(config: &Config, args: &BenchTrafficArgs, (exchange, compression): (ExchangeMode, CompressionKind), nodes: u32, dir: &Path) -> Result<serde_json::Value, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut config = config.clone();
    config.federation.nodes = nodes;
    config.federation.exchange = exchange;
    config.federation.compression = Some(compression);
    config.network.data_dir = dir.to_path_buf();
    let config_path = dir.join("config.toml");
    let text = toml::to_string(&config).map_err(|e| format!("the configuration: {e}"))?;
    std::fs::write(&config_path, text).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let metrics = dir.join("metrics.jsonl");
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command.arg("--config").arg(&config_path).arg("-q").arg("simulate");
    command.args(["--eval-rows", "8", "--exact-match-rows", "0", "--metrics"]).arg(&metrics);
    if let Some(scenario) = &args.scenario {
        command.arg("--scenario").arg(scenario);
    }
    let output = command.stdin(std::process::Stdio::null()).output().map_err(|e| format!("cannot start the simulation: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("the simulation failed ({}):\n{}", output.status, tail.join("\n")));
    }
    let records = std::fs::read_to_string(&metrics).map_err(|e| format!("{}: {e}", metrics.display()))?;
    let summary = records
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|record| record["summary"] == true)
        .ok_or_else(|| format!("{} has no summary record", metrics.display()))?;
    let _ = std::fs::remove_dir_all(dir.join("simulate"));
    Ok(summary)
}

pub fn bench_traffic(config: &Config, args: &BenchTrafficArgs) -> ExitCode {
    let measured = if args.replot { read_runs(&args.output) } else { measure(config, args) };
    let (runs, model) = match measured {
        Ok(runs) => runs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_table(&runs);
    if args.exchange.contains(&ExchangeMode::Gossip) && args.nodes.iter().any(|&n| n > args.gossip_max_nodes) && !args.replot {
        println!("the gossip exchange ran up to {} nodes (--gossip-max-nodes)", args.gossip_max_nodes);
    }
    let plot = args.output.with_extension("svg");
    let mut kinds: Vec<(ExchangeMode, CompressionKind)> = runs.iter().map(|r| (r.exchange, r.compression)).collect();
    kinds.dedup();
    let mut series: Vec<Series> = kinds
        .into_iter()
        .map(|(exchange, compression)| Series {
            name: match compression {
                CompressionKind::None => format!("{} (largest node)", name(exchange)),
                other => format!("{}, {} (largest node)", name(exchange), compression_name(other)),
            },
            points: runs.iter().filter(|r| r.exchange == exchange && r.compression == compression).map(|r| (f64::from(r.nodes), r.figure("largest_node_bytes_per_round") / 1e6)).collect(),
        })
        .collect();
    if let Some(first) = runs.first() {
        let flower = 2.0 * first.figure("adapter_bytes") / 1e6;
        let sizes: std::collections::BTreeSet<u32> = runs.iter().map(|r| r.nodes).collect();
        series.push(Series {
            name: "Flower client (adapter up, average down)".into(),
            points: sizes.into_iter().map(|n| (f64::from(n), flower)).collect(),
        });
    }
    if let Err(e) = plot_scaling(&plot, &format!("traffic per node per round, {model}"), "nodes", "MB sent + received", &series) {
        eprintln!("error: the plot: {e}");
        return ExitCode::FAILURE;
    }
    println!("table: {}; plot: {}", args.output.display(), plot.display());
    ExitCode::SUCCESS
}

/// Runs every (exchange, size) simulation, writing each record to --output
/// as it comes (a run cut short keeps what it measured: `--replot`).
fn measure(config: &Config, args: &BenchTrafficArgs) -> Result<(Vec<Run>, String), String> {
    let mut output = std::fs::File::create(&args.output).map_err(|e| format!("--output {}: {e}", args.output.display()))?;
    let work = config.network.data_dir.join("bench-traffic");
    let runs_of = |exchange: ExchangeMode| args.nodes.iter().copied().filter(move |&nodes| exchange != ExchangeMode::Gossip || nodes <= args.gossip_max_nodes);
    let compressions = if args.compression.is_empty() { vec![config.federation.compression()] } else { args.compression.clone() };
    let total: usize = args.exchange.iter().map(|&exchange| runs_of(exchange).count()).sum::<usize>() * compressions.len();
    let progress = indicatif::ProgressBar::new(total as u64);
    progress.suspend(|| println!("{HEADER}"));
    let mut runs: Vec<Run> = Vec::new();
    for &exchange in &args.exchange {
        for &compression in &compressions {
            for nodes in runs_of(exchange) {
                let what = format!("{} exchange, {} compression, {nodes} nodes", name(exchange), compression_name(compression));
                progress.set_message(what.clone());
                let dir = work.join(format!("{}-{}-{nodes}", name(exchange), compression_name(compression)));
                let summary = simulate_in_child(config, args, (exchange, compression), nodes, &dir).map_err(|e| {
                    progress.abandon();
                    format!("{what}: {e}")
                })?;
                let mut record = summary.clone();
                record["exchange"] = json!(name(exchange));
                record["compression"] = json!(compression_name(compression));
                record["model"] = json!(config.model.source);
                record["flower_client_bytes"] = json!(2.0 * summary["adapter_bytes"].as_f64().unwrap_or(0.0));
                writeln!(output, "{record}").map_err(|e| format!("{}: {e}", args.output.display()))?;
                let run = Run { exchange, compression, nodes, summary };
                progress.suspend(|| println!("{}", row(&run)));
                runs.push(run);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    Ok((runs, config.model.source.clone()))
}

/// The runs recorded in `path` by an earlier `bench traffic`, and their model.
fn read_runs(path: &Path) -> Result<(Vec<Run>, String), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--output {}: {e}", path.display()))?;
    let mut runs = Vec::new();
    for (line, record) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", path.display(), line + 1);
        let summary: serde_json::Value = serde_json::from_str(record).map_err(|e| format!("{}: {e}", at()))?;
        let exchange = match summary["exchange"].as_str() {
            Some("gossip") => ExchangeMode::Gossip,
            Some("reduce") => ExchangeMode::Reduce,
            _ => return Err(format!("{}: no \"exchange\" of gossip or reduce: not a bench traffic record", at())),
        };
        let nodes = summary["nodes"].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("{}: no node count", at()))?;
        // Records from before compressions were compared moved float32.
        let compression = match summary["compression"].as_str() {
            None => CompressionKind::None,
            Some(name) => CompressionKind::from_str(name, false).map_err(|_| format!("{}: compression {name:?} is none of none, fp16, int8, topk", at()))?,
        };
        runs.push(Run { exchange, compression, nodes, summary });
    }
    if runs.is_empty() {
        return Err(format!("{} holds no records to plot", path.display()));
    }
    let model = runs[0].summary["model"].as_str().unwrap_or("tiny").to_owned();
    Ok((runs, model))
}

const HEADER: &str = "exchange  compression  nodes   largest node      mean node   x Flower  agreement    wall s  peak MB";

fn row(run: &Run) -> String {
    let flower = 2.0 * run.figure("adapter_bytes");
    format!(
        "{:<8}  {:<11} {:>6} {:>11.3} MB {:>11.3} MB {:>10.2} {:>10.2} {:>9.1} {:>8.0}",
        name(run.exchange),
        compression_name(run.compression),
        run.nodes,
        run.figure("largest_node_bytes_per_round") / 1e6,
        run.figure("mean_node_bytes_per_round") / 1e6,
        run.figure("largest_node_bytes_per_round") / flower,
        run.figure("agreement"),
        run.figure("wall_seconds"),
        run.figure("peak_rss_mb"),
    )
}

fn print_table(runs: &[Run]) {
    let rounds = runs.first().map_or(f64::NAN, |r| r.figure("rounds"));
    println!("bytes per node per round, sent + received on the simulated links ({rounds} rounds each)");
    println!("{HEADER}");
    for run in runs {
        println!("{}", row(run));
    }
    if let Some(first) = runs.first() {
        let adapter = first.figure("adapter_bytes") / 1e6;
        println!("a Flower client moves {:.3} MB a round (adapter {adapter:.3} MB up, average down)", 2.0 * adapter);
    }
}
