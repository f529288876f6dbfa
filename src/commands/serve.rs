//! `blossom-p2p serve`: checks the flags, loads the model on its thread,
//! starts the `--follow` watcher, and serves until Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::serve::worker::ModelWorker;
use crate::serve::{AppState, follow, serve};

use super::args::{ModelArgs, QuantArgs};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
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

pub fn run(config: &Config, args: &ServeArgs) -> ExitCode {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        eprintln!(
            "error: --listen {} is not a loopback address: other machines could reach the model; add --allow-remote (and set --api-key) if that is what you want",
            args.listen
        );
        return ExitCode::from(2);
    }
    if let Some(dir) = &args.follow {
        if dir.exists() && !dir.is_dir() {
            eprintln!("error: --follow {}: not a directory; give the --data-dir of a training node", dir.display());
            return ExitCode::from(2);
        }
        // Started before the node: its data directory comes when it starts.
        if !dir.exists() {
            println!("--follow {}: no such directory yet; waiting for the node to create it (its --data-dir)", dir.display());
        }
    }
    let source = config.model.source.clone();
    let worker = match ModelWorker::spawn(source.clone(), args.quant.quant, args.adapter_path.clone(), args.queue as usize) {
        Ok(worker) => worker,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            worker.shutdown();
            return ExitCode::FAILURE;
        }
    };
    let state = AppState::new(worker.clone(), source, args.api_key.clone());
    let result = runtime.block_on(async {
        if let Some(dir) = args.follow.clone() {
            tokio::spawn(follow::follow(dir, worker.clone()));
        }
        serve(state, args.listen, |addr| println!("serving on http://{addr}/v1 (Ctrl-C stops)")).await
    });
    runtime.shutdown_background();
    // MLX must let go of everything before the process exits.
    worker.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse { ": another process has this port; pick another with --listen" } else { "" };
            eprintln!("error: cannot serve on {}: {e}{hint}", args.listen);
            ExitCode::from(2)
        }
    }
}
