//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A Hugging Face cache in a temporary folder with one repository
/// (`models--org--name` or `datasets--org--name`) whose `main` points at an
/// empty snapshot folder, returned for the test to fill.
pub fn fake_hub_cache(kind: &str, org: &str, name: &str) -> (tempfile::TempDir, PathBuf) {
    let cache = tempfile::tempdir().expect("tempdir");
    let repo = cache.path().join(format!("{kind}--{org}--{name}"));
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("ref");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).expect("snapshot");
    (cache, snapshot)
}

/// Runs the binary offline against `cache`.
pub fn run_offline(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run blossom-p2p")
}

/// `hf:blossom-test/absent` must fail with exit code 2, naming the repository and the offline mode.
pub fn assert_absent_repo_is_a_clear_error(output: &Output) {
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("hf:blossom-test/absent") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// Runs the binary from the repository root (where `models/` is).
pub fn blossom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run blossom-p2p")
}
