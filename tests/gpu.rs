//! MLX on a GPU (CUDA on Linux, Metal on macOS), where this build and
//! machine have one. Elsewhere each test says it skipped: CI's machines have
//! no GPU, and the CPU path is what the rest of the suite tests.

mod common;

use common::Node;

/// The GPU, or why these tests skip.
fn gpu() -> Option<blossom_p2p::mlx_env::GpuInfo> {
    let gpu = blossom_p2p::mlx_env::gpu_info();
    if gpu.is_none() {
        eprintln!("skipped: MLX finds no GPU here (this build links the CPU MLX, or no device answers)");
    }
    gpu
}

/// `doctor` names the GPU and measures both matmul rates on it; `--device
/// cpu` moves the same binary to the CPU.
#[test]
fn doctor_reports_the_gpu_and_its_matmul_rates() {
    let Some(gpu) = gpu() else { return };
    let output = common::blossom(&["--device", "gpu", "doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("doctor --json prints JSON");
    assert_ne!(report["device"], "cpu", "{report}");
    assert_eq!(report["gpu"]["name"].as_str(), Some(gpu.name.as_str()), "{report}");
    assert!(report["matmul_gflops"].as_f64().is_some_and(|g| g > 0.0), "{report}");
    assert!(report["matmul_bf16_gflops"].as_f64().is_some_and(|g| g > 0.0), "{report}");
    let output = common::blossom(&["--device", "cpu", "doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("doctor --json prints JSON");
    assert_eq!(report["device"], "cpu", "{report}");
}

/// Two `start` processes on 127.0.0.1, one training on the GPU and one on
/// the CPU: each round they average the same two updates, in Rust, in a
/// fixed order, so they end every round on the same hash whatever device
/// trained the updates.
#[test]
fn a_gpu_node_and_a_cpu_node_end_every_round_on_the_same_average() {
    if gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let listen = "/ip4/127.0.0.1/tcp/0";
    let train = [
        "--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", "federation.rounds=3", "--set", "train.local_steps=3",
        "--set", "federation.round_timeout_secs=60",
    ];
    let with = |extra: &[&str]| -> Vec<String> { train.iter().chain(extra).map(|s| s.to_string()).collect() };
    let a_args = with(&["--device", "gpu", "start", "--data-dir", &d("gpu"), "--listen", listen]);
    let a = Node::spawn(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let started = a.wait_for("run id: ");
    assert!(!started.contains(" on cpu,"), "{started}");
    let addr = a.wait_for("listening on /ip4/127.0.0.1/tcp/").trim_start_matches("listening on ").to_owned();
    let b_args = with(&["--device", "cpu", "start", "--data-dir", &d("cpu"), "--listen", listen, "--bootstrap", &addr]);
    let b = Node::spawn(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(b.wait_for("run id: ").contains(" on cpu,"));
    let average = |node: &Node, round: u32| {
        let line = node.wait_for(&format!("round {round}:"));
        assert!(line.contains("2/2 updates"), "{line}");
        line.rsplit("average ").next().unwrap().to_owned()
    };
    for round in 0..3 {
        let (on_gpu, on_cpu) = (average(&a, round), average(&b, round));
        eprintln!("round {round}: gpu node {on_gpu}, cpu node {on_cpu}");
        assert_eq!(on_gpu, on_cpu, "round {round}'s averages differ");
    }
    a.wait_for("run finished");
    b.wait_for("run finished");
}
