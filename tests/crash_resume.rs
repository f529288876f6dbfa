//! Crash safety with the real binary: two training nodes on 127.0.0.1, and
//! node B killed with SIGKILL during training, during a chunk write and
//! during a checkpoint write (the writes are stopped half-way by
//! `BLOSSOM_PAUSE_AT`, so the kill lands exactly there). B restarts with the
//! same command, resumes from its last whole checkpoint, drops what the
//! crash left half written, rejoins, and both nodes finish on the same
//! average. All waits are bounded.

mod common;

use std::path::Path;

use blossom_p2p::wire::codec::Digest;
use common::Node;

const ROUNDS: &str = "4";

/// `start` for a node with data dir `dir`, bootstrapping from `bootstrap`.
fn start_args(dir: &Path, bootstrap: Option<&str>) -> Vec<String> {
    start_args_with(dir, bootstrap, &[])
}

/// `start_args` with more `--set` settings.
fn start_args_with(dir: &Path, bootstrap: Option<&str>, settings: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = settings.iter().flat_map(|s| ["--set".to_owned(), s.to_string()]).collect();
    args.extend([
        "--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", "train.local_steps=20",
        "--set", &format!("federation.rounds={ROUNDS}"), "--set", "federation.save_every_rounds=1",
        // A deadline may end a round the restarted node missed; the run goes on.
        "--set", "federation.round_timeout_secs=15", "start", "--data-dir", dir.to_str().unwrap(),
        "--listen", "/ip4/127.0.0.1/tcp/0",
    ]
    .iter()
    .map(|s| s.to_string()));
    if let Some(addr) = bootstrap {
        args.extend(["--bootstrap".to_owned(), addr.to_owned()]);
    }
    args
}

fn spawn(args: &[String], env: &[(&str, &str)]) -> Node {
    Node::spawn_with_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
}

/// Node A, and its address for B's bootstrap.
fn first_node(dir: &Path) -> (Node, String) {
    first_node_with(dir, &[])
}

fn first_node_with(dir: &Path, settings: &[&str]) -> (Node, String) {
    let a = spawn(&start_args_with(&dir.join("a"), None, settings), &[]);
    let addr = a.wait_for("listening on /ip4/127.0.0.1/tcp/").trim_start_matches("listening on ").to_owned();
    (a, addr)
}

/// The average hash of the last round's line.
fn last_average(node: &Node) -> String {
    let line = node.wait_for("round 3:");
    line.rsplit("average ").next().unwrap().to_owned()
}

/// Both nodes finish the run on the same average.
fn finish_together(a: Node, b: Node) {
    let (hash_a, hash_b) = (last_average(&a), last_average(&b));
    assert_eq!(hash_a, hash_b, "the nodes disagree after the restart");
    a.wait_for("run finished");
    b.wait_for("run finished");
    assert_eq!(a.exit_code(), Some(0));
    assert_eq!(b.exit_code(), Some(0));
}

fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[test]
fn kill_9_during_training_resumes_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = first_node(dir.path());
    let b_args = start_args(&dir.path().join("b"), Some(&addr));
    let b = spawn(&b_args, &[]);
    // The round-1 line comes after its checkpoint; B is training round 2.
    b.wait_for("round 1:");
    b.kill_9();
    let saved = dir.path().join("b/adapters/round-0001/adapters.safetensors");
    let saved_before = std::fs::read(&saved).expect("round 1's average was saved before the kill");
    let checkpoints = files_in(&dir.path().join("b/checkpoints"));
    assert!(checkpoints.iter().any(|p| p.extension().is_some_and(|e| e == "ckpt")), "{checkpoints:?}");

    let b = spawn(&b_args, &[]);
    b.wait_for("resumed from the checkpoint: training round 2");
    finish_together(a, b);
    // What was committed before the crash is still there, unchanged, and the
    // metrics go on where they stopped.
    assert_eq!(std::fs::read(&saved).unwrap(), saved_before);
    let metrics = std::fs::read_to_string(dir.path().join("b/metrics.jsonl")).unwrap();
    // Round records (certificates have records of their own).
    let records: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let rounds: Vec<u64> = records.iter().filter_map(|r| r.get("round")?.as_u64()).collect();
    assert_eq!(rounds, [0, 1, 2, 3]);
}

/// With int8 updates and the Nesterov outer step, B's checkpoint holds the
/// outer momentum (and its error feedback's residual): resumed, it takes the
/// same outer steps as A, so both end on the same state. Without the
/// momentum B's states would differ from A's from its first round back.
#[test]
fn kill_9_with_int8_updates_and_nesterov_resumes_with_the_momentum() {
    let settings = ["federation.compression=\"int8\"", "federation.outer_optimizer=\"nesterov\""];
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = first_node_with(dir.path(), &settings);
    let b_args = start_args_with(&dir.path().join("b"), Some(&addr), &settings);
    let b = spawn(&b_args, &[]);
    b.wait_for("round 1:");
    b.kill_9();
    let b = spawn(&b_args, &[]);
    b.wait_for("resumed from the checkpoint: training round 2");
    finish_together(a, b);
}

#[test]
fn kill_9_during_a_chunk_write_leaves_no_partial_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = first_node(dir.path());
    let b_args = start_args(&dir.path().join("b"), Some(&addr));
    let b = spawn(&b_args, &[("BLOSSOM_PAUSE_AT", "chunk-write:4")]);
    b.wait_for("paused at chunk-write");
    b.kill_9();
    let temporary = files_in(&dir.path().join("b/store/tmp"));
    assert_eq!(temporary.len(), 1, "the half-written chunk: {temporary:?}");

    let b = spawn(&b_args, &[]);
    finish_together(a, b);
    assert!(files_in(&dir.path().join("b/store/tmp")).is_empty());
    // Every stored chunk is named by the hash of its content.
    let mut chunks = 0;
    for prefix in files_in(&dir.path().join("b/store/chunks")) {
        for chunk in files_in(&prefix) {
            let name = format!("{}{}", prefix.file_name().unwrap().to_str().unwrap(), chunk.file_name().unwrap().to_str().unwrap());
            assert_eq!(Digest::of(&std::fs::read(&chunk).unwrap()).to_hex(), name);
            chunks += 1;
        }
    }
    assert!(chunks > 0);
}

#[test]
fn kill_9_during_a_checkpoint_write_resumes_from_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = first_node(dir.path());
    let b_args = start_args(&dir.path().join("b"), Some(&addr));
    // The second checkpoint is the one written after round 1.
    let b = spawn(&b_args, &[("BLOSSOM_PAUSE_AT", "checkpoint-write:2")]);
    b.wait_for("paused at checkpoint-write");
    b.kill_9();
    let left = files_in(&dir.path().join("b/checkpoints"));
    assert!(left.iter().any(|p| p.to_str().unwrap().ends_with(".ckpt.tmp")), "the half-written checkpoint: {left:?}");

    let b = spawn(&b_args, &[]);
    // Round 0's checkpoint (train round 1) is the last whole one.
    b.wait_for("resumed from the checkpoint: training round 1");
    finish_together(a, b);
    let left = files_in(&dir.path().join("b/checkpoints"));
    assert!(!left.iter().any(|p| p.to_str().unwrap().ends_with(".tmp")), "{left:?}");
}
