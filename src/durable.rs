//! Crash-safe file writes: write a temporary file, fsync it, rename it over
//! the target, fsync the directory. A reader, or the process restarted after
//! a crash, sees the old content or the new, never half of it; what a crash
//! leaves behind is a temporary file, which its owner removes when it opens.
//!
//! This is also where the crash tests stop a process: with
//! `BLOSSOM_PAUSE_AT=<point>:<n>` the n-th write at `point` (`chunk-write`,
//! `checkpoint-write`) writes half of its bytes, says so on stderr, and waits
//! for a `kill -9`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Replaces `path` with `bytes` through `temp` (on the same file system).
/// `point` names this kind of write for the crash tests.
pub fn write_atomically(temp: &Path, path: &Path, bytes: &[u8], point: &str) -> io::Result<()> {
    write_replacing(temp, path, bytes, point, Durability::Synced)
}

/// Whether a write waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: survives a power cut.
    Synced,
    /// Rename only: readers and a restarted process still see the old
    /// content or the new, but a power cut may lose the file or leave it
    /// torn. For what a peer can send again and whose reader checks it (a
    /// chunk against its hash, a manifest against its signature): two
    /// fsyncs per piece on the network task stalled every node of a
    /// 64-node simulation past its request timeouts.
    Cached,
}

/// `write_atomically`, with the fsyncs only when `durability` is `Synced`.
pub fn write_replacing(temp: &Path, path: &Path, bytes: &[u8], point: &str, durability: Durability) -> io::Result<()> {
    let durable = durability == Durability::Synced;
    let mut file = File::create(temp)?;
    if pause_here(point) {
        file.write_all(&bytes[..bytes.len() / 2])?;
        file.sync_all()?;
        eprintln!("paused at {point} (BLOSSOM_PAUSE_AT), {} of {} bytes written to {}", bytes.len() / 2, bytes.len(), temp.display());
        // The test kills the process now; should it not, the write goes on.
        std::thread::sleep(Duration::from_secs(600));
    }
    file.write_all(bytes)?;
    if durable {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(temp, path)?;
    // The rename is durable once the directory is.
    if durable
        && let Some(parent) = path.parent()
        && let Ok(dir) = File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Whether this write is the one `BLOSSOM_PAUSE_AT` names.
fn pause_here(point: &str) -> bool {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let value = std::env::var("BLOSSOM_PAUSE_AT").ok()?;
        let (name, count) = value.split_once(':').unwrap_or((value.as_str(), "1"));
        Some((name.to_owned(), count.parse().unwrap_or(1)))
    });
    match target {
        Some((name, count)) if name == point => SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *count,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (temp, path) = (dir.path().join(".x.tmp"), dir.path().join("x"));
        fs::write(&path, b"old").unwrap();
        write_atomically(&temp, &path, b"new content", "test-write").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        assert!(!temp.exists());
    }
}
