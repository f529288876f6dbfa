//! The subcommands that do work, one module each. They turn errors into a
//! message on stderr and an exit code (see `cli`).

pub mod node;
pub mod node_args;
pub mod status;
#[cfg(feature = "train")]
pub mod args;
#[cfg(feature = "train")]
pub mod bench;
#[cfg(feature = "train")]
pub mod bench_gossip;
#[cfg(feature = "train")]
pub mod bench_traffic;
#[cfg(feature = "train")]
pub mod eval;
#[cfg(feature = "train")]
pub mod export;
#[cfg(feature = "train")]
pub mod generate;
#[cfg(feature = "train")]
pub mod serve;
#[cfg(feature = "train")]
pub mod simulate;
#[cfg(feature = "train")]
pub mod start;
#[cfg(feature = "train")]
pub mod train;

#[cfg(feature = "train")]
use std::process::ExitCode;

#[cfg(feature = "train")]
use crate::model::ModelError;

/// Bad input (a file, a flag, a model) is exit code 2; a failure while
/// running is 1.
#[cfg(feature = "train")]
pub(crate) fn model_error_exit(context: &str, err: &ModelError) -> ExitCode {
    eprintln!("error: {context}: {err}");
    match err {
        ModelError::Mlx(_) => ExitCode::FAILURE,
        _ => ExitCode::from(2),
    }
}
