//! The subcommands that do work, one module each. They turn errors into a
//! message on stderr and an exit code (see `cli`).

pub mod bench;
pub mod bench_gossip;
pub mod eval;
pub mod export;
pub mod generate;
pub mod node;
pub mod plot;
pub mod poison;
pub mod serve;
pub mod simulate;
pub mod start;
pub mod status;
pub mod train;

use std::process::ExitCode;

use crate::model::ModelError;

/// Bad input (a file, a flag, a model) is exit code 2; a failure while
/// running is 1.
pub(crate) fn model_error_exit(context: &str, err: &ModelError) -> ExitCode {
    eprintln!("error: {context}: {err}");
    match err {
        ModelError::Mlx(_) => ExitCode::FAILURE,
        _ => ExitCode::from(2),
    }
}
