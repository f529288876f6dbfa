use std::process::ExitCode;

use blossom_p2p::cli::{self, Cli};
use blossom_p2p::logging;

fn main() -> ExitCode {
    #[cfg(feature = "train")]
    blossom_p2p::mlx_env::set_env_defaults();
    #[cfg(all(feature = "train", target_os = "linux", target_env = "gnu"))]
    blossom_p2p::mlx_env::keep_freed_memory();
    let cli = Cli::parse_ordered(std::env::args_os());
    if let Err(err) = logging::init(cli.global.verbosity(), cli.global.log_format, cli.command.logs_to_file()) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    cli::run(cli)
}
