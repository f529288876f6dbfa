//! The command line: the global flags, and the subcommands composed from the
//! `Args` each command module owns (`commands::*`, `doctor`), then
//! dispatched to them.
//!
//! Exit codes: 0 success, 1 a check or a run failed, 2 bad input (flags,
//! config).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::commands::node_args::{RelayArgs, StartArgs};
use crate::commands::status::StatusArgs;
use crate::config::{Config, ConfigError, Origin};
use crate::logging::LogFormat;
#[cfg(feature = "train")]
use crate::commands::{bench::BenchCommand, eval::EvalArgs, export::ExportArgs, generate::GenerateArgs, serve::ServeArgs, simulate::SimulateArgs, train::TrainArgs};
#[cfg(feature = "train")]
use crate::doctor::DoctorArgs;

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
    /// Where MLX computes: `gpu` (CUDA or Metal, an error where there is none),
    /// `cpu`, or `auto` (the GPU where this build and machine have one).
    #[cfg(feature = "train")]
    #[arg(long, global = true, value_enum, default_value_t = crate::mlx_env::DeviceChoice::Auto)]
    pub device: crate::mlx_env::DeviceChoice,
}

impl GlobalArgs {
    pub fn verbosity(&self) -> i16 {
        i16::from(self.verbose) - i16::from(self.quiet)
    }
}

impl Cli {
    /// Parses `args` (the program name first) as clap does, then takes
    /// every `--set` in the order given, before and after the subcommand:
    /// clap keeps only those after it for a global argument given on both
    /// sides (clap-rs/clap#1570), and a run would silently use other
    /// settings than the user typed.
    pub fn parse_ordered<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut cli = Self::parse_from(&args);
        cli.global.overrides = overrides_in_order(&args);
        cli
    }
}

/// Every `--set VALUE` and `--set=VALUE` of a command line, in order (none
/// after `--`, where arguments stop being options).
fn overrides_in_order(args: &[std::ffi::OsString]) -> Vec<String> {
    let mut overrides = Vec::new();
    let mut tokens = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(token) = tokens.next() {
        if token == "--" {
            break;
        }
        if token == "--set" {
            overrides.extend(tokens.next().map(|v| v.into_owned()));
        } else if let Some(value) = token.strip_prefix("--set=") {
            overrides.push(value.to_owned());
        }
    }
    overrides
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join a training run (or start one: the first node needs no bootstrap).
    ///
    /// The node trains --model (default: model.source, the embedded
    /// SmolLM2-135M-Instruct Q4_1) on its share of --data (default:
    /// data.dataset, the built-in word-reversal task) with the
    /// configuration's LoRA, training and federation settings. The run it
    /// joins is named by blake3 of the model's files, the data set and those
    /// settings, so every node started with the same model, data and
    /// configuration joins the same run; --run-id names one explicitly. It
    /// prints the run id, model and data when it starts.
    ///
    /// With --publish or --receive-dir it trains nothing and only exchanges
    /// adapter files (the only mode of a relay build, made with
    /// `cargo build --no-default-features`).
    Start(StartArgs),
    /// Run a relay: circuit relay, Kademlia bootstrap and AutoNAT server for nodes behind NAT.
    Relay(RelayArgs),
    /// Run a whole network in one process over an in-memory network.
    #[cfg(feature = "train")]
    Simulate(SimulateArgs),
    /// Fine-tune an adapter on one machine, with no network.
    #[cfg(feature = "train")]
    Train(TrainArgs),
    /// Generate text with the base model, with or without an adapter.
    #[cfg(feature = "train")]
    Generate(GenerateArgs),
    /// Evaluate the base model or an adapter on a held-out split.
    #[cfg(feature = "train")]
    Eval(EvalArgs),
    /// Export an adapter as an mlx-lm adapter directory, or fuse it into the model.
    #[cfg(feature = "train")]
    Export(ExportArgs),
    /// Show a running node's view of its run: peers, round, agreement.
    Status(StatusArgs),
    /// Serve the model (with an adapter, or a running node's newest average) over an OpenAI-compatible HTTP API.
    #[cfg(feature = "train")]
    Serve(ServeArgs),
    /// Check the installation: MLX, device, BLAS speed, default model.
    #[cfg(feature = "train")]
    Doctor(DoctorArgs),
    /// Measure speed and memory, printing figures side by side.
    #[cfg(feature = "train")]
    #[command(subcommand)]
    Bench(BenchCommand),
}




















impl Command {
    /// Folds the subcommand's flags into the configuration: a flag wins over
    /// the file and `--set`.
    fn apply(&self, config: &mut Config) {
        match self {
            Command::Start(args) => args.apply(config),
            Command::Relay(args) => args.network.apply(config),
            Command::Status(args) => args.apply(config),
            #[cfg(feature = "train")]
            Command::Simulate(args) => args.apply(config),
            #[cfg(feature = "train")]
            Command::Train(args) => args.apply(config),
            #[cfg(feature = "train")]
            Command::Eval(args) => args.apply(config),
            #[cfg(feature = "train")]
            Command::Generate(args) => args.model.apply(config),
            #[cfg(feature = "train")]
            Command::Serve(args) => args.model.apply(config),
            #[cfg(feature = "train")]
            Command::Export(args) => args.model.apply(config),
            #[cfg(feature = "train")]
            Command::Bench(command) => command.apply(config),
            #[cfg(feature = "train")]
            Command::Doctor(_) => {}
        }
    }

    /// Whether the command's terminal output is a report of its own, and
    /// its logs go to a file unless `-v` is given (`logging`).
    pub fn logs_to_file(&self) -> bool {
        #[cfg(feature = "train")]
        if matches!(self, Command::Simulate(_)) {
            return true;
        }
        false
    }

    fn name(&self) -> &'static str {
        match self {
            Command::Start(_) => "start",
            Command::Relay(_) => "relay",
            Command::Status(_) => "status",
            #[cfg(feature = "train")]
            Command::Simulate(_) => "simulate",
            #[cfg(feature = "train")]
            Command::Train(_) => "train",
            #[cfg(feature = "train")]
            Command::Generate(_) => "generate",
            #[cfg(feature = "train")]
            Command::Eval(_) => "eval",
            #[cfg(feature = "train")]
            Command::Export(_) => "export",
            #[cfg(feature = "train")]
            Command::Serve(_) => "serve",
            #[cfg(feature = "train")]
            Command::Doctor(_) => "doctor",
            #[cfg(feature = "train")]
            Command::Bench(_) => "bench",
        }
    }
}

/// Loads the configuration with every flag applied and validated.
pub fn resolve_config(cli: &Cli) -> Result<Config, ConfigError> {
    if let Command::Start(args) = &cli.command {
        args.check()?;
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
    // Before any compute thread starts: MLX's default device is process-wide.
    #[cfg(feature = "train")]
    match crate::mlx_env::use_device(cli.global.device) {
        Ok(backend) => tracing::debug!(device = backend.name(), "MLX device"),
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    }
    match &cli.command {
        Command::Start(args) => crate::commands::node::start(&config, args),
        Command::Relay(args) => crate::commands::node::relay(&config, args),
        Command::Status(args) => crate::commands::status::run(&config, args),
        #[cfg(feature = "train")]
        Command::Doctor(args) => crate::doctor::run(args),
        #[cfg(feature = "train")]
        Command::Generate(args) => crate::commands::generate::run(&config, args),
        #[cfg(feature = "train")]
        Command::Export(args) => crate::commands::export::run(&config, args),
        #[cfg(feature = "train")]
        Command::Bench(command) => command.run(&config),
        #[cfg(feature = "train")]
        Command::Train(args) => crate::commands::train::run(&config, args),
        #[cfg(feature = "train")]
        Command::Eval(args) => crate::commands::eval::run(&config, args),
        #[cfg(feature = "train")]
        Command::Simulate(args) => crate::commands::simulate::run(&config, args),
        #[cfg(feature = "train")]
        Command::Serve(args) => crate::commands::serve::run(&config, args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn set_before_and_after_the_subcommand_is_kept_in_order() {
        let cli = Cli::parse_ordered(["blossom-p2p", "--set", "lora.rank=4", "--set=train.seed=1", "status", "--set", "lora.rank=16"]);
        assert_eq!(cli.global.overrides, ["lora.rank=4", "train.seed=1", "lora.rank=16"]);
        let cli = Cli::parse_ordered(["blossom-p2p", "--set", "lora.rank=4", "status"]);
        assert_eq!(cli.global.overrides, ["lora.rank=4"]);
        // After `--` nothing is an option.
        assert_eq!(overrides_in_order(&["b".into(), "--".into(), "--set".into(), "x=1".into()]), Vec::<String>::new());
    }

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
        assert_eq!(config.federation.partitioning, crate::config::Partitioning::Static);
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
