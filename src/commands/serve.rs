//! `blossom-p2p serve`: checks the flags, loads the model on its thread,
//! starts the `--follow` watcher, and serves until Ctrl-C.

use std::process::ExitCode;

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::serve::worker::ModelWorker;
use crate::serve::{AppState, follow, serve};

pub fn run(config: &Config, args: &ServeArgs) -> ExitCode {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        eprintln!(
            "error: --listen {} is not a loopback address: other machines could reach the model; add --allow-remote (and set --api-key) if that is what you want",
            args.listen
        );
        return ExitCode::from(2);
    }
    if let Some(dir) = &args.follow
        && !dir.is_dir()
    {
        eprintln!("error: --follow {}: no such directory; give the --data-dir of a training node", dir.display());
        return ExitCode::from(2);
    }
    let source = config.model.source.clone();
    let worker = match ModelWorker::spawn(source.clone(), args.model.quant, args.adapter_path.clone(), args.queue as usize) {
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
