//! `blossom-p2p simulate`: the flags, then the simulation driver
//! (`crate::simulation`) on a multi-threaded runtime.

use std::process::ExitCode;

use clap::Args;

use super::args::{DataArgs, ModelArgs, QuantArgs};
use crate::config::Config;
use crate::simulation::{self, SimError};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Number of nodes (default: federation.nodes).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nodes: Option<u32>,
    /// Number of rounds (default: federation.rounds).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub options: simulation::Options,
}

impl SimulateArgs {
    pub fn apply(&self, config: &mut Config) {
        self.model.apply(config);
        self.data.apply(config);
        if let Some(nodes) = self.nodes {
            config.federation.nodes = nodes;
        }
        if let Some(rounds) = self.rounds {
            config.federation.rounds = rounds;
        }
    }
}

pub fn run(config: &Config, args: &SimulateArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(simulation::simulate(config, &args.options, args.quant.quant)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(SimError::Input(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(SimError::Run(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
