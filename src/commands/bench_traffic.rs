//! `blossom-p2p bench traffic`: bytes a node moves per round as the network
//! grows, for each exchange, next to a Flower client's (its adapter up, the
//! average down), measured on the simulated links of whole simulations run
//! one after another in this process.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::config::{Config, ExchangeMode};
use crate::model::QuantMode;
use crate::plot::{Series, plot_scaling};
use crate::simulation::{self, Options, Summary};

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
        config.federation.rounds = self.rounds;
    }
}

fn name(exchange: ExchangeMode) -> &'static str {
    match exchange {
        ExchangeMode::Gossip => "gossip",
        ExchangeMode::Reduce => "reduce",
    }
}

pub fn bench_traffic(config: &Config, args: &BenchTrafficArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut output = match std::fs::File::create(&args.output) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("error: --output {}: {e}", args.output.display());
            return ExitCode::from(2);
        }
    };
    let work = config.network.data_dir.join("bench-traffic");
    let mut results: Vec<(ExchangeMode, u32, Summary)> = Vec::new();
    for &exchange in &args.exchange {
        for &nodes in &args.nodes {
            let mut config = config.clone();
            config.federation.nodes = nodes;
            config.federation.exchange = exchange;
            config.network.data_dir = work.join(format!("{}-{nodes}", name(exchange)));
            let options = Options {
                scenario: args.scenario.clone(),
                metrics: None,
                eval_rows: 8,
                exact_match_rows: 0,
                centralized_baseline: false,
                attack: None,
                attackers: 1,
                dashboard: None,
            };
            println!("== {} exchange, {nodes} nodes", name(exchange));
            let summary = match runtime.block_on(simulation::simulate(&config, &options, QuantMode::Auto)) {
                Ok(summary) => summary,
                Err(e) => {
                    eprintln!("error: {} exchange with {nodes} nodes: {e}", name(exchange));
                    return ExitCode::FAILURE;
                }
            };
            let record = json!({
                "exchange": name(exchange),
                "nodes": nodes,
                "rounds": args.rounds,
                "adapter_bytes": summary.adapter_bytes,
                "flower_client_bytes": 2 * summary.adapter_bytes,
                "largest_node_bytes_per_round": summary.largest_node,
                "mean_node_bytes_per_round": summary.mean_node,
                "agreement": summary.agreement,
                "eval_loss": summary.eval_loss,
                "wall_seconds": summary.wall.as_secs_f64(),
                "peak_rss_mb": summary.peak_rss_mb,
            });
            if let Err(e) = writeln!(output, "{record}") {
                eprintln!("error: {}: {e}", args.output.display());
                return ExitCode::FAILURE;
            }
            results.push((exchange, nodes, summary));
            // Each simulation starts from empty stores; the last one's stay
            // for a look only until the next.
            let _ = std::fs::remove_dir_all(&config.network.data_dir);
        }
    }
    print_table(&results, args.rounds);
    let plot = args.output.with_extension("svg");
    let mut series: Vec<Series> = args
        .exchange
        .iter()
        .map(|&exchange| {
            let points = results.iter().filter(|(e, _, _)| *e == exchange).map(|(_, n, s)| (f64::from(*n), s.largest_node / 1e6)).collect();
            Series {
                name: format!("{} (largest node)", name(exchange)),
                points,
            }
        })
        .collect();
    if let Some((_, _, first)) = results.first() {
        let flower = 2.0 * first.adapter_bytes as f64 / 1e6;
        series.push(Series {
            name: "Flower client (adapter up, average down)".into(),
            points: args.nodes.iter().map(|n| (f64::from(*n), flower)).collect(),
        });
    }
    if let Err(e) = plot_scaling(&plot, &format!("traffic per node per round, {}", config.model.source), "nodes", "MB sent + received", &series) {
        eprintln!("error: the plot: {e}");
        return ExitCode::FAILURE;
    }
    println!("table: {}; plot: {}", args.output.display(), plot.display());
    ExitCode::SUCCESS
}

fn print_table(results: &[(ExchangeMode, u32, Summary)], rounds: u32) {
    println!();
    println!("bytes per node per round, sent + received on the simulated links ({rounds} rounds each)");
    println!("{:<8} {:>6} {:>14} {:>12} {:>10} {:>10} {:>9} {:>9}", "exchange", "nodes", "largest node", "mean node", "x Flower", "agreement", "wall s", "peak MB");
    for (exchange, nodes, s) in results {
        let flower = 2.0 * s.adapter_bytes as f64;
        println!(
            "{:<8} {:>6} {:>11.3} MB {:>9.3} MB {:>10.2} {:>10.2} {:>9.1} {:>9}",
            name(*exchange),
            nodes,
            s.largest_node / 1e6,
            s.mean_node / 1e6,
            s.largest_node / flower,
            s.agreement,
            s.wall.as_secs_f64(),
            s.peak_rss_mb.map_or("-".to_owned(), |m| format!("{m:.0}"))
        );
    }
    if let Some((_, _, s)) = results.first() {
        println!("a Flower client moves {:.3} MB a round (adapter {:.3} MB up, average down)", 2.0 * s.adapter_bytes as f64 / 1e6, s.adapter_bytes as f64 / 1e6);
    }
}
