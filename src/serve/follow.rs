//! `serve --follow DATA_DIR`: watches a training node's data directory and
//! switches the server to each newly saved round average
//! (`adapters/round-NNNN`), named by the hash the node logged for that round
//! in `metrics.jsonl`. The directory may not exist yet (the server started
//! before the node): it is looked for until it does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::worker::{AdapterInfo, ModelWorker};

const WEIGHTS_FILE: &str = "adapters.safetensors";

/// How often the directory is looked at.
const POLL: Duration = Duration::from_millis(500);

/// The newest complete round directory under `data_dir/adapters`.
fn newest_round(data_dir: &Path) -> Option<(u64, PathBuf)> {
    let entries = std::fs::read_dir(data_dir.join("adapters")).ok()?;
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let round: u64 = name.to_str()?.strip_prefix("round-")?.parse().ok()?;
            let dir = entry.path();
            // The node writes the weights, then the config: both there means whole.
            (dir.join(WEIGHTS_FILE).is_file() && dir.join("adapter_config.json").is_file()).then_some((round, dir))
        })
        .max_by_key(|(round, _)| *round)
}

/// The average hash the node recorded for `round`, if any.
fn logged_hash(data_dir: &Path, round: u64) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("metrics.jsonl")).ok()?;
    text.lines().rev().find_map(|line| {
        let record: serde_json::Value = serde_json::from_str(line).ok()?;
        (record.get("round")?.as_u64()? == round).then(|| record.get("average_hash")?.as_str().map(str::to_owned))?
    })
}

/// Polls `data_dir` for the life of the server, swapping in each new round.
pub async fn follow(data_dir: PathBuf, worker: ModelWorker) {
    let mut current: Option<u64> = None;
    let mut interval = tokio::time::interval(POLL);
    let mut seen = data_dir.is_dir();
    // Runs until the server stops (the task is dropped with the runtime).
    loop {
        interval.tick().await;
        if !seen && data_dir.is_dir() {
            seen = true;
            tracing::info!(dir = %data_dir.display(), "the followed directory appeared");
        }
        let Some((round, dir)) = newest_round(&data_dir) else { continue };
        if current.is_some_and(|c| c >= round) {
            continue;
        }
        let info = AdapterInfo {
            path: dir.display().to_string(),
            hash: logged_hash(&data_dir, round),
            round: Some(round),
        };
        match worker.swap(dir.clone(), info).await {
            Ok(()) => current = Some(round),
            // A half-written adapter, most likely: try again at the next look.
            Err(e) => tracing::warn!(round, error = %e, "could not switch adapters yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_whole_round_and_its_logged_hash_are_found() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_round(dir.path()), None);
        for (round, whole) in [(0, true), (1, true), (2, false)] {
            let round_dir = dir.path().join(format!("adapters/round-{round:04}"));
            std::fs::create_dir_all(&round_dir).unwrap();
            std::fs::write(round_dir.join("adapters.safetensors"), b"x").unwrap();
            if whole {
                std::fs::write(round_dir.join("adapter_config.json"), b"{}").unwrap();
            }
        }
        assert_eq!(newest_round(dir.path()).map(|(r, _)| r), Some(1));
        std::fs::write(dir.path().join("metrics.jsonl"), "{\"round\":0,\"average_hash\":\"aa\"}\n{\"round\":1,\"average_hash\":\"bb\"}\n").unwrap();
        assert_eq!(logged_hash(dir.path(), 1).as_deref(), Some("bb"));
        assert_eq!(logged_hash(dir.path(), 5), None);
    }
}
