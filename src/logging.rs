//! Logging through `tracing`: human-readable by default, JSON with
//! `--log-format json`. `RUST_LOG` wins over `-v`/`-q` when it is set.
//! Logs go to stderr; a command whose terminal shows a report of its own
//! (`simulate`) sends them to a file instead (`to_file_unless_verbose`),
//! and `-v` keeps them on the terminal.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Where log lines go: stderr until a command names a file.
#[derive(Clone, Default)]
struct Destination {
    file: Arc<Mutex<Option<File>>>,
}

/// The installed logger's destination, and whether the user asked to see
/// logs (`-v` or `RUST_LOG`).
static DESTINATION: OnceLock<Destination> = OnceLock::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// One log line's writer: the file if one is set, else stderr.
struct LineWriter(Arc<Mutex<Option<File>>>);

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // A poisoned lock only means another thread panicked mid-line.
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(file) => file.write(bytes),
            None => io::stderr().write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(file) => file.flush(),
            None => io::stderr().flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for Destination {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter(self.file.clone())
    }
}

/// Sends every later log line to `path` (created, or emptied), unless the
/// user asked for logs on the terminal (`-v`, `RUST_LOG`). Returns whether
/// it did.
pub fn to_file_unless_verbose(path: &Path) -> io::Result<bool> {
    let Some(destination) = DESTINATION.get() else { return Ok(false) };
    if VERBOSE.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let file = File::create(path)?;
    *destination.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    Ok(true)
}

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
/// for results. `to_file_later`: the command will send its logs to a file
/// unless `-v` is given (no terminal colours then).
pub fn init(verbosity: i16, format: LogFormat, to_file_later: bool) -> anyhow::Result<()> {
    let from_env = std::env::var("RUST_LOG").ok().filter(|directives| !directives.trim().is_empty());
    VERBOSE.store(verbosity > 0 || from_env.is_some(), Ordering::Relaxed);
    let filter = match from_env {
        Some(directives) => EnvFilter::try_new(&directives)
            .map_err(|err| anyhow::anyhow!("RUST_LOG={directives:?} is not a valid filter: {err}"))?,
        // libp2p's swarm announces every local peer id at info: one line per
        // node, noise in a simulation of many; `-v` shows it again.
        None if verbosity == 0 => EnvFilter::new("info,libp2p_swarm=warn"),
        None => EnvFilter::new(level_for(verbosity)),
    };
    let to_file = to_file_later && !VERBOSE.load(Ordering::Relaxed);
    let destination = DESTINATION.get_or_init(Destination::default).clone();
    // Colors for a terminal only: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!to_file && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(destination);
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
