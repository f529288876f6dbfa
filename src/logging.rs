//! Logging through `tracing`: human-readable by default, JSON with
//! `--log-format json`. `RUST_LOG` wins over `-v`/`-q` when it is set.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The default level for a verbosity count: each `-v` adds one step, each
/// `-q` takes one away, from `info`.
pub fn level_for(verbosity: i16) -> &'static str {
    match verbosity {
        i16::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber; logs go to stderr so stdout stays clean
/// for results.
pub fn init(verbosity: i16, format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|err| anyhow::anyhow!("RUST_LOG={directives:?} is not a valid filter: {err}"))?,
        // libp2p's swarm announces every local peer id at info: one line per
        // node, noise in a simulation of many; `-v` shows it again.
        _ if verbosity == 0 => EnvFilter::new("info,libp2p_swarm=warn"),
        _ => EnvFilter::new(level_for(verbosity)),
    };
    // Colors for a terminal only: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_to_levels() {
        assert_eq!(level_for(-5), "error");
        assert_eq!(level_for(-1), "warn");
        assert_eq!(level_for(0), "info");
        assert_eq!(level_for(1), "debug");
        assert_eq!(level_for(4), "trace");
    }
}
