//! Three real processes of the binary on 127.0.0.1: a relay R, nodes A and B
//! bootstrapped from R. B publishes a 5 MB adapter; A receives it, verified,
//! bit-identical to B's canonical encoding. C, started afterwards, catches up
//! through request-response. All waits are bounded; processes are killed at
//! the end.

mod common;

use std::path::Path;
use std::process::Command;

use common::Node;

use blossom_p2p::wire::codec::{Digest, Limits, TensorBytes, TensorDtype, decode_adapter, encode_adapter};

fn write_adapter(path: &Path) -> Vec<TensorBytes> {
    let count = 5 * 1024 * 1024 / 4;
    let tensors = vec![TensorBytes {
        name: "model.layers.0.self_attn.q_proj.lora_a".into(),
        dtype: TensorDtype::F32,
        shape: vec![count],
        data: (0..count).flat_map(|i| ((i % 997) as f32 / 997.0).to_le_bytes()).collect(),
    }];
    std::fs::write(path, encode_adapter(&tensors).unwrap()).unwrap();
    tensors
}

#[test]
fn relay_and_two_nodes_move_a_5_mb_adapter_and_a_late_joiner_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let tensors = write_adapter(&dir.path().join("adapter.safetensors"));
    let listen = "/ip4/127.0.0.1/tcp/0";

    let relay = Node::spawn(&["relay", "--data-dir", &d("r"), "--listen", listen]);
    let line = relay.wait_for("listening on /ip4/127.0.0.1/tcp/");
    let relay_addr = line.trim_start_matches("listening on ").to_owned();

    let a = Node::spawn(&["start", "--data-dir", &d("a"), "--listen", listen, "--bootstrap", &relay_addr, "--receive-dir", &d("a-recv")]);
    let b = Node::spawn(&["start", "--data-dir", &d("b"), "--listen", listen, "--bootstrap", &relay_addr, "--publish", &d("adapter.safetensors")]);
    let published = b.wait_for("published adapter");
    let hash = published.split_whitespace().nth(2).unwrap().to_owned();
    a.wait_for(&format!("received adapter {hash}"));
    let saved = a.wait_for("saved ");
    let bytes = std::fs::read(saved.trim_start_matches("saved ")).unwrap();
    assert_eq!(Digest::of(&bytes).to_hex(), hash, "A's copy does not match the published hash");
    assert_eq!(decode_adapter(&bytes, &Limits::default()).unwrap(), tensors);

    let c = Node::spawn(&["start", "--data-dir", &d("c"), "--listen", listen, "--bootstrap", &relay_addr, "--catch-up", "--receive-dir", &d("c-recv")]);
    c.wait_for(&format!("received adapter {hash}"));
    let saved = c.wait_for("saved ");
    assert_eq!(std::fs::read(saved.trim_start_matches("saved ")).unwrap(), bytes);
    // Identities persist: a node restarted on the same data dir keeps its peer id.
    drop(relay);
    let id_line = |node: &Node| node.wait_for("peer id:");
    let first = Node::spawn(&["start", "--data-dir", &d("a"), "--listen", listen]);
    let first_id = id_line(&first);
    drop(first);
    let again = Node::spawn(&["start", "--data-dir", &d("a"), "--listen", listen]);
    assert_eq!(id_line(&again), first_id);
}

#[test]
fn gossip_benchmark_runs_and_reports_each_mesh_degree() {
    let output = Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(["-q", "bench", "gossip", "--nodes", "4", "--megabytes", "1", "--mesh", "2,3"])
        .output()
        .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("x ideal"), "{stdout}");
    for degree in ["2", "3"] {
        assert!(stdout.lines().any(|l| l.split_whitespace().next() == Some(degree)), "no row for D = {degree}:\n{stdout}");
    }
}

/// A seeding relay keeps a run's newest adapter and serves it to a late
/// joiner after the publisher is gone.
#[test]
fn a_seeding_relay_serves_late_joiners_while_trainers_are_offline() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let tensors = write_adapter(&dir.path().join("adapter.safetensors"));
    let run = Digest::of(b"seeded run").to_hex();
    let listen = "/ip4/127.0.0.1/tcp/0";
    let relay = Node::spawn(&["relay", "--data-dir", &d("r"), "--listen", listen, "--seed-run", &run]);
    let relay_addr = relay.wait_for("listening on /ip4/127.0.0.1/tcp/").trim_start_matches("listening on ").to_owned();
    let b = Node::spawn(&["start", "--data-dir", &d("b"), "--listen", listen, "--bootstrap", &relay_addr, "--run-id", &run, "--publish", &d("adapter.safetensors")]);
    let hash = b.wait_for("published adapter").split_whitespace().nth(2).unwrap().to_owned();
    relay.wait_for(&format!("seeding adapter {hash}"));
    drop(b);
    let c = Node::spawn(&["start", "--data-dir", &d("c"), "--listen", listen, "--bootstrap", &relay_addr, "--run-id", &run, "--catch-up", "--receive-dir", &d("c-recv")]);
    c.wait_for(&format!("received adapter {hash}"));
    let saved = c.wait_for("saved ");
    let bytes = std::fs::read(saved.trim_start_matches("saved ")).unwrap();
    assert_eq!(decode_adapter(&bytes, &Limits::default()).unwrap(), tensors);
}

/// Two training nodes (the round engine over real TCP on 127.0.0.1, the tiny
/// model): both finish every round, average the same two updates, certify
/// them together, and save the same mlx-lm adapter. A relay seeding the run
/// takes the final certified average, and serves it, certificate and all,
/// to a node that comes after both trainers left.
#[test]
fn two_training_nodes_on_loopback_average_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let listen = "/ip4/127.0.0.1/tcp/0";
    let train = [
        "--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", "federation.rounds=2", "--set", "train.local_steps=3",
        "--set", "federation.save_every_rounds=1", "--set", "federation.round_timeout_secs=60",
    ];
    let with = |extra: &[&str]| -> Vec<String> { train.iter().chain(extra).map(|s| s.to_string()).collect() };
    let a_args = with(&["start", "--data-dir", &d("a"), "--listen", listen, "--metrics", "127.0.0.1:0"]);
    let a = Node::spawn(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let run = a.wait_for("run id: ").split_whitespace().nth(2).unwrap().to_owned();
    let metrics_url = a.wait_for("metrics on http://").trim_start_matches("metrics on http://").to_owned();
    let addr = a.wait_for("listening on /ip4/127.0.0.1/tcp/").trim_start_matches("listening on ").to_owned();
    // The relay comes once the run id is known, and joins through A.
    let through_a = format!("network.bootstrap=[\"{addr}\"]");
    let relay = Node::spawn(&["--set", &through_a, "relay", "--data-dir", &d("r"), "--listen", listen, "--seed-run", &run]);
    let relay_addr = relay.wait_for("listening on /ip4/127.0.0.1/tcp/").trim_start_matches("listening on ").to_owned();
    // The Prometheus page answers while the node runs.
    let (host, path) = metrics_url.split_once('/').unwrap();
    let mut socket = std::net::TcpStream::connect(host).unwrap();
    std::io::Write::write_all(&mut socket, format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut page = String::new();
    std::io::Read::read_to_string(&mut socket, &mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("# TYPE blossom_round gauge") && page.contains("blossom_rounds{run=\""), "{page}");
    let b_args = with(&["start", "--data-dir", &d("b"), "--listen", listen, "--bootstrap", &addr]);
    let b = Node::spawn(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let average = |node: &Node, round: u32| {
        let line = node.wait_for(&format!("round {round}:"));
        assert!(line.contains("2/2 updates"), "{line}");
        line.rsplit("average ").next().unwrap().to_owned()
    };
    // A waited for B: both train round 0 with the same two members and
    // agree from the first average on.
    assert_eq!(average(&a, 0), average(&b, 0), "round 0's averages differ");
    let (hash_a, hash_b) = (average(&a, 1), average(&b, 1));
    assert_eq!(hash_a, hash_b);
    a.wait_for("run finished");
    b.wait_for("run finished");
    relay.wait_for(&format!("seeding adapter {hash_a} (round 1)"));
    drop((a, b));
    let c = Node::spawn(&["start", "--data-dir", &d("c"), "--listen", listen, "--bootstrap", &relay_addr, "--run-id", &run, "--catch-up", "--receive-dir", &d("c-recv")]);
    c.wait_for(&format!("certificate for round 1: average {hash_a}, 2 of 2 contributors signed"));
    c.wait_for(&format!("received adapter {hash_a}"));
    let saved = |node: &str| std::fs::read(dir.path().join(node).join("adapters/round-0001/adapters.safetensors")).unwrap();
    assert_eq!(saved("a"), saved("b"));
    // Each round's record, and each round's certificate: both nodes signed.
    let metrics = std::fs::read_to_string(dir.path().join("a/metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.iter().filter(|r| r.get("round").is_some()).count(), 2, "{metrics}");
    let certified: Vec<&serde_json::Value> = records.iter().filter(|r| r.get("certified_round").is_some()).collect();
    assert_eq!(certified.len(), 2, "{metrics}");
    assert!(certified.iter().all(|r| r["signers"] == 2 && r["contributors"] == 2), "{metrics}");
    assert_eq!(certified[1]["average_hash"].as_str(), Some(hash_a.as_str()));
    // `status` reads what the node left in its data dir.
    let output = Command::new(env!("CARGO_BIN_EXE_blossom-p2p")).args(["status", "--json", "--data-dir", &d("a")]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["state"], "finished");
    assert_eq!(status["round"], 2);
    assert_eq!(status["last_average"].as_str(), Some(hash_a.as_str()));
    assert_eq!((status["certified"]["round"].as_u64(), status["certified"]["signers"].as_u64()), (Some(1), Some(2)), "{status}");
    assert!(status["bytes_sent"].as_u64().unwrap() > 0 && status["bytes_received"].as_u64().unwrap() > 0, "{status}");
}
