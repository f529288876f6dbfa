//! The command line: argument definitions and dispatch to the subcommands.
//!
//! Exit codes: 0 success, 1 a check or a run failed, 2 bad input (flags,
//! config) or a subcommand that is not implemented yet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, Origin, Partitioning};
use crate::logging::LogFormat;
use crate::model::QuantMode;

#[derive(Debug, Parser)]
#[command(
    name = "blossom-p2p",
    version,
    about = "Federated LoRA/DoRA fine-tuning with MLX over a serverless libp2p gossip network",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Config file (TOML, see configs/). Every key it leaves out keeps its default.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. --set lora.rank=16 (repeatable; applied after --config).
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl GlobalArgs {
    pub fn verbosity(&self) -> i16 {
        i16::from(self.verbose) - i16::from(self.quiet)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join a training run (or start one: the first node needs no bootstrap).
    Start(StartArgs),
    /// Run a relay: circuit relay, Kademlia bootstrap and AutoNAT server for nodes behind NAT.
    Relay(RelayArgs),
    /// Run a whole network in one process over an in-memory network.
    Simulate(SimulateArgs),
    /// Fine-tune an adapter on one machine, with no network.
    Train(TrainArgs),
    /// Generate text with the base model, with or without an adapter.
    Generate(GenerateArgs),
    /// Evaluate the base model or an adapter on a held-out split.
    Eval(EvalArgs),
    /// Export an adapter as an mlx-lm adapter directory, or fuse it into the model.
    Export(ExportArgs),
    /// Show a running node's view of its run: peers, round, agreement.
    Status(StatusArgs),
    /// Serve the model (with an adapter, or a running node's newest average) over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Check the installation: MLX, device, BLAS speed, default model.
    Doctor(DoctorArgs),
    /// Measure speed and memory, printing figures side by side.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prompt and generation tokens/s and peak memory: quantized weights, and
    /// dequantized to float32 (on CPU), in one run.
    Generate(BenchGenerateArgs),
    /// Training tokens/s, step time and peak memory (LoRA settings from the config).
    Train(BenchTrainArgs),
    /// Time and wire bytes for an adapter to reach every node of a loopback network.
    Gossip(BenchGossipArgs),
}

#[derive(Debug, Args)]
pub struct BenchGossipArgs {
    /// Nodes in the network.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=128))]
    pub nodes: u32,
    /// Adapter size in megabytes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub megabytes: u32,
    /// Gossipsub mesh degrees D to compare (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![3, 6, 8], value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mesh: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data folder (mlx-lm jsonl); default: generated text rows of --seq-len tokens.
    #[arg(long)]
    pub data: Option<String>,
    /// Tokens a row when generating the rows.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..=65536))]
    pub seq_len: u32,
    /// Timed steps (after two warm-up steps).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub steps: u64,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    /// The model (default: model.source).
    #[arg(long, value_name = "PATH|tiny")]
    pub model: Option<String>,
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

#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// Multiaddr to listen on (repeatable); replaces network.listen.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Directory for the identity key, chunk store and checkpoints.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Pre-shared key file of a private network.
    #[arg(long, value_name = "FILE")]
    pub psk: Option<PathBuf>,
    /// Only these peer ids (one per line, `#` comments) may connect; others
    /// are refused and their manifests ignored.
    #[arg(long, value_name = "FILE")]
    pub allow_peers: Option<PathBuf>,
    /// An address others can reach this node at (repeatable), e.g. a public IP or port forward.
    #[arg(long, value_name = "MULTIADDR")]
    pub external_address: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Multiaddr of a peer or relay to join through (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a loopback address,
    /// e.g. 127.0.0.1:9090; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve the live web dashboard at http://ADDR/ (a loopback address, e.g. 127.0.0.1:8090).
    #[arg(long, value_name = "ADDR")]
    pub dashboard: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Do not look for peers on the LAN by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Static partitioning: train on partition K of --num-partitions (as the old IID partitioner).
    #[arg(long, value_name = "K", requires = "num_partitions")]
    pub partition_id: Option<u32>,
    /// Static partitioning: the number of partitions.
    #[arg(long, value_name = "N", requires = "partition_id", value_parser = clap::value_parser!(u32).range(1..))]
    pub num_partitions: Option<u32>,
    /// The run to join, as 64 hex digits (default: derived from the configuration).
    #[arg(long, value_name = "HEX")]
    pub run_id: Option<String>,
    /// Publish this adapter (safetensors, e.g. adapters.safetensors) once peers are there.
    #[arg(long, value_name = "FILE")]
    pub publish: Option<PathBuf>,
    /// Write every adapter received and verified into this folder, as <hash>.safetensors.
    #[arg(long, value_name = "DIR")]
    pub receive_dir: Option<PathBuf>,
    /// Ask connected peers for the newest adapter of the run on start (late joiners).
    #[arg(long)]
    pub catch_up: bool,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Also keep and serve the newest adapters of these runs to late joiners
    /// (repeatable; 64 hex digits each, as `start` prints them).
    #[arg(long = "seed-run", value_name = "RUN_ID")]
    pub seed_runs: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Number of nodes (default: federation.nodes).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nodes: Option<u32>,
    /// Number of rounds (default: federation.rounds).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Network scenario: latency, loss, bandwidth, partitions, churn (netsim/scenarios/*.toml).
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Where to write per-round metrics (JSONL); a plot goes next to it as .svg
    /// (default: <data dir>/simulate/metrics.jsonl).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Held-out rows for each round's eval loss.
    #[arg(long, default_value_t = 40)]
    pub eval_rows: usize,
    /// Test rows for exact match each round (built-in task; 0 skips it).
    #[arg(long, default_value_t = 20)]
    pub exact_match_rows: usize,
    /// Also train adapters centrally on all rows, for the run's steps and for
    /// all nodes' steps together, and compare their eval loss with the
    /// federated result.
    #[arg(long)]
    pub centralized_baseline: bool,
    /// Make the last --attackers nodes publish poisoned updates.
    #[arg(long, value_enum)]
    pub attack: Option<crate::commands::poison::Attack>,
    /// How many nodes attack (the highest-numbered ones).
    #[arg(long, default_value_t = 1, requires = "attack")]
    pub attackers: u32,
    /// Quantized weights: `auto` dequantizes to float32 on CPU when memory allows.
    #[arg(long, value_enum, default_value_t = QuantMode::Auto)]
    pub quant: QuantMode,
    /// Serve the live web dashboard at http://ADDR/ (a loopback address); it stays up after the run until Ctrl-C.
    #[arg(long, value_name = "ADDR")]
    pub dashboard: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data set: `builtin`, or a folder of mlx-lm jsonl files (default: data.dataset).
    #[arg(long)]
    pub data: Option<String>,
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

/// Which base model to load, shared by the commands that use one.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face / mlx-lm folder, or `tiny[:SEED]` (default: model.source).
    #[arg(long, value_name = "PATH|tiny")]
    pub model: Option<String>,
    /// Quantized weights: `auto` dequantizes to float32 on CPU when memory allows
    /// (much faster there) and keeps them quantized on Metal/CUDA.
    #[arg(long, value_enum, default_value_t = QuantMode::Auto)]
    pub quant: QuantMode,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt; the chat template is applied unless --raw is given.
    #[arg(long)]
    pub prompt: String,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt to the model as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// An mlx-lm adapter directory to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter_path: Option<PathBuf>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus sampling threshold in (0, 1]; 1 keeps every token.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An mlx-lm adapter directory to apply.
    #[arg(long, value_name = "DIR", conflicts_with = "follow")]
    pub adapter_path: Option<PathBuf>,
    /// A training node's data directory: serve each round's average as soon as it is saved.
    #[arg(long, value_name = "DATA_DIR")]
    pub follow: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Allow a --listen address other than loopback (other machines can reach the server; set --api-key).
    #[arg(long)]
    pub allow_remote: bool,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, env = "BLOSSOM_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait while one is generated; more get 429.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub queue: u32,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An mlx-lm adapter directory to evaluate (default: the base model alone).
    #[arg(long, value_name = "DIR")]
    pub adapter_path: Option<PathBuf>,
    /// Data set (default: data.dataset).
    #[arg(long)]
    pub data: Option<String>,
    /// Rows of the test split to use (0 = all).
    #[arg(long, default_value_t = 0)]
    pub rows: u64,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The base model to export (default: model.source).
    #[arg(long, value_name = "PATH|tiny")]
    pub model: Option<String>,
    /// An mlx-lm adapter directory to export with the model (into OUT/adapters), or to fuse.
    #[arg(long, visible_alias = "adapter-path", value_name = "DIR")]
    pub adapter: Option<String>,
    /// Write float32 weights instead of keeping quantized ones (mlx format).
    #[arg(long)]
    pub dequantize: bool,
    /// Output: a directory (mlx: an mlx-lm model folder) or a file (gguf).
    #[arg(long, visible_alias = "output", value_name = "PATH")]
    pub out: PathBuf,
    /// Fuse the adapter into the base weights and write a whole model.
    #[arg(long, requires = "adapter")]
    pub fuse: bool,
    /// `mlx`: an mlx-lm model folder; `gguf`: one GGUF file for llama.cpp, Ollama, LM Studio.
    #[arg(long, value_enum, default_value_t = ExportFormat::Mlx)]
    pub format: ExportFormat,
    /// GGUF weight format.
    #[arg(long, value_enum, default_value_t = crate::model::gguf_write::GgufQuant::Q8_0)]
    pub quant: crate::model::gguf_write::GgufQuant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Mlx,
    Gguf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's data directory (default: network.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read a running node's or simulation's dashboard instead (its /api/status), e.g. http://127.0.0.1:8090.
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    pub dashboard: Option<String>,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The default model file to check.
    #[arg(long, value_name = "FILE", default_value = crate::default_model::DEFAULT_MODEL_PATH)]
    pub model: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl ModelArgs {
    fn apply(&self, config: &mut Config) {
        if let Some(model) = &self.model {
            config.model.source = model.clone();
        }
    }
}

impl NetworkArgs {
    fn apply(&self, config: &mut Config) {
        if !self.listen.is_empty() {
            config.network.listen = self.listen.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.network.data_dir = dir.clone();
        }
        if let Some(file) = &self.allow_peers {
            config.network.allow_peers_file = Some(file.clone());
        }
        if let Some(psk) = &self.psk {
            config.network.psk_file = Some(psk.clone());
        }
    }
}

impl Command {
    /// Folds the subcommand's flags into the configuration: a flag wins over
    /// the file and `--set`.
    fn apply(&self, config: &mut Config) {
        match self {
            Command::Start(args) => {
                args.network.apply(config);
                if !args.bootstrap.is_empty() {
                    config.network.bootstrap = args.bootstrap.clone();
                }
                if args.no_mdns {
                    config.network.mdns = false;
                }
                if args.partition_id.is_some() {
                    config.federation.partitioning = Partitioning::Static;
                }
            }
            Command::Relay(args) => args.network.apply(config),
            Command::Simulate(args) => {
                if let Some(nodes) = args.nodes {
                    config.federation.nodes = nodes;
                }
                if let Some(rounds) = args.rounds {
                    config.federation.rounds = rounds;
                }
            }
            Command::Train(args) => {
                args.model.apply(config);
                if let Some(data) = &args.data {
                    config.data.dataset = data.clone();
                }
            }
            Command::Eval(args) => {
                args.model.apply(config);
                if let Some(data) = &args.data {
                    config.data.dataset = data.clone();
                }
            }
            Command::Status(args) => {
                if let Some(dir) = &args.data_dir {
                    config.network.data_dir = dir.clone();
                }
            }
            Command::Generate(args) => args.model.apply(config),
            Command::Serve(args) => args.model.apply(config),
            Command::Export(args) => {
                if let Some(model) = &args.model {
                    config.model.source = model.clone();
                }
            }
            Command::Bench(BenchCommand::Generate(args)) => {
                if let Some(model) = &args.model {
                    config.model.source = model.clone();
                }
            }
            Command::Bench(BenchCommand::Gossip(_)) => {}
            Command::Bench(BenchCommand::Train(args)) => {
                args.model.apply(config);
                if let Some(data) = &args.data {
                    config.data.dataset = data.clone();
                }
            }
            Command::Doctor(_) => {}
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Command::Start(_) => "start",
            Command::Relay(_) => "relay",
            Command::Simulate(_) => "simulate",
            Command::Train(_) => "train",
            Command::Generate(_) => "generate",
            Command::Eval(_) => "eval",
            Command::Export(_) => "export",
            Command::Status(_) => "status",
            Command::Serve(_) => "serve",
            Command::Doctor(_) => "doctor",
            Command::Bench(_) => "bench",
        }
    }
}

/// Loads the configuration with every flag applied and validated.
pub fn resolve_config(cli: &Cli) -> Result<Config, ConfigError> {
    if let Command::Start(StartArgs {
        partition_id: Some(id),
        num_partitions: Some(count),
        ..
    }) = &cli.command
        && id >= count
    {
        return Err(ConfigError::Invalid {
            origin: Origin::Flags("start".to_owned()),
            key: "--partition-id".to_owned(),
            message: format!("must be below --num-partitions ({count}), got {id}"),
        });
    }
    let mut config = Config::load(cli.global.config.as_deref(), &cli.global.overrides)?;
    cli.command.apply(&mut config);
    config.validate().map_err(|(key, message)| ConfigError::Invalid {
        origin: Origin::Flags(cli.command.name().to_owned()),
        key,
        message,
    })?;
    Ok(config)
}

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    // Every subcommand resolves the configuration first, so a bad file, key or
    // flag is reported the same way whatever the command.
    let config = match resolve_config(&cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    tracing::debug!(command = cli.command.name(), "configuration resolved");
    match &cli.command {
        Command::Doctor(args) => crate::doctor::run(args),
        Command::Generate(args) => crate::commands::generate::run(&config, args),
        Command::Export(args) => crate::commands::export::run(&config, args),
        Command::Bench(BenchCommand::Generate(args)) => crate::commands::bench::bench_generate(&config, args),
        Command::Bench(BenchCommand::Train(args)) => crate::commands::bench::bench_train(&config, args),
        Command::Bench(BenchCommand::Gossip(args)) => crate::commands::bench_gossip::bench_gossip(args),
        Command::Train(args) => crate::commands::train::run(&config, args),
        Command::Start(args) => crate::commands::node::start(&config, args),
        Command::Relay(args) => crate::commands::node::relay(&config, args),
        Command::Eval(args) => crate::commands::eval::run(&config, args),
        Command::Simulate(args) => crate::commands::simulate::run(&config, args),
        Command::Status(args) => crate::commands::status::run(&config, args),
        Command::Serve(args) => crate::commands::serve::run(&config, args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn start_flags_reach_the_config() {
        let cli = Cli::parse_from([
            "blossom-p2p",
            "start",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/4001",
            "--no-mdns",
            "--partition-id",
            "2",
            "--num-partitions",
            "4",
        ]);
        let config = resolve_config(&cli).expect("valid flags");
        assert_eq!(config.network.bootstrap, vec!["/ip4/127.0.0.1/tcp/4001".to_owned()]);
        assert!(!config.network.mdns);
        assert_eq!(config.federation.partitioning, Partitioning::Static);
    }

    #[test]
    fn a_bad_bootstrap_flag_is_a_config_error() {
        let cli = Cli::parse_from(["blossom-p2p", "start", "--bootstrap", "1.2.3.4:4001"]);
        let err = resolve_config(&cli).expect_err("not a multiaddr").to_string();
        assert!(err.contains("network.bootstrap"), "{err}");
        assert!(err.contains("1.2.3.4:4001"), "{err}");
    }

    #[test]
    fn partition_id_needs_num_partitions() {
        let parsed = Cli::try_parse_from(["blossom-p2p", "start", "--partition-id", "1"]);
        assert!(parsed.is_err());
    }
}
